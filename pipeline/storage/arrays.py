"""Reading stored activations (the extract stage's zarr layout): lazy arrays and re-callable row chunks.

Used by the analysis stages and by the Dask engine, so it sits below both."""
from __future__ import annotations

import numpy as np

ZARR = "activations.zarr"


def open_activations(store):
    """``(root group, layer order, layer info)`` of a finished extract stage."""
    root = store.open_zarr(ZARR)
    return root, list(root.attrs["layer_order"]), dict(root.attrs["layers"])


def layer_array(root, info, reduction="mean"):
    """The ``(N, C)`` array of one layer (vector layers have one array whatever the reduction)."""
    key = "value" if info["kind"] == "vector" else reduction
    return root[f"{info['path']}/{key}"]


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
