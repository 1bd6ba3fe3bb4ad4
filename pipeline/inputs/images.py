"""Find, decode and normalise the user's images.

Every image reaches the model through the same steps, whether it came from a folder or an
``.npz`` file: first frame only, EXIF orientation applied, any pixel format turned into 8-bit
grey or RGB (transparency composited onto white), then resized to the model's input size.

An input that cannot be used raises :class:`~pipeline.errors.SkipInput` with a short reason,
which the caller records in ``skipped.csv``; one bad file never stops a run. Problems with the
dataset as a whole (missing folder, no images, malformed ``.npz``) raise
:class:`~pipeline.errors.UserError`.

Notes
-----
Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default (``False``) and never
changed here: with it on, half-downloaded files would silently load with grey bottoms.
"""

import errno
import hashlib
import math
import os
import re
import stat
import struct
import threading
import warnings
import zlib
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import SkipInput, UserError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

#: Colour that transparent pixels are composited onto. White, because transparent images
#: (logos, icons, product cut-outs) are made to be seen on light pages; the RGB values
#: stored under alpha 0 are arbitrary and must not reach the model.
ALPHA_BACKGROUND = (255, 255, 255)

# Pillow's bilinear filter widens its kernel when shrinking, so it is antialiased (like
# tf.image.resize(antialias=True)); unlike LANCZOS it does not ring around the sharp edges
# of line art and digits.
RESAMPLE = Image.Resampling.BILINEAR

# Shrink in cheap integer steps until within this factor of the target, then resample;
# Pillow documents 3 as indistinguishable from resampling the full image.
REDUCING_GAP = 3.0

# What Pillow raises on damaged data: its decoders are not consistent, and a damaged file
# must become a skipped input, not a crashed run.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error, zlib.error)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# --------------------------------------------------------------------------- folders


def list_classes(root):
    """Class names of an image folder: its non-hidden sub-folders, sorted by name.

    Empty sub-folders count, so labels match what ``keras.utils.image_dataset_from_directory``
    assigns to the same folder (the model was probably trained that way).

    Parameters
    ----------
    root : str or os.PathLike

    Returns
    -------
    list of str
        Label ``i`` is ``list_classes(root)[i]``; empty for a flat folder.
    """
    root = _existing_folder(root)
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not _hidden(e.name) and e.is_dir())


def list_image_folder(root, follow_symlinks=False):
    """List the images of a folder, and the files that are not images.

    Sub-folders of ``root`` are classes (sorted by name; label = position, see
    :func:`list_classes`), searched recursively. A folder without sub-folders is an
    unlabelled dataset. In a mixed folder, image files directly inside ``root`` are listed
    unlabelled (label -1) next to the labelled ones, rather than dropped or guessed.
    Names starting with '.' (``.DS_Store``, ``.ipynb_checkpoints``) are ignored.

    Parameters
    ----------
    root : str or os.PathLike
    follow_symlinks : bool, default False
        Also follow symbolic links (files or folders, class folders included) whose target
        is outside ``root``. Links inside ``root`` are always followed.

    Returns
    -------
    candidates : pandas.DataFrame
        Columns ``path`` (absolute str), ``label`` (int, -1 = unlabelled), ``class_name``
        (str or None); unlabelled files first, then by label, then by relative path.
        Listed files may still fail to decode: see :func:`scan_images`.
    skipped : pandas.DataFrame
        Columns ``path`` (printable, see :func:`printable`), ``reason``, sorted by path:
        files whose extension is not in :data:`IMAGE_EXTENSIONS`, names that are not valid
        UTF-8, links leading out of ``root`` (unless ``follow_symlinks``), links back to a
        folder already listed (loops), unreadable folders.

    Raises
    ------
    UserError
        If ``root`` is missing, not a folder, or holds no image files.

    Notes
    -----
    A class folder that is skipped keeps its label, so the labels of the others still match
    ``keras.utils.image_dataset_from_directory``. Every folder is walked once: links to a
    folder are followed after the real tree, so images are listed at their real place and
    a loop ends.
    """
    root = _existing_folder(root)
    names = list_classes(root)
    walk = _Walk(root, follow_symlinks)
    walk.run(names)
    rows, skipped = [], list(walk.skipped)
    ordered = sorted(walk.files, key=lambda f: (f[0], Path(f[1]).relative_to(root).parts))
    for label, path in ordered:
        reason = _name_problem(path) or _extension_problem(path)
        if reason:
            skipped.append((path, reason))
        else:
            rows.append((path, label, names[label] if label >= 0 else None))
    if not rows:
        raise UserError(_no_images_message(root, len(skipped)))
    return _candidates_frame(rows), _skipped_frame(skipped)


def printable(name):
    """A file name as text that any file or table can hold.

    Bytes that are not valid UTF-8 (which Python keeps as lone surrogates) are shown as
    ``\\xff`` escapes.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        ``name`` itself when it is valid UTF-8.
    """
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system produced
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _existing_folder(root):
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(path):
        raise UserError(f"image folder not found: {path}")
    if not os.path.isdir(path):
        raise UserError(f"not a folder: {path} (expected a folder of images or of class sub-folders)")
    return path


def _hidden(name):
    return name.startswith(".")


class _Walk:
    """The files below an image folder, following symbolic links only where it is safe.

    The real tree is walked first and links to folders afterwards, in the order found, and
    no folder (``st_dev, st_ino``) is walked twice: a loop ends, and a link to a folder that
    is also reachable directly adds nothing. A link whose target is outside the folder is
    not followed unless ``follow_outside``.
    """

    def __init__(self, root, follow_outside):
        self.root, self.real_root = root, os.path.realpath(root)
        self.follow_outside = follow_outside
        self.files, self.skipped = [], []   # (label, path); (path, reason)
        self._links = deque()               # (label, path) of links to folders, not yet walked
        self._walked = set()

    def run(self, classes):
        self._first_visit(self.root)  # so that a link back to the root is a loop, not a class
        for entry in self._entries(self.root):
            if not entry.is_dir():  # broken links included: the decoder reports them
                self._add(-1, entry)
        for label, name in enumerate(classes):
            path = os.path.join(self.root, name)
            if os.path.islink(path):
                self._add_link(label, path, is_dir=True)
            else:
                self._walk(label, path)
        while self._links:
            self._walk(*self._links.popleft())

    def _walk(self, label, top):
        pending = [top]
        while pending:
            folder = pending.pop()
            if not self._first_visit(folder):
                continue
            for entry in self._entries(folder):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    self._add(label, entry)

    def _add(self, label, entry):
        if entry.is_symlink():
            self._add_link(label, entry.path, entry.is_dir())
        else:
            self.files.append((label, entry.path))

    def _add_link(self, label, path, is_dir):
        if not self.follow_outside and not self._inside(os.path.realpath(path)):
            self.skipped.append((path, "symlink leads outside the image folder"))
        elif is_dir:
            self._links.append((label, path))  # after the real tree: see the class docstring
        else:
            self.files.append((label, path))

    def _inside(self, real):
        return os.path.commonpath([real, self.real_root]) == self.real_root

    def _first_visit(self, folder):
        try:
            info = os.stat(folder)
        except OSError as e:
            self.skipped.append((folder, f"cannot read folder: {e.strerror or e}"))
            return False
        key = (info.st_dev, info.st_ino)
        if key in self._walked:
            self.skipped.append((folder, self._revisit_reason(folder)))
            return False
        self._walked.add(key)
        return True

    def _revisit_reason(self, folder):
        # A loop leads to a folder on its own way down from the root (through links, so the
        # real paths of the ancestors are compared, not the path's prefixes).
        target, parent = os.path.realpath(folder), os.path.dirname(folder)
        while len(parent) >= len(self.root):
            if os.path.realpath(parent) == target:
                return "symlink loop: leads back to a folder it is in"
            parent = os.path.dirname(parent)
        return "symlink to a folder already listed (its images are listed once)"

    def _entries(self, folder):
        try:
            with os.scandir(folder) as found:
                return sorted((e for e in found if not _hidden(e.name)), key=lambda e: e.name)
        except OSError as e:
            self.skipped.append((folder, f"cannot read folder: {e.strerror or e}"))
            return []


def _name_problem(path):
    # pyarrow and CSV writers cannot encode the surrogates Python uses for such bytes.
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    return None


def _extension_problem(path):
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    return f"not an image file (extension {suffix})" if suffix else "not an image file (no extension)"


def _no_images_message(root, n_other):
    others = f"; found {n_other} other file(s)" if n_other else ""
    wanted = " ".join(sorted(IMAGE_EXTENSIONS))
    return f"no image files in {root} (looked for {wanted}, also in class sub-folders){others}"


def _skipped_frame(skipped):
    rows = sorted((printable(path), reason) for path, reason in skipped)
    return pd.DataFrame(rows, columns=["path", "reason"])


def _candidates_frame(rows):
    paths, labels, names = zip(*rows)
    return pd.DataFrame(
        {
            "path": list(paths),
            "label": np.asarray(labels, dtype=np.int64),
            "class_name": pd.Series(names, dtype=object),
        }
    )


# --------------------------------------------------------------------------- one image


def load_image(path, size, channels, max_pixels=None):
    """Decode one image file into a uint8 array of the model's input size.

    Parameters
    ----------
    path : str or os.PathLike
    size : tuple of int
        ``(height, width)`` of the result. The aspect ratio is not kept (images are
        stretched), as in Keras' ``image_dataset_from_directory``.
    channels : {1, 3}
        1 for grey (ITU-R 601 luma), 3 for RGB.
    max_pixels : int, optional
        Refuse images declaring more pixels than this, before decoding them. Defaults to
        ``PIL.Image.MAX_IMAGE_PIXELS`` (read at call time; None there means no limit).
        It can only lower Pillow's own hard limit of twice ``MAX_IMAGE_PIXELS``.

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(height, width, channels)``.

    Raises
    ------
    SkipInput
        With a short reason: unreadable, empty, not an image, truncated/corrupt, too large
        or an unsupported pixel format.

    Notes
    -----
    16-bit images are scaled (``/257``), not clipped; 32-bit integer ones are read as
    16-bit data (how Pillow stores 16-bit PGM and PNG). Float images are [0, 1] if their
    max is <= 1.0, else [0, 255], like float arrays in :func:`convert_array_batch`; values
    outside are clipped. Multi-frame files give their first frame.

    This uses ``warnings.catch_warnings``, which is not thread-safe: from threads use
    :func:`load_images`.
    """
    _check_target(size, channels)
    with _bomb_warning_silenced():
        return _load(path, size, channels, max_pixels)


def _load(path, size, channels, max_pixels):
    _check_file(path)
    try:
        fp = open(path, "rb")
    except OSError as e:
        raise SkipInput(f"cannot read file: {e.strerror or e}") from None
    limit = _pixel_limit(max_pixels)
    with fp, _open(fp, limit) as im:
        _check_pixels(im.size, limit)
        _draft(im, size)
        _decode(im)
        return _fit(im, size, channels)


def _check_file(path):
    # stat before open: opening a FIFO would block forever, and a zero-byte file deserves
    # a clearer reason than "cannot identify".
    try:
        info = os.stat(path)
    except OSError as e:
        raise SkipInput(f"cannot read file: {e.strerror or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise SkipInput(f"cannot read file: {os.strerror(errno.EISDIR)}")
    if not stat.S_ISREG(info.st_mode):
        raise SkipInput("cannot read file: not a regular file")
    if info.st_size == 0:
        raise SkipInput("empty file (0 bytes)")


def _open(fp, limit):
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise SkipInput("not a readable image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        # Over twice Pillow's limit Pillow refuses inside open(), so only its message
        # knows the size.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{found.group(1)} pixels" if found else "too many pixels"
        limit = min(limit or math.inf, 2 * Image.MAX_IMAGE_PIXELS)
        reason = f"image too large ({pixels} > limit {limit}): possible decompression bomb"
        raise SkipInput(reason) from None
    except _DECODE_ERRORS as e:
        raise SkipInput(f"truncated or corrupt image data: {_short(e)}") from None


def _pixel_limit(max_pixels):
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_pixels(wh, limit):
    # Checked on the declared size, before any pixel is decoded: this is the guard that
    # works in every thread, whatever the warning filters are.
    width, height = wh
    if limit is not None and width * height > limit:
        raise SkipInput(
            f"image too large ({width}×{height} pixels > limit {limit}): possible decompression bomb"
        )


def _draft(im, size):
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for nearly free; stop at twice the target
    # (square, so a later EXIF rotation cannot make it too small), as Image.thumbnail does.
    side = 2 * max(size)
    if im.format == "JPEG" and min(im.size) > side:
        im.draft(None, (side, side))


def _decode(im):
    try:
        im.seek(0)
        im.load()  # force the full decode here, so damaged data fails inside this try
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a large image
    except _DECODE_ERRORS as e:
        raise SkipInput(f"truncated or corrupt image data: {_short(e)}") from None


def _short(error, limit=80):
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def _bomb_warning_silenced():
    # Pillow warns between 1× and 2× its limit; _check_pixels rejects those (or lets them
    # through when the caller raised max_pixels) with a better message, so the warning is
    # noise. warnings filters are process-wide: set them in one thread only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


# --------------------------------------------------------------------------- pixel formats


def _fit(im, size, channels):
    """Pillow image of any mode -> uint8 array (H, W, channels) of the target size."""
    try:
        im = _to_target_mode(im, channels)
    except ValueError:
        raise SkipInput(f"unsupported pixel format (Pillow mode {im.mode})") from None
    height, width = size
    if im.size != (width, height):
        im = im.resize((width, height), RESAMPLE, reducing_gap=REDUCING_GAP)
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def _to_target_mode(im, channels):
    if im.mode in _HIGH_DEPTH_MODES:
        im = Image.fromarray(_high_depth_to_uint8(im))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        im = _composite(im.convert("RGBA"))
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, P, 1, YCbCr...: Pillow knows all of these to RGB
    return im.convert("L" if channels == 1 else "RGB")


def _high_depth_to_uint8(im):
    # Pillow's own convert("L") clips these at 255, turning most 16-bit images white.
    values = np.asarray(im)
    if im.mode == "F":
        return _float_to_uint8(values, _infer_float_range(values))
    return _uint16_to_uint8(np.clip(values, 0, 65535))


def _uint16_to_uint8(values):
    # 65535 / 257 = 255 exactly; +128 rounds to nearest.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _infer_float_range(values):
    return _float_top(_finite_min_max(values)[1])


def _float_top(high):
    # Floats are either [0, 1] (Keras' rescaled images) or [0, 255] (cast uint8).
    return 1.0 if high <= 1.0 else 255.0


def _finite_min_max(values):
    if values.dtype.kind != "f":
        return float(np.min(values)), float(np.max(values))
    # NaN and inf are ignored (callers skip such images); where= avoids copying values.
    finite = np.isfinite(values)
    return (
        float(np.min(values, where=finite, initial=np.inf)),
        float(np.max(values, where=finite, initial=-np.inf)),
    )


def _float_to_uint8(values, top):
    scaled = np.nan_to_num(values.astype(np.float32), nan=0.0) * (255.0 / top)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite(rgba):
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _check_target(size, channels):
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"size must be (height, width) of positive ints, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


# --------------------------------------------------------------------------- many images


def load_images(paths, size, channels, max_pixels=None, workers=None, progress=None):
    """Decode many image files in a thread pool, keeping their order.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
    size, channels, max_pixels
        As in :func:`load_image`.
    workers : int, optional
        Decoding threads (Pillow releases the GIL while decoding). Default:
        ``min(32, cpu_count + 4)``, which also hides file-system latency.
    progress : callable, optional
        Called with 1 after each file (e.g. ``tqdm.update``).

    Returns
    -------
    images : numpy.ndarray
        uint8, shape ``(n_good, height, width, channels)``.
    positions : list of int
        Position in ``paths`` of each row of ``images``.
    failures : list of (int, str)
        Position and reason of each file that was skipped.
    """
    _check_target(size, channels)
    height, width = size
    images = np.empty((len(paths), height, width, channels), dtype=np.uint8)
    positions, failures = [], []
    decoded = _decode_all(paths, size, channels, max_pixels, workers, progress, keep=True)
    for position, pixels, reason in decoded:
        if reason is None:
            images[len(positions)] = pixels  # compact as we go: no second copy to stack
            positions.append(position)
        else:
            failures.append((position, reason))
    return images[: len(positions)], positions, failures


def scan_images(paths, size, channels, max_pixels=None, workers=None, progress=None, hashes=None):
    """Check that files decode, without keeping their pixels.

    Runs exactly the decoding of :func:`load_images` (so a file that passes here loads
    there) with memory that does not grow with ``len(paths)``.

    Parameters
    ----------
    hashes : dict, optional
        When given, filled with ``{position: content hash}`` (:func:`file_digest` of the file's
        bytes, read right after it decoded, so the second read comes from the page cache) for
        every usable image.

    Returns
    -------
    positions : list of int
        Positions in ``paths`` of the usable images.
    failures : list of (int, str)
        Position and reason of each file that would be skipped.
    """
    positions, failures = [], []
    decoded = _decode_all(paths, size, channels, max_pixels, workers, progress, keep=False,
                          digest=hashes is not None)
    for position, result, reason in decoded:
        if reason is None:
            positions.append(position)
            if hashes is not None:
                hashes[position] = result
        else:
            failures.append((position, reason))
    return positions, failures


def file_digest(path) -> str:
    """Content hash of a file: BLAKE2b (16 bytes) of its bytes, as 32 hex digits.

    The ``content_hash`` of an image file in ``dataset.parquet``; two runs share an image when
    their hashes are equal, whatever its path. Read 1 MiB at a time.

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(image) -> str:
    """Content hash of one image of an array (``.npz`` row): BLAKE2b (16 bytes) of its bytes as
    stored (C order, its own dtype), as 32 hex digits."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def npz_digests(data, rows, nbytes=None) -> list:
    """:func:`array_digest` of ``x[rows]`` of an open ``.npz``, reading about ``nbytes`` at a time.

    Parameters
    ----------
    data : NpzImages
    rows : array-like of int
        Positions in ``x``; sorted ones read fastest (one pass over a compressed file).

    Returns
    -------
    list of str
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    per_batch = max(1, (nbytes or SCAN_BYTES) // max(1, math.prod(data.shape[1:]) * data.dtype.itemsize))
    out = []
    for start in range(0, len(rows), per_batch):
        out += [array_digest(image) for image in data.read(rows[start:start + per_batch])]
    return out


def _decode_all(paths, size, channels, max_pixels, workers, progress, keep, digest=False):
    """Yield ``(position, pixels or digest or None, reason or None)`` in the order of ``paths``."""
    _check_target(size, channels)

    def attempt(path):
        try:
            pixels = _load(path, size, channels, max_pixels)
            if digest:
                try:
                    return file_digest(path), None
                except OSError as e:
                    return None, f"cannot read file: {e.strerror or e}"
            return (pixels if keep else None), None
        except SkipInput as skip:
            return None, skip.reason

    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    Image.init()  # register every format plugin once, before threads race to do it
    with _bomb_warning_silenced():
        for position, (pixels, reason) in enumerate(_ordered_map(attempt, paths, workers)):
            if progress is not None:
                progress(1)
            yield position, pixels, reason


def _ordered_map(fn, items, workers):
    # Like ThreadPoolExecutor.map, but with a bounded number of tasks in flight: map
    # submits everything up front, holding every result until it is consumed.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --------------------------------------------------------------------------- sampling


def stratified_sample(labels, limit, seed):
    """Choose ``limit`` positions, keeping the class proportions.

    Parameters
    ----------
    labels : array-like of int
        One label per image; -1 (unlabelled) is treated as one more class.
    limit : int or None
        Number of positions to return; None (or ``limit >= len(labels)``) returns all.
    seed : int
        Seed for ``numpy.random.default_rng``: same inputs, same sample.

    Returns
    -------
    numpy.ndarray
        Sorted int64 positions, so the dataset keeps its order.

    Notes
    -----
    Quotas are proportional, rounded by largest remainder. When ``limit`` is at least the
    number of classes every class keeps at least one image, taken from the largest quotas.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    if limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _allocate(counts, limit)
    chosen = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _allocate(counts, limit):
    """Largest-remainder proportional quotas summing to ``limit``, >= 1 each if possible."""
    exact = counts * (limit / counts.sum())
    quotas = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quotas), kind="stable")  # stable: ties go to lower labels
    quotas[by_remainder[: limit - quotas.sum()]] += 1
    if limit >= len(counts):
        for empty in np.flatnonzero(quotas == 0):
            quotas[np.argmax(quotas)] -= 1
            quotas[empty] = 1
    return quotas


# --------------------------------------------------------------------------- arrays


#: Bytes of ``x`` held at a time when an ``.npz`` is scanned (value range, NaN/Inf), so the
#: scan's memory depends neither on the number nor on the size of the images.
SCAN_BYTES = 1 << 20

#: ``class_names`` is read whole, so it is bounded: no dataset has more classes or names this long.
MAX_CLASSES = 1_000_000
MAX_CLASS_NAMES_BYTES = 64 << 20

# Deflate cannot expand data more than 1032 times (RFC 1951: at best 2 bits per 258-byte
# match); a member whose zip entry claims more is crafted, and would only fail later.
_DEFLATE_MAX_RATIO = 1032

# A compressed member is decompressed into the caller's array this much at a time:
# ZipExtFile.readinto goes through bytes objects as large as the request, and several of them.
_STREAM_PIECE = 1 << 18

# A Fortran-order x has no contiguous image to read by index; it is read whole up to this.
_FORTRAN_BYTES = 256 << 20

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}

# What reading a damaged or crafted member raises (zipfile: CRC and EOF; RuntimeError: encrypted;
# NotImplementedError: a compression method zipfile lacks).
_MEMBER_ERRORS = (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, struct.error,
                  zipfile.BadZipFile, zlib.error)


def load_npz(path, max_pixels=None):
    """Read images (and optional labels) from a ``.npz`` file, refusing pickled data.

    Checked as by :func:`open_npz`, then ``x`` is read whole: for large files use
    :func:`open_npz`, which reads images by index.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``numpy.savez``/``savez_compressed`` with an array ``x`` of shape
        ``(N, H, W)`` or ``(N, H, W, C)``, C in {1, 3, 4}; optionally ``y`` (N integer
        labels, -1 = unlabelled) and ``class_names`` (array of strings).
    max_pixels : int, optional
        As in :func:`open_npz`.

    Returns
    -------
    x : numpy.ndarray
        As stored (convert with :func:`convert_array_batch`).
    y : numpy.ndarray of int64 or None
    class_names : list of str or None

    Raises
    ------
    UserError
        One line naming the file and the problem.
    """
    with open_npz(path, max_pixels) as data:
        return data.read(np.arange(len(data))), data.y, data.class_names


def open_npz(path, max_pixels=None):
    """Open an ``.npz`` dataset, checking it without reading its images.

    Every member's ``.npy`` header is read first (nothing is decompressed beyond it) and
    checked: shapes, dtypes (no pickled objects), the declared size against the zip entry,
    and the pixels per image against ``max_pixels``. ``y`` and ``class_names`` are then read
    whole; ``x`` is read by index (see :class:`NpzImages`).

    Parameters
    ----------
    path : str or os.PathLike
        As in :func:`load_npz`.
    max_pixels : int, optional
        Refuse images of more pixels (H × W) than this, the limit image files get (see
        :func:`load_image`). Defaults to ``PIL.Image.MAX_IMAGE_PIXELS``.

    Returns
    -------
    NpzImages
        Close it (or use it in a ``with`` block) to release the file.

    Raises
    ------
    UserError
        One line naming the file and the problem.
    """
    path = os.path.abspath(os.fspath(path))
    archive = _open_zip(path)
    try:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        if "x" not in members:
            found = ", ".join(members) or "nothing"
            raise UserError(
                f"{path}: no array named 'x' (found: {found}); save images with numpy.savez(path, x=images)"
            )
        header = _member_header(archive, members["x"], "x", path)
        _check_x(header, path, max_pixels)
        _check_size(members["x"], header, "x", path)
        y = _read_labels(archive, members.get("y"), header.shape[0], path)
        names = _checked_class_names(_read_class_names(archive, members.get("class_names"), path), y, path)
        source = _x_bytes(archive, members["x"], header, path)
    except BaseException:
        archive.close()
        raise
    return NpzImages(path, archive, source, header, y, names)


class NpzImages:
    """The images of an ``.npz`` file, read by index, and its labels.

    Made by :func:`open_npz`. Memory holds the images asked for (:meth:`read`) or one
    :data:`SCAN_BYTES` chunk (:meth:`chunks`), never the whole of ``x``.

    Attributes
    ----------
    path : str
    shape : tuple of int
        Shape of ``x``: ``(N, H, W)`` or ``(N, H, W, C)``.
    dtype : numpy.dtype
        Of ``x``.
    y : numpy.ndarray of int64 or None
        One label per image, -1 = unlabelled.
    class_names : list of str or None

    Notes
    -----
    A stored ``x`` (``numpy.savez``) is read at its offset in the file. A compressed one
    (``savez_compressed``) is decompressed as a stream that stays open at the last image
    read, so reading batches in order costs O(batch); reading backwards restarts the
    decompression. One read at a time: threads may share an instance.
    """

    def __init__(self, path, archive, source, header, y, class_names):
        self.path, self.shape, self.dtype = path, header.shape, header.dtype
        self.y, self.class_names = y, class_names
        self._archive, self._source = archive, source
        self._image_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self._lock = threading.Lock()

    def __len__(self):
        return self.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the file."""
        self._source.close()
        self._archive.close()

    def read(self, indices):
        """Images ``x[indices]``, reading only those.

        Parameters
        ----------
        indices : array-like of int
            Positions in ``x``, any order, repeats allowed; sorted ones read fastest.

        Returns
        -------
        numpy.ndarray
            Shape ``(len(indices), *shape[1:])``, dtype as stored.

        Raises
        ------
        IndexError
            For a position outside ``0..N-1``.
        UserError
            If the stored data cannot be read (truncated or corrupt file).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        wanted, inverse = np.unique(indices, return_inverse=True)
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        images = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        for start, stop in _runs(wanted):
            self._fill(int(wanted[start]) * self._image_bytes, images[start:stop])
        return images if np.array_equal(wanted, indices) else images[inverse.reshape(-1)]

    def chunks(self, nbytes=SCAN_BYTES):
        """The values of ``x`` in storage order, a bounded chunk at a time.

        Parameters
        ----------
        nbytes : int
            Bytes per chunk (at least one value).

        Yields
        ------
        first : int
            Flat position in ``x`` of the chunk's first value.
        values : numpy.ndarray
            1-D.
        """
        step = max(1, nbytes // self.dtype.itemsize)
        total = math.prod(self.shape)
        for first in range(0, total, step):
            values = np.empty(min(step, total - first), self.dtype)
            self._fill(first * self.dtype.itemsize, values)
            yield first, values

    def _fill(self, offset, out):
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with self._lock:
                got = self._source.readinto(offset, buffer)
        except _MEMBER_ERRORS as e:
            raise UserError(f"{self.path}: array 'x' cannot be read ({_short(e)})") from None
        if got != len(buffer):
            raise UserError(f"{self.path}: array 'x' ends early: the file is truncated")


def _runs(positions):
    """``(start, stop)`` of each run of consecutive values in sorted ``positions``."""
    breaks = (np.flatnonzero(np.diff(positions) != 1) + 1).tolist()
    edges = [0, *breaks, len(positions)] if len(positions) else []
    return zip(edges[:-1], edges[1:])


class _FileBytes:
    """A stored member's data, read at any offset of the file itself."""

    def __init__(self, path, start):
        self._file, self._start = open(path, "rb"), start

    def readinto(self, offset, buffer):
        self._file.seek(self._start + offset)
        return self._file.readinto(buffer)

    def close(self):
        self._file.close()


class _StreamBytes:
    """A compressed member's data. ``ZipExtFile.seek`` decompresses forward in bounded
    reads, or restarts for a position behind the stream's, so the stream is the cursor."""

    def __init__(self, member, start):
        self._member, self._start = member, start

    def readinto(self, offset, buffer):
        self._member.seek(self._start + offset)
        got = 0
        while got < len(buffer):
            n = self._member.readinto(buffer[got:got + _STREAM_PIECE])
            if not n:
                break
            got += n
        return got

    def close(self):
        self._member.close()


class _ArrayBytes:
    """An array read whole, served like the others (a Fortran-order ``x``)."""

    def __init__(self, array):
        self._bytes = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def readinto(self, offset, buffer):
        part = self._bytes[offset:offset + len(buffer)]
        buffer[:len(part)] = part
        return len(part)

    def close(self):
        pass


class _Header(NamedTuple):
    shape: tuple
    fortran_order: bool
    dtype: np.dtype
    start: int  # position of the data in the member (after the header)


def _open_zip(path):
    if not os.path.isfile(path):
        raise UserError(f"npz file not found: {path}")
    # Checked first: numpy's errors for these cases talk about pickles.
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if head == np.lib.format.MAGIC_PREFIX:
        raise UserError(
            f"{path}: is a single .npy array, not an .npz file; save it with numpy.savez(path, x=images)"
        )
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a valid .npz file (not a zip archive)")
    try:
        return zipfile.ZipFile(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a valid .npz file ({_short(e)})") from None


def _member_header(archive, info, key, path):
    """The ``.npy`` header of a member, read without decompressing its data."""
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in _HEADER_READERS:
                raise UserError(f"{path}: array '{key}' uses .npy format {version}, not 1.0 or 2.0")
            shape, fortran_order, dtype = _HEADER_READERS[version](member)
            start = member.tell()
    except _MEMBER_ERRORS as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({_short(e)})") from None
    if dtype.hasobject:
        raise UserError(
            f"{path}: array '{key}' holds Python objects (dtype=object); loading it would "
            "unpickle code, so it is refused: save it as a numeric or string array"
        )
    return _Header(shape, fortran_order, dtype, start)


def _check_x(header, path, max_pixels):
    shape, dtype = header.shape, header.dtype
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise UserError(
            f"{path}: x must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {shape}"
        )
    if dtype.kind not in "biuf":
        raise UserError(f"{path}: x has dtype {dtype}; expected uint8 or float")
    if shape[0] < 1:
        raise UserError(f"{path}: x holds no images")
    if min(shape[1:]) < 1:
        raise UserError(f"{path}: x holds empty images (shape {shape})")
    height, width = shape[1:3]
    limit = _pixel_limit(max_pixels)
    if limit is not None and height * width > limit:
        raise UserError(
            f"{path}: x holds images of {width}×{height} pixels ({height * width} > limit {limit}): "
            "possible decompression bomb; raise data.max_pixels if you trust the file"
        )


def _check_size(info, header, key, path):
    """The data a header declares must be in the zip entry, and the entry must be possible."""
    declared = math.prod(header.shape) * header.dtype.itemsize
    held = info.file_size - header.start
    if declared > held:
        raise UserError(
            f"{path}: array '{key}' declares {header.shape} {header.dtype} ({_size(declared)}) but the "
            f"file holds {_size(max(held, 0))} of data for it: truncated or crafted .npz"
        )
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise UserError(
            f"{path}: array '{key}' claims {_size(info.file_size)} from {_size(info.compress_size)} of "
            "compressed data, more than deflate can produce: crafted .npz"
        )


def _size(nbytes):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _x_bytes(archive, info, header, path):
    if header.fortran_order:
        declared = math.prod(header.shape) * header.dtype.itemsize
        if declared > _FORTRAN_BYTES:
            raise UserError(
                f"{path}: x ({_size(declared)}) is stored in Fortran order, so its images cannot be read "
                "one at a time; save numpy.ascontiguousarray(x) instead"
            )
        return _ArrayBytes(_read_member(archive, info, "x", path))
    if info.compress_type == zipfile.ZIP_STORED:
        return _FileBytes(path, _stored_data_offset(path, info, header))
    try:
        return _StreamBytes(archive.open(info), header.start)
    except _MEMBER_ERRORS as e:
        raise UserError(f"{path}: array 'x' cannot be read ({_short(e)})") from None


def _stored_data_offset(path, info, header):
    """Where a stored member's array data starts in the file (zipfile does not say)."""
    try:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            fields = struct.unpack(zipfile.structFileHeader, f.read(zipfile.sizeFileHeader))
            *_, name_length, extra_length = fields
            member = info.header_offset + zipfile.sizeFileHeader + name_length + extra_length
            f.seek(member)
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
            size = os.fstat(f.fileno()).st_size
    except (OSError, struct.error) as e:
        raise UserError(f"{path}: array 'x' cannot be read ({_short(e)})") from None
    start = member + header.start
    if fields[0] != zipfile.stringFileHeader or magic != np.lib.format.MAGIC_PREFIX:
        raise UserError(f"{path}: not a valid .npz file (array 'x' is not where its zip entry says)")
    if start + math.prod(header.shape) * header.dtype.itemsize > size:
        raise UserError(f"{path}: array 'x' ends early: the file is truncated")
    return start


def _read_member(archive, info, key, path):
    try:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except _MEMBER_ERRORS as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({_short(e)})") from None


def _read_labels(archive, info, n, path):
    if info is None:
        return None
    header = _member_header(archive, info, "y", path)
    shape, dtype = header.shape, header.dtype
    if len(shape) != 1:
        hint = " (one-hot? store y.argmax(axis=1))" if len(shape) == 2 else ""
        raise UserError(f"{path}: y must be one integer label per image; got shape {shape}{hint}")
    if shape[0] != n:
        raise UserError(f"{path}: y has {shape[0]} labels but x has {n} images")
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise UserError(f"{path}: y must hold integer labels; got dtype {dtype}")
    _check_size(info, header, "y", path)
    return _checked_labels(_read_member(archive, info, "y", path), path)


def _checked_labels(y, path):
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise UserError(f"{path}: y must hold integer labels; got dtype {y.dtype}")
    if len(y) and (y.min() < -1 or y.max() >= 2**63):  # checked before int64 could wrap them
        bad = int(y.min() if y.min() < -1 else y.max())
        raise UserError(f"{path}: y has label {bad}; labels are 0, 1, 2, … (-1 = unlabelled)")
    return y.astype(np.int64)


def _read_class_names(archive, info, path):
    if info is None:
        return None
    header = _member_header(archive, info, "class_names", path)
    if len(header.shape) != 1 or header.dtype.kind not in "US":
        raise UserError(
            f"{path}: class_names must be a 1-D array of strings; got {header.dtype} {header.shape}"
        )
    nbytes = header.shape[0] * header.dtype.itemsize
    if header.shape[0] > MAX_CLASSES or nbytes > MAX_CLASS_NAMES_BYTES:
        raise UserError(
            f"{path}: class_names lists {header.shape[0]} names of up to {header.dtype.itemsize} bytes; "
            f"at most {MAX_CLASSES} names and {_size(MAX_CLASS_NAMES_BYTES)} are read"
        )
    _check_size(info, header, "class_names", path)
    return _read_member(archive, info, "class_names", path)


def _checked_class_names(names, y, path):
    if names is None:
        return None
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if y is not None and len(y) and int(y.max()) >= len(names):
        raise UserError(
            f"{path}: y has label {int(y.max())} but class_names lists only {len(names)} classes"
        )
    return names


def scan_npz(data):
    """Value range and non-finite images of an ``.npz`` dataset, in one bounded pass.

    Parameters
    ----------
    data : NpzImages

    Returns
    -------
    value_range : float
        What :func:`infer_value_range` gives for the whole of ``x``.
    nonfinite : numpy.ndarray of bool
        One per image: True where the image holds NaN or Inf.

    Raises
    ------
    UserError
        As :func:`infer_value_range`, or if ``x`` cannot be read.

    Notes
    -----
    uint8 and bool arrays need no pass: their range is their dtype's.
    """
    nonfinite = np.zeros(len(data), dtype=bool)
    if data.dtype in (np.uint8, np.bool_):
        return (255.0 if data.dtype == np.uint8 else 1.0), nonfinite
    low, high = np.inf, -np.inf
    per_image = math.prod(data.shape[1:])
    for first, values in data.chunks():
        if values.dtype.kind == "f":
            nonfinite[(first + np.flatnonzero(~np.isfinite(values))) // per_image] = True
        chunk_low, chunk_high = _finite_min_max(values)
        low, high = min(low, chunk_low), max(high, chunk_high)
    return _value_range(data.dtype, low, high, f"{data.path}: x"), nonfinite


def convert_array_batch(x, size, channels, value_range=None):
    """Convert array images to uint8 at the model's input size, as files are converted.

    Parameters
    ----------
    x : numpy.ndarray
        Shape ``(N, H, W)`` or ``(N, H, W, C)``, C in {1, 3, 4} (4 = RGBA, composited onto
        :data:`ALPHA_BACKGROUND`).
    size, channels
        As in :func:`load_image`.
    value_range : {1.0, 255.0, 65535.0}, optional
        The value that means "white". By default inferred from ``x``: uint8 and bool are
        8-bit; other integers are 8-bit if their max <= 255, else 16-bit; floats with
        max <= 1.0 are [0, 1], else [0, 255]. Infer it once from the whole dataset (or pass
        it) rather than per batch, or a batch of dark images would be read differently.

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(N, height, width, channels)``.

    Raises
    ------
    UserError
        Negative or out-of-range values: their meaning cannot be guessed.

    Notes
    -----
    NaN becomes black and infinities are clipped: skip such images before converting.
    """
    _check_target(size, channels)
    top = value_range if value_range is not None else infer_value_range(x)
    height, width = size
    out = np.empty((len(x), height, width, channels), dtype=np.uint8)
    for i, image in enumerate(x):
        out[i] = _fit(Image.fromarray(_array_to_uint8(image, top)), size, channels)
    return out


def infer_value_range(x):
    """The value meaning "white" in an image array (see :func:`convert_array_batch`).

    Non-finite values are ignored.

    Returns
    -------
    float
        1.0, 255.0 or 65535.0.

    Raises
    ------
    UserError
        If the values fit none of [0, 1], [0, 255] or [0, 65535].
    """
    if x.dtype in (np.uint8, np.bool_) or x.size == 0:
        return 255.0 if x.dtype == np.uint8 else 1.0
    return _value_range(x.dtype, *_finite_min_max(x))


def _value_range(dtype, low, high, name="image array"):
    """The value meaning white for an array of ``dtype`` whose finite values span [low, high]."""
    if low < 0:
        raise UserError(
            f"{name} has negative values (min {low:g}); "
            "store uint8 images or floats in [0, 1] or [0, 255]"
        )
    if dtype.kind == "f":
        if high > 255.0:
            raise UserError(f"{name} holds floats up to {high:g}; expected [0, 1] or [0, 255]")
        return _float_top(high)
    if high > 65535:
        raise UserError(f"{name} holds integers up to {high:g}; expected 8- or 16-bit values")
    return 255.0 if high <= 255 else 65535.0


def _array_to_uint8(image, top):
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]  # Pillow has no (H, W, 1) mode
    if image.dtype == np.uint8 and top == 255.0:
        return image
    if top == 65535.0:
        return _uint16_to_uint8(np.clip(image, 0, 65535))
    return _float_to_uint8(image, top)
