"""Which images a run uses: list the source, take the seeded sample, validate every image once.

The result is two tables: ``dataset`` (one row per image used, in a deterministic order) and
``skipped`` (one row per input that was not used, with the reason), and the list of classes.
Loading pixels for a batch goes through :func:`pixel_loader`, so folder and ``.npz`` data meet
the model in the same form.

Labels are dense codes: ``label`` is in ``0..K-1`` (-1 = unlabelled) for the K declared
classes, ``source_label`` is the label as the user gave it (class folder position or ``.npz``
``y`` value). ``classes["identity"]`` says whether the two are the same numbers, which is when
the model's output k can be class k.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.inputs import images
from pipeline.errors import UserError

SKIPPED_COLUMNS = ["path", "reason"]


def build_dataset(data_cfg, size, channels, seed) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
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
        ``index, path, label, source_label, class_name`` (and ``source_index`` for ``.npz``).
    skipped : DataFrame
        ``path, reason``.
    classes : dict
        ``{"names": [name of code 0, ..., K-1], "identity": bool}``. Every declared class is
        named, also those without images (an empty class folder). ``identity`` is True when
        code k is the user's label k.
    """
    if data_cfg.npz:
        return _npz_dataset(data_cfg, seed)
    return _folder_dataset(data_cfg, size, channels, seed)


def _folder_dataset(data_cfg, size, channels, seed):
    candidates, skipped = images.list_image_folder(data_cfg.images, data_cfg.follow_symlinks)
    # Every class folder is a class, as for keras.utils.image_dataset_from_directory: codes are positions.
    classes = {"names": [images.printable(n) for n in images.list_classes(data_cfg.images)], "identity": True}
    keep = images.stratified_sample(candidates["label"].to_numpy(), data_cfg.limit, seed)
    candidates = candidates.iloc[keep].reset_index(drop=True)
    hashes = {}
    good, failures = images.scan_images(candidates["path"].tolist(), (size[0], size[1]), channels,
                                        max_pixels=data_cfg.max_pixels, hashes=hashes)
    bad = pd.DataFrame([(candidates["path"].iloc[i], r) for i, r in failures], columns=SKIPPED_COLUMNS)
    dataset = candidates.iloc[sorted(good)].reset_index(drop=True)
    dataset.insert(0, "index", np.arange(len(dataset)))
    dataset.insert(3, "source_label", dataset["label"].to_numpy())
    dataset["content_hash"] = pd.Series([hashes[i] for i in sorted(good)], dtype=object)
    return dataset, pd.concat([skipped.reindex(columns=SKIPPED_COLUMNS), bad], ignore_index=True), classes


def _npz_dataset(data_cfg, seed):
    with images.open_npz(data_cfg.npz, data_cfg.max_pixels) as data:
        source = data.y if data.y is not None else np.full(len(data), -1, dtype=np.int64)
        labels, classes = dense_labels(source, data.class_names)
        _, nonfinite = images.scan_npz(data)  # also refuses out-of-range values, before any model work
        keep = images.stratified_sample(labels, data_cfg.limit, seed)
        digests = np.array(images.npz_digests(data, keep[~nonfinite[keep]]), dtype=object)
    paths = np.array([f"{data_cfg.npz}#{i}" for i in keep], dtype=object)
    skipped = pd.DataFrame({"path": paths[nonfinite[keep]], "reason": "image array contains NaN or Inf"},
                           columns=SKIPPED_COLUMNS)
    keep, paths = keep[~nonfinite[keep]], paths[~nonfinite[keep]]
    names = [classes["names"][code] if code >= 0 else None for code in labels[keep]]
    dataset = pd.DataFrame({"index": np.arange(len(keep)), "path": paths, "label": labels[keep],
                            "source_label": source[keep], "class_name": pd.Series(names, dtype=object),
                            "source_index": keep, "content_hash": digests})
    return dataset, skipped, classes


def recorded_hashes(dataset) -> np.ndarray:
    """The ``content_hash`` of every row of a ``dataset.parquet``, computed from the recorded paths
    for runs made before the column existed.

    Parameters
    ----------
    dataset : pandas.DataFrame
        ``path`` (a file, or ``<file.npz>#<row>``) and, for ``.npz`` runs, ``source_index``.

    Returns
    -------
    numpy.ndarray of str (object)
        :func:`~pipeline.inputs.images.file_digest` of each file, or
        :func:`~pipeline.inputs.images.array_digest` of each ``.npz`` row.

    Raises
    ------
    UserError
        A recorded file can no longer be read (moved, deleted): the hash cannot be recomputed.
    """
    if "content_hash" in dataset.columns and dataset["content_hash"].notna().all():
        return dataset["content_hash"].to_numpy(dtype=object)
    paths = dataset["path"].astype(str).tolist()
    if paths and all("#" in p and p.rsplit("#", 1)[1].isdigit() for p in paths):
        npz = {p.rsplit("#", 1)[0] for p in paths}
        if len(npz) == 1:
            return _npz_hashes(npz.pop(), dataset, paths)
    out = []
    for p in paths:
        try:
            out.append(images.file_digest(p))
        except OSError as e:
            raise UserError(f"this run was made before dataset.parquet had a content_hash column, and its image "
                            f"{p} can no longer be read ({e.strerror or e}) to compute it; rerun its extract "
                            "stage (python -m pipeline extract RUN --force)") from None
    return np.array(out, dtype=object)


def _npz_hashes(npz, dataset, paths):
    rows = (dataset["source_index"].to_numpy() if "source_index" in dataset.columns
            else np.array([int(p.rsplit("#", 1)[1]) for p in paths]))
    try:
        with images.open_npz(npz) as data:
            order = np.argsort(rows, kind="stable")
            digests = np.empty(len(rows), dtype=object)
            digests[order] = images.npz_digests(data, rows[order])
            return digests
    except (OSError, UserError) as e:
        raise UserError(f"this run was made before dataset.parquet had a content_hash column, and its images "
                        f"{npz} can no longer be read ({e}) to compute it; rerun its extract stage "
                        "(python -m pipeline extract RUN --force)") from None


def dense_labels(y, class_names=None):
    """Dense class codes for the labels of an ``.npz``.

    Parameters
    ----------
    y : numpy.ndarray of int64
        The user's labels, -1 = unlabelled (nothing below -1).
    class_names : list of str, optional
        Names of labels ``0..len(class_names)-1``; every label must be one of them.

    Returns
    -------
    codes : numpy.ndarray of int64
        In ``0..K-1``, -1 where ``y`` is -1.
    classes : dict
        ``{"names": [...], "identity": bool}`` as returned by :func:`build_dataset`.

    Notes
    -----
    With ``class_names``, or when the labels used are exactly ``0..K-1``, the codes are the
    labels. Otherwise (``y`` in {0, 1, 3000000}) the distinct labels are numbered in
    increasing order and named by their value ("0", "1", "3000000"), and ``identity`` is False.
    """
    if class_names is not None:
        return y, {"names": list(class_names), "identity": True}
    values = np.unique(y[y >= 0])
    names = [str(v) for v in values.tolist()]
    if np.array_equal(values, np.arange(len(values))):
        return y, {"names": names, "identity": True}
    codes = np.where(y >= 0, np.searchsorted(values, y), -1).astype(np.int64)
    return codes, {"names": names, "identity": False}


def pixel_loader(data_cfg, dataset, size, channels):
    """Return ``load(rows) -> uint8 (B, H, W, C)`` for positions into ``dataset``.

    Raises UserError when an image that passed validation can no longer be read (the file
    changed during the run): rerun with ``--force`` to rescan. An ``.npz`` is read a batch
    at a time (:func:`pipeline.inputs.images.open_npz`); the returned function keeps it open.
    """
    hw = (size[0], size[1])
    if data_cfg.npz:
        return _npz_loader(data_cfg, dataset, hw, channels)
    paths = dataset["path"].to_numpy()

    def load(rows):
        pixels, good, failures = images.load_images([paths[r] for r in rows], hw, channels,
                                                    max_pixels=data_cfg.max_pixels)
        if failures:
            pos, reason = failures[0]
            raise UserError(f"{paths[rows[pos]]} changed since it was checked ({reason}); rerun with --force")
        return pixels

    return load


def _npz_loader(data_cfg, dataset, hw, channels):
    data = images.open_npz(data_cfg.npz, data_cfg.max_pixels)
    source = dataset["source_index"].to_numpy()
    try:
        # One value range for the whole array: guessing per batch could read a dark 0-255 batch as 0-1.
        top, _ = images.scan_npz(data)
    except BaseException:
        data.close()
        raise
    if data.dtype == np.uint8 and data.shape[1:] == (*hw, channels):
        return lambda rows: data.read(source[rows])  # already what the model takes: no per-image work
    return lambda rows: images.convert_array_batch(data.read(source[rows]), hw, channels, value_range=top)
