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
import math
import os
import re
import stat
import struct
import warnings
import zlib
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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


def list_image_folder(root):
    """List the images of a folder, and the files that are not images.

    Sub-folders of ``root`` are classes (sorted by name; label = position, see
    :func:`list_classes`), searched recursively. A folder without sub-folders is an
    unlabelled dataset. In a mixed folder, image files directly inside ``root`` are listed
    unlabelled (label -1) next to the labelled ones, rather than dropped or guessed.
    Names starting with '.' (``.DS_Store``, ``.ipynb_checkpoints``) are ignored.

    Parameters
    ----------
    root : str or os.PathLike

    Returns
    -------
    candidates : pandas.DataFrame
        Columns ``path`` (absolute str), ``label`` (int, -1 = unlabelled), ``class_name``
        (str or None); unlabelled files first, then by label, then by relative path.
        Listed files may still fail to decode: see :func:`scan_images`.
    skipped : pandas.DataFrame
        Columns ``path``, ``reason`` for files whose extension is not in
        :data:`IMAGE_EXTENSIONS`.

    Raises
    ------
    UserError
        If ``root`` is missing, not a folder, or holds no image files.
    """
    root = _existing_folder(root)
    groups = [(-1, None, _top_level_files(root))]
    for label, name in enumerate(list_classes(root)):
        groups.append((label, name, _files_below(os.path.join(root, name))))
    rows, skipped = [], []
    for label, name, files in groups:
        for path in sorted(files, key=lambda p: Path(p).relative_to(root).parts):
            reason = _extension_problem(path)
            if reason:
                skipped.append((path, reason))
            else:
                rows.append((path, label, name))
    if not rows:
        raise UserError(_no_images_message(root, len(skipped)))
    return _candidates_frame(rows), pd.DataFrame(skipped, columns=["path", "reason"])


def _existing_folder(root):
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(path):
        raise UserError(f"image folder not found: {path}")
    if not os.path.isdir(path):
        raise UserError(f"not a folder: {path} (expected a folder of images or of class sub-folders)")
    return path


def _hidden(name):
    return name.startswith(".")


def _top_level_files(root):
    # Anything that is not a folder is a file here, broken symlinks included: they must
    # reach the decoder and be reported, not vanish.
    with os.scandir(root) as entries:
        return [e.path for e in entries if not _hidden(e.name) and not e.is_dir()]


def _files_below(folder):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]  # prune in place: os.walk API
        found += [os.path.join(dirpath, f) for f in filenames if not _hidden(f)]
    return found


def _extension_problem(path):
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    return f"not an image file (extension {suffix})" if suffix else "not an image file (no extension)"


def _no_images_message(root, n_other):
    others = f"; found {n_other} other file(s)" if n_other else ""
    wanted = " ".join(sorted(IMAGE_EXTENSIONS))
    return f"no image files in {root} (looked for {wanted}, also in class sub-folders){others}"


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


def scan_images(paths, size, channels, max_pixels=None, workers=None, progress=None):
    """Check that files decode, without keeping their pixels.

    Runs exactly the decoding of :func:`load_images` (so a file that passes here loads
    there) with memory that does not grow with ``len(paths)``.

    Returns
    -------
    positions : list of int
        Positions in ``paths`` of the usable images.
    failures : list of (int, str)
        Position and reason of each file that would be skipped.
    """
    positions, failures = [], []
    decoded = _decode_all(paths, size, channels, max_pixels, workers, progress, keep=False)
    for position, _, reason in decoded:
        if reason is None:
            positions.append(position)
        else:
            failures.append((position, reason))
    return positions, failures


def _decode_all(paths, size, channels, max_pixels, workers, progress, keep):
    """Yield ``(position, pixels or None, reason or None)`` in the order of ``paths``."""
    _check_target(size, channels)

    def attempt(path):
        try:
            pixels = _load(path, size, channels, max_pixels)
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


def load_npz(path):
    """Read images (and optional labels) from a ``.npz`` file, refusing pickled data.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``numpy.savez``/``savez_compressed`` with an array ``x`` of shape
        ``(N, H, W)`` or ``(N, H, W, C)``, C in {1, 3, 4}; optionally ``y`` (N integer
        labels) and ``class_names`` (array of strings).

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
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise UserError(f"npz file not found: {path}")
    with _open_npz(path) as data:
        if "x" not in data.files:
            found = ", ".join(data.files) or "nothing"
            raise UserError(
                f"{path}: no array named 'x' (found: {found}); save images with numpy.savez(path, x=images)"
            )
        x = _npz_array(data, "x", path)
        y = _npz_array(data, "y", path) if "y" in data.files else None
        names = _npz_array(data, "class_names", path) if "class_names" in data.files else None
    _check_x(x, path)
    return x, _checked_labels(y, len(x), path), _checked_class_names(names, y, path)


def _open_npz(path):
    # Checked before np.load, whose errors for these cases talk about pickles.
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if head == b"\x93NUMPY":
        raise UserError(
            f"{path}: is a single .npy array, not an .npz file; save it with numpy.savez(path, x=images)"
        )
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a valid .npz file (not a zip archive)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a valid .npz file ({_short(e)})") from None


def _npz_array(data, key, path):
    try:
        return data[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(
                f"{path}: array '{key}' holds Python objects (dtype=object); loading it would "
                "unpickle code, so it is refused: save it as a numeric or string array"
            ) from None
        raise UserError(f"{path}: array '{key}' cannot be read ({_short(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({_short(e)})") from None


def _check_x(x, path):
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise UserError(
            f"{path}: x must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {x.shape}"
        )
    if x.dtype.kind not in "biuf":
        raise UserError(f"{path}: x has dtype {x.dtype}; expected uint8 or float")
    if len(x) == 0:
        raise UserError(f"{path}: x holds no images")


def _checked_labels(y, n, path):
    if y is None:
        return None
    if y.ndim != 1:
        hint = " (one-hot? store y.argmax(axis=1))" if y.ndim == 2 else ""
        raise UserError(f"{path}: y must be one integer label per image; got shape {y.shape}{hint}")
    if len(y) != n:
        raise UserError(f"{path}: y has {len(y)} labels but x has {n} images")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise UserError(f"{path}: y must hold integer labels; got dtype {y.dtype}")
    return y.astype(np.int64)


def _checked_class_names(names, y, path):
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise UserError(
            f"{path}: class_names must be a 1-D array of strings; got {names.dtype} {names.shape}"
        )
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if y is not None and len(y) and int(y.max()) >= len(names):
        raise UserError(
            f"{path}: y has label {int(y.max())} but class_names lists only {len(names)} classes"
        )
    return names


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
    low, high = _finite_min_max(x)
    if low < 0:
        raise UserError(
            f"image array has negative values (min {low:g}); "
            "store uint8 images or floats in [0, 1] or [0, 255]"
        )
    if x.dtype.kind == "f":
        if high > 255.0:
            raise UserError(f"float image array has values up to {high:g}; expected [0, 1] or [0, 255]")
        return _float_top(high)
    if high > 65535:
        raise UserError(f"integer image array has values up to {high:g}; expected 8- or 16-bit values")
    return 255.0 if high <= 255 else 65535.0


def _array_to_uint8(image, top):
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]  # Pillow has no (H, W, 1) mode
    if image.dtype == np.uint8 and top == 255.0:
        return image
    if top == 65535.0:
        return _uint16_to_uint8(np.clip(image, 0, 65535))
    return _float_to_uint8(image, top)
