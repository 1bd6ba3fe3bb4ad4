"""Exports of a run for other tools: TensorBoard Projector files for one layer."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.storage.rundir import foreign_folder
from pipeline.report.names import slug

EXPORT_MARKER = ".pipeline-export"  # marks a folder this command wrote, so a rerun may overwrite it
SPRITE_MAX = 8192  # TensorBoard refuses sprite sheets larger than this many pixels a side


# A layer name used as a folder name as it is: lower case (no clash on case-insensitive file
# systems), no separator, not hidden, short.
_PLAIN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def folder_name(layer: str) -> str:
    """The default Projector folder of ``layer``: its name when that is a plain file name, else its
    collision-free :func:`pipeline.report.names.slug` (``outer/inner`` -> ``outer-inner-1a2b3c4d``)."""
    return layer if _PLAIN.fullmatch(layer) else slug(layer)


def sprite_sheet(thumbnails: np.ndarray) -> tuple[np.ndarray, int]:
    """Tile ``(N, h, w, C)`` thumbnails row-major into one square sheet within TensorBoard's limit.

    Returns the sheet (uint8, RGB) and the side of one cell in pixels.
    """
    n, h, w = thumbnails.shape[:3]
    per_row = math.ceil(math.sqrt(n))
    cell = min(max(h, w), SPRITE_MAX // per_row)
    if cell < 1:
        raise UserError(f"{n} images are too many for one Projector sprite sheet")
    from PIL import Image

    sheet = np.zeros((per_row * cell, per_row * cell, 3), np.uint8)
    for i, thumb in enumerate(thumbnails):
        img = Image.fromarray(thumb[..., 0] if thumb.shape[-1] == 1 else thumb).convert("RGB")
        r, c = divmod(i, per_row)
        sheet[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = np.asarray(img.resize((cell, cell)))
    return sheet, cell


def projector_files(vectors, dataset, thumbnails=None) -> dict:
    """The contents of a TensorBoard Projector folder, as ``{file name: bytes or array}``.

    Parameters
    ----------
    vectors : ndarray of shape (N, C)
    dataset : DataFrame
        ``index, path, label, class_name`` rows matching ``vectors``.
    thumbnails : ndarray of shape (N, h, w, C), optional
        Makes a sprite sheet so the Projector shows each point's image.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    tensors = "\n".join("\t".join(f"{v:.6g}" for v in row) for row in vectors) + "\n"
    classes = dataset["class_name"].fillna("").astype(str).str.replace(r"[\t\n\r]", " ", regex=True)
    names = dataset["path"].astype(str).map(lambda p: Path(p).name).str.replace(r"[\t\n\r]", " ", regex=True)
    metadata = "index\tclass\tfile\n" + "".join(
        f"{i}\t{c}\t{f}\n" for i, c, f in zip(dataset["index"], classes, names))
    config = ['embeddings {', '  tensor_path: "tensors.tsv"', '  metadata_path: "metadata.tsv"']
    files = {"tensors.tsv": tensors.encode(), "metadata.tsv": metadata.encode()}
    if thumbnails is not None:
        sheet, cell = sprite_sheet(thumbnails)
        files["sprite.png"] = sheet
        config += ['  sprite {', '    image_path: "sprite.png"', f'    single_image_dim: {cell}',
                   f'    single_image_dim: {cell}', '  }']
    files["projector_config.pbtxt"] = ("\n".join(config + ["}"]) + "\n").encode()
    return files


def export_projector(run_dir, layer, out=None, reduction="mean") -> Path:
    """Write TensorBoard Projector files for ``layer`` of a run; returns the folder.

    Open with ``tensorboard --logdir <folder>`` (Projector tab), or load ``tensors.tsv`` and
    ``metadata.tsv`` at projector.tensorflow.org. A folder holding files this tool did not
    write is refused; the run directory is locked while writing.
    """
    from pipeline.storage.results import Run
    from pipeline.storage.rundir import hold

    run = Run(run_dir)
    vectors = run.activations(layer, reduction)[:]
    thumbs = run.arrays["thumbnails"][:] if "thumbnails" in run.arrays else None
    folder = Path(out) if out else run.path / "projector" / folder_name(layer)
    _check_export_folder(folder)
    files = {**projector_files(vectors, run.dataset, thumbs), EXPORT_MARKER: b"written by python -m pipeline export\n"}
    with hold(run.path):
        _write_files(run, folder, files)
    return folder


def _check_export_folder(folder) -> None:
    """Refuse a folder holding files this tool did not write (they would be overwritten)."""
    if foreign_folder(folder, EXPORT_MARKER):
        raise UserError(f"{folder} exists and was not written by `pipeline export`; choose another --out "
                        "(an empty or new folder) — nothing was changed")


def _write_files(run, folder, files) -> None:
    import io

    from PIL import Image

    for name, content in files.items():
        if isinstance(content, np.ndarray):
            buf = io.BytesIO()
            Image.fromarray(content).save(buf, format="PNG")
            content = buf.getvalue()
        run.store.write_bytes(folder.relative_to(run.path) / name if folder.is_relative_to(run.path)
                              else folder.resolve() / name, content)
