"""Images of the report: dataset thumbnails, copied maximization images, figures, atlases.

Everything lands under ``img/`` of the report folder, so the folder is self-contained. Dataset
thumbnails come from the ``thumbnails`` array of ``activations.zarr`` (never the user's files);
pages ask for them while they are built and :meth:`Assets.flush` writes each one once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report.atlas import to_pil


class Assets:
    """Writes the report's image files and hands out their relative paths.

    Parameters
    ----------
    root : Path
        The report folder being built.
    data : ReportData
    options : ReportConfig
    """

    def __init__(self, root, data, options):
        self.root = Path(root)
        self.data = data
        self.options = options
        arrays = data.run.arrays
        self.thumbs = arrays["thumbnails"] if "thumbnails" in arrays else None
        self._wanted = set()
        self._copied = {}
        self.thumb_px = self._thumb_px()

    def _thumb_px(self):
        if self.thumbs is None:
            return 0
        return min(max(self.thumbs.shape[1:3]), self.options.thumbnail_size)

    # -- dataset thumbnails --

    def dataset_image(self, index):
        """Relative path of image ``index``'s thumbnail (written by :meth:`flush`), or None."""
        index = int(index)
        if self.thumbs is None or not 0 <= index < self.thumbs.shape[0]:
            return None
        self._wanted.add(index)
        return f"img/data/{index}.png"

    def read_thumbnails(self, indices, batch=1024) -> dict:
        """``{index: uint8 array (h, w, C)}`` read from the run's thumbnails, in sorted batches."""
        if self.thumbs is None:
            return {}
        idx = np.unique(np.asarray(list(indices), dtype=np.int64))
        idx = idx[(idx >= 0) & (idx < self.thumbs.shape[0])]
        out = {}
        for start in range(0, len(idx), batch):
            part = idx[start:start + batch]
            for i, img in zip(part, self.thumbs.oindex[part]):
                out[int(i)] = img
        return out

    def flush(self) -> int:
        """Write every thumbnail asked for; returns how many."""
        from PIL import Image

        folder = self.root / "img" / "data"
        folder.mkdir(parents=True, exist_ok=True)
        wanted = sorted(self._wanted)
        for start in range(0, len(wanted), 2048):
            for index, array in self.read_thumbnails(wanted[start:start + 2048]).items():
                img = to_pil(array)
                if max(img.size) > self.options.thumbnail_size:
                    img.thumbnail((self.options.thumbnail_size,) * 2, Image.Resampling.LANCZOS)
                save_small_png(img, folder / f"{index}.png")
        return len(wanted)

    # -- maximization images (PNG files of the run directory) --

    def run_image(self, relpath, name, max_size=None, folder="max"):
        """Copy a PNG of the run directory into the report (downscaled); None if unusable.

        ``relpath`` comes from a run table (``maximize/index.parquet``, ``probes/index.parquet``):
        it must stay inside the run directory. ``max_size`` (px, longer side) defaults to
        ``report.image_size``; the copy goes to ``img/<folder>/<name>.png``.
        """
        if relpath is None or (isinstance(relpath, float) and np.isnan(relpath)):
            return None
        key = str(relpath)
        if key in self._copied:
            return self._copied[key]
        out = None
        run_root = self.data.path.resolve()
        source = (run_root / key).resolve()
        if not source.is_relative_to(run_root) or not source.is_file():
            self.data.notes.append(f"image {key} is missing or outside the run directory; not shown")
        else:
            out = self._copy_png(source, f"{folder}/{name}", max_size or self.options.image_size)
        self._copied[key] = out
        return out

    def _copy_png(self, source, name, size):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(source) as img:
                img.load()
                img = img.convert("RGBA" if "A" in img.getbands() else ("L" if img.mode == "L" else "RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            self.data.notes.append(f"image {source.name} could not be read ({type(exc).__name__}); not shown")
            return None
        if max(img.size) > size:
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
        rel = f"img/{name}.png"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_small_png(img, self.root / rel)
        return rel

    # -- generated pictures --

    def figure(self, fig, name) -> str:
        from pipeline.report.figures import save_png

        rel = f"img/fig/{name}.png"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(fig, self.root / rel)
        fig.clear()
        return rel

    def picture(self, img, name) -> str:
        rel = f"img/fig/{name}.png"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_small_png(img, self.root / rel)
        return rel


def save_small_png(img, path) -> None:
    """Save as PNG; RGB images as 256-colour palette PNGs (dithered), about 3x smaller than
    true-colour ones and indistinguishable at thumbnail size."""
    from PIL import Image

    if img.mode == "RGB":
        img = img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
    img.save(path, format="PNG", optimize=True)
