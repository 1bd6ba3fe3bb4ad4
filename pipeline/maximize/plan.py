"""What the maximize stage renders: layers, units, cluster directions, classes, and their seeds.

Every image has a :class:`Target`: the direction in channel space it maximises (a one-hot
vector for a unit or a class, the normalised centroid for a cluster), its own seed, and the
file it is stored in. No TensorFlow here.

Examples
--------
>>> parse_units("top:3")
('top', 3)
>>> select_units("top:2", np.array([0.5, 3.0, 1.0]))
[1, 2]
>>> t = unit_targets("conv", [1], n_channels=3, seed=0)[0]
>>> t.key, t.vector.tolist(), t.path
('unit:1', [0.0, 1.0, 0.0], 'maximize/conv/unit_0001.png')
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.errors import UserError
from pipeline.storage.arrays import layer_path
from pipeline.storage.catalog import path as artifact_path

#: ``layer`` value, folder and objective of class images (the model's pre-softmax outputs).
CLASSES = "logits"


@dataclass
class Target:
    """One image to render.

    Attributes
    ----------
    kind : str
        ``unit``, ``cluster`` or ``class``.
    layer : str
        Layer name (``logits`` for classes).
    index : int
        Channel, cluster id or class.
    vector : ndarray
        Direction in the layer's channel space (unit length).
    seed : int
        Seeds this image's start and its transforms.
    key : str
        Identity used to resume (changes if a cluster's centroid changes).
    path : str
        PNG path in the run directory.
    """

    kind: str
    layer: str
    index: int
    vector: np.ndarray
    seed: int
    key: str
    path: str
    class_name: Optional[str] = None


def parse_units(spec):
    """``maximize.units`` as ``("all",)``, ``("top", K)`` or ``("list", [channels])``."""
    if spec == "all":
        return ("all",)
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*top\s*:\s*(\d+)\s*", spec)
        if not match or int(match.group(1)) < 1:
            raise UserError(f"config key 'maximize.units': use all, top:K (K ≥ 1) or a list of channels, got {spec!r}")
        return ("top", int(match.group(1)))
    channels = [int(c) for c in spec]
    if any(c < 0 for c in channels):
        raise UserError(f"config key 'maximize.units': channels must be ≥ 0, got {spec!r}")
    return ("list", list(dict.fromkeys(channels)))


def select_units(spec, dataset_max) -> list[int]:
    """Channels to render for a layer.

    ``all``: every channel. ``top:K``: the K channels with the highest dataset maximum (of the
    stored per-image activation; ties by index). A list: those channels that the layer has.
    """
    how = parse_units(spec)
    n = len(dataset_max)
    if how[0] == "all":
        return list(range(n))
    if how[0] == "top":
        order = np.argsort(-np.nan_to_num(np.asarray(dataset_max, np.float64), nan=-np.inf), kind="stable")
        return sorted(int(c) for c in order[:how[1]])
    return [c for c in how[1] if c < n]


def choose_layers(spec, order, kinds) -> list[str]:
    """Layers to render from the extracted ones.

    Parameters
    ----------
    spec : "all", "last" or list of str
        ``last`` is the deepest extracted feature map (the last layer if none is a map).
    order : list of str
        Extracted layers in order.
    kinds : dict
        ``{layer: "map" | "vector"}``.
    """
    if spec == "all":
        return list(order)
    if spec == "last":
        maps = [n for n in order if kinds.get(n) == "map"]
        return [maps[-1] if maps else order[-1]] if order else []
    missing = [n for n in spec if n not in order]
    if missing:
        raise UserError(f"config key 'maximize.layers': layer '{missing[0]}' was not extracted "
                        f"(extracted: {', '.join(order)})")
    return list(dict.fromkeys(spec))


def image_seed(seed, kind, layer, index) -> int:
    """The seed of one image: a function of the run seed and what the image shows, nothing else."""
    entropy = [int(seed) % 2 ** 32, zlib.crc32(kind.encode()), zlib.crc32(layer.encode()), int(index) % 2 ** 32]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def folder(layer, kind="unit") -> str:
    """Run-directory folder of a layer's images (classes: ``maximize/logits``)."""
    return artifact_path("maximize_images", CLASSES if kind == "class" else layer_path(layer))


def _one_hot(i, n):
    v = np.zeros(n, np.float32)
    v[i] = 1.0
    return v


def unit_targets(layer, channels, n_channels, seed) -> list[Target]:
    """One target per channel: the one-hot direction, i.e. the channel-mean objective."""
    return [Target("unit", layer, c, _one_hot(c, n_channels), image_seed(seed, "unit", layer, c), f"unit:{c}",
                   f"{folder(layer)}/unit_{c:04d}.png") for c in channels]


def cluster_targets(layer, clusters, n_channels, seed):
    """One target per cluster centroid of ``layer``; returns ``(targets, skipped messages)``.

    ``clusters`` is an iterable of ``(cluster id, centroid)``. Centroids are normalised to unit
    length; noise (id < 0), wrong-length and zero centroids are skipped.
    """
    targets, skipped = [], []
    for cid, centroid in clusters:
        v = np.asarray(centroid, np.float64).ravel()
        norm = float(np.linalg.norm(v)) if v.size == n_channels and np.all(np.isfinite(v)) else 0.0
        if int(cid) < 0:
            continue
        if norm == 0.0:
            skipped.append(f"cluster {cid} of {layer}: centroid has {v.size} values (need {n_channels}, "
                           "not all zero, finite)")
            continue
        v = (v / norm).astype(np.float32)
        digest = hashlib.sha256(np.round(v, 6).tobytes()).hexdigest()[:8]
        targets.append(Target("cluster", layer, int(cid), v, image_seed(seed, "cluster", layer, cid),
                              f"cluster:{cid}:{digest}", f"{folder(layer)}/cluster_{int(cid):03d}.png"))
    return targets, skipped


def class_targets(n_classes, seed, class_names=None) -> list[Target]:
    """One target per class logit."""
    names = class_names or {}
    return [Target("class", CLASSES, k, _one_hot(k, n_classes), image_seed(seed, "class", CLASSES, k), f"class:{k}",
                   f"{folder(CLASSES, 'class')}/class_{k:03d}.png", names.get(k)) for k in range(n_classes)]


def batches(items, batch_size):
    """Split into equally sized batches of at most ``batch_size`` (fewer compiled shapes, less padding)."""
    if not items:
        return []
    n_batches = -(-len(items) // batch_size)
    size = -(-len(items) // n_batches)
    return [items[i:i + size] for i in range(0, len(items), size)]
