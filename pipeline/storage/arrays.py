"""Reading stored activations (the extract stage's zarr layout): lazy arrays and re-callable row chunks.

Used by the analysis stages and by the Dask engine, so it sits below both."""
from __future__ import annotations

import numpy as np

from pipeline.storage.catalog import path

ZARR = path("activations")


def open_activations(store):
    """``(root group, layer order, layer info)`` of a finished extract stage."""
    root = store.open_zarr(ZARR)
    return root, list(root.attrs["layer_order"]), dict(root.attrs["layers"])


def array_key(info, reduction="mean") -> str:
    """Key of a layer's array in the store: ``<group>/<reduction>``; a vector layer's one array is
    ``<group>/value`` whichever of ``mean``/``max`` is asked for."""
    key = "value" if info["kind"] == "vector" and reduction in ("mean", "max") else reduction
    return f"{info['path']}/{key}"


def layer_array(root, info, reduction="mean"):
    """The ``(N, C)`` array of one layer (vector layers have one array whatever the reduction)."""
    return root[array_key(info, reduction)]


def stored_array(root, info, reduction="mean"):
    """``(array, key)`` of a layer: ``reduction`` for maps when stored, else ``mean``, else ``max``
    (vector layers: their one array); ``(None, None)`` when the layer has none."""
    group = root[info["path"]]
    keys = list(group.array_keys())
    for key in ((reduction, "mean", "max") if info["kind"] == "map" else ("value",)):
        if key in keys:
            return group[key], key
    return None, None


def chunker(arrays, rows=4096):
    """Return ``chunks()`` yielding float32 row blocks of one array, or lists of blocks of several.

    Reading a few thousand rows at a time keeps memory independent of the number of images.
    """
    single = not isinstance(arrays, (list, tuple))
    arrays = [arrays] if single else list(arrays)
    n = arrays[0].shape[0]

    def chunks():
        for start in range(0, n, rows):
            block = [np.asarray(a[start:start + rows], dtype=np.float32) for a in arrays]
            yield block[0] if single else block

    return chunks
