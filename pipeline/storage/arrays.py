"""The layout of ``activations.zarr``, written and read here only: group and array names, how arrays
are created and their chunks stored, and reading them back (lazy arrays, re-callable row chunks).

Used by extraction (both engines), the analysis stages, the report and ``load_run``."""
from __future__ import annotations

import numpy as np

from pipeline.storage.catalog import path

ZARR = path("activations")
RESERVED = ("logits", "thumbnails")
UNCOMPRESSED = ("thumbnails",)  # see create_array


def layer_path(layer: str) -> str:
    """Group of a layer in ``activations.zarr``: its name, unless that clashes with a root array.

    A layer named ``logits`` (common) would collide with the model's ``logits`` array, so its
    group becomes ``logits.layer``; the mapping is kept in the store's ``layers`` attribute.
    """
    return f"{layer}.layer" if layer.split("/")[0] in RESERVED else layer


def layer_arrays(layer, kind, width, reductions, spatial_samples, dtype) -> dict:
    """``{key: (row shape, dtype)}`` of the arrays one extracted layer is stored as.

    A feature map (``kind == "map"``) gives ``<group>/<reduction>`` ``(C,)`` per reduction, plus
    ``<group>/spatial`` ``(k, C)`` and ``<group>/spatial_pos`` ``(k, 2)`` int32 when ``k =
    spatial_samples > 0``; a vector layer gives ``<group>/value`` ``(width,)``.
    """
    group = layer_path(layer)
    if kind != "map":
        return {f"{group}/value": ((width,), dtype)}
    arrays = {f"{group}/{r}": ((width,), dtype) for r in reductions}
    if spatial_samples:
        arrays[f"{group}/spatial"] = ((spatial_samples, width), dtype)
        arrays[f"{group}/spatial_pos"] = ((spatial_samples, 2), "int32")
    return arrays


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


def create_array(root, key, shape, rows, dtype):
    """Create ``root[key]`` of ``shape`` in chunks of ``rows`` rows, the way every extracted array is stored.

    Zstandard level 1, not zarr's default level 3: on real activations it keeps all but 1-2 % of
    the compression (ratios 1.16 vs 1.18 on ResNet50 activations) at 1.15-3x the speed, and on a
    CPU compression takes its time from the forward pass.

    ``thumbnails`` (:data:`UNCOMPRESSED`) are stored as they are: on photographs zstd saved 6 % of
    their size (ratio 1.06 at level 1, 1.03 at level -1, over 1024 64x64 crops of five photos) for
    24 ms of CPU per 1024 thumbnails, the longest single job of a chunk group's write. Synthetic or
    flat images compress better (1.3 on the demo's), but their thumbnails are small either way.
    """
    import zarr

    compressors = None if key in UNCOMPRESSED else zarr.codecs.ZstdCodec(level=1)
    return root.create_array(key, shape=shape, chunks=(rows, *shape[1:]), dtype=dtype, fill_value=0,
                             compressors=compressors)


def ensure_array(root, key, n, row_shape, rows, dtype):
    """Create ``root[key]`` (``n`` rows, chunks of ``rows``) unless it exists."""
    if key not in root:
        create_array(root, key, (n, *row_shape), rows, dtype)


def writable(array):
    """``array`` set to store every chunk as given.

    By default zarr compares each chunk with the fill value first, to skip storing empty ones:
    a full extra pass over the data (a quarter of a chunk write's CPU time). Extracted chunks
    are almost never all zero, and storing one that is gives the same values on reading.
    """
    with_config = getattr(array, "with_config", None)  # zarr >= 3.1; older: the default, just slower
    return with_config({"write_empty_chunks": True}) if with_config else array


def chunk_files(array):
    """``put(start, value)``: whole chunks of ``array`` from row ``start`` written straight to their files.

    Through zarr, ``array[a:b] = value`` hops from the calling thread to zarr's event-loop thread
    and on to its codec threads: about 2.6 ms of CPU per chunk beyond the compression itself
    (0.3 ms for a 256 KB chunk), ~30 ms per chunk group of the benchmark's 16 arrays, taken from
    the forward pass on a 2-core machine. For the layout every extracted array has (a local
    store, zarr format 3, one regular chunk grid, the bytes codec little-endian, then zstd without
    checksum or no compressor) ``put`` writes the very bytes zarr would (an edge chunk padded with
    the fill value, each file written to a temporary name and renamed, as zarr's local store does)
    in the calling thread; ``tests/test_extract.py`` compares them with zarr's own. Any other layout: ``None``,
    and the caller writes through zarr.

    ``put`` takes rows starting at a chunk boundary, covering whole chunks (the last one may end
    at the array's end).
    """
    import os
    import uuid
    from pathlib import Path

    import numcodecs
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    try:
        meta, where = array.metadata, array.store_path
        codecs, chunk = tuple(meta.codecs), tuple(meta.chunk_grid.chunk_shape)
        compressor = codecs[1:]
        plain = (meta.zarr_format == 3 and isinstance(where.store, LocalStore) and len(codecs) in (1, 2)
                 and isinstance(codecs[0], BytesCodec) and getattr(codecs[0].endian, "value", "little") == "little"
                 and all(isinstance(c, ZstdCodec) and not c.checksum for c in compressor)
                 and chunk[1:] == tuple(array.shape[1:]))
    except (AttributeError, TypeError):
        return None
    if not plain:
        return None
    folder = Path(where.store.root) / where.path
    encode = numcodecs.Zstd(level=compressor[0].level).encode if compressor else memoryview
    dtype = np.dtype(array.dtype).newbyteorder("<")
    fill, rows = meta.fill_value, chunk[0]

    def put(start, value):
        if start % rows:
            raise ValueError(f"row {start} is not at a chunk boundary ({rows} rows)")
        for i in range(0, len(value), rows):
            block = np.ascontiguousarray(value[i:i + rows], dtype=dtype)
            if len(block) < rows:  # the last chunk: zarr stores it whole, padded
                padded = np.full(chunk, fill, dtype)
                padded[:len(block)] = block
                block = padded
            path = folder / meta.encode_chunk_key(((start + i) // rows,) + (0,) * (len(chunk) - 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            try:
                temp.write_bytes(encode(block))
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise

    return put


def zarr_put(array):
    array = writable(array)

    def put(start, value):
        array[start:start + len(value)] = value

    return put
