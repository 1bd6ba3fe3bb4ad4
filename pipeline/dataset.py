"""Which images a run uses: list the source, take the seeded sample, validate every image once.

The result is two tables: ``dataset`` (one row per image used, in a deterministic order) and
``skipped`` (one row per input that was not used, with the reason). Loading pixels for a batch
goes through :func:`pixel_loader`, so folder and ``.npz`` data meet the model in the same form.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import images
from pipeline.errors import UserError

SKIPPED_COLUMNS = ["path", "reason"]


def build_dataset(data_cfg, size, channels, seed) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List, sample and validate the configured images.

    Parameters
    ----------
    data_cfg : pipeline.config.DataConfig
    size : (int, int)
        Model input (height, width).
    channels : int
        1 or 3.
    seed : int
        Seeds the ``limit`` sample.

    Returns
    -------
    dataset : DataFrame
        ``index, path, label, class_name`` (and ``source_index`` for ``.npz``).
    skipped : DataFrame
        ``path, reason``.
    """
    if data_cfg.npz:
        return _npz_dataset(data_cfg, seed)
    candidates, skipped = images.list_image_folder(data_cfg.images)
    keep = images.stratified_sample(candidates["label"].to_numpy(), data_cfg.limit, seed)
    candidates = candidates.iloc[keep].reset_index(drop=True)
    good, failures = images.scan_images(candidates["path"].tolist(), (size[0], size[1]), channels,
                                        max_pixels=data_cfg.max_pixels)
    bad = pd.DataFrame([(candidates["path"].iloc[i], r) for i, r in failures], columns=SKIPPED_COLUMNS)
    dataset = candidates.iloc[sorted(good)].reset_index(drop=True)
    dataset.insert(0, "index", np.arange(len(dataset)))
    return dataset, pd.concat([skipped.reindex(columns=SKIPPED_COLUMNS), bad], ignore_index=True)


def _npz_dataset(data_cfg, seed):
    x, y, class_names = images.load_npz(data_cfg.npz)
    labels = np.asarray(y, dtype=np.int64) if y is not None else np.full(len(x), -1, dtype=np.int64)
    keep = images.stratified_sample(labels, data_cfg.limit, seed)
    finite = np.array([np.isfinite(x[i]).all() if x.dtype.kind == "f" else True for i in keep], dtype=bool)
    paths = [f"{data_cfg.npz}#{i}" for i in keep]
    skipped = pd.DataFrame([(p, "image array contains NaN or Inf") for p, ok in zip(paths, finite) if not ok],
                           columns=SKIPPED_COLUMNS)
    keep = keep[finite]
    names = [(class_names[l] if class_names is not None and 0 <= l < len(class_names) else
              (str(l) if l >= 0 else None)) for l in labels[keep]]
    dataset = pd.DataFrame({"index": np.arange(len(keep)), "path": [f"{data_cfg.npz}#{i}" for i in keep],
                            "label": labels[keep], "class_name": names, "source_index": keep})
    return dataset, skipped


def pixel_loader(data_cfg, dataset, size, channels):
    """Return ``load(rows) -> uint8 (B, H, W, C)`` for positions into ``dataset``.

    Raises UserError when an image that passed validation can no longer be read (the file
    changed during the run): rerun with ``--force`` to rescan.
    """
    hw = (size[0], size[1])
    if data_cfg.npz:
        x, _, _ = images.load_npz(data_cfg.npz)
        source = dataset["source_index"].to_numpy()
        # One value range for the whole array: guessing per batch could read a dark 0-255 batch as 0-1.
        top = images.infer_value_range(x)
        if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (*hw, channels):
            return lambda rows: x[source[rows]]  # already what the model takes: no per-image work
        return lambda rows: images.convert_array_batch(x[source[rows]], hw, channels, value_range=top)
    paths = dataset["path"].to_numpy()

    def load(rows):
        pixels, good, failures = images.load_images([paths[r] for r in rows], hw, channels,
                                                    max_pixels=data_cfg.max_pixels)
        if failures:
            pos, reason = failures[0]
            raise UserError(f"{paths[rows[pos]]} changed since it was checked ({reason}); rerun with --force")
        return pixels

    return load
