"""Extract stage: per-layer activations of every image, stored in ``activations.zarr``.

The stage declares what it depends on; the work runs on an engine: this process
(:mod:`pipeline.engines.local`) or a Dask cluster (:mod:`pipeline.engines.dask_extract`), both
built from the same plan (:mod:`pipeline.extraction.plan`).
"""
from __future__ import annotations

from pipeline.extraction.plan import extract_params, input_hashes
from pipeline.stages.base import Stage


def run(ctx):
    if ctx.cfg.engine == "dask":  # shards on Dask workers; same arrays
        from pipeline.engines import dask_extract

        return dask_extract.run(ctx)
    from pipeline.engines import local

    return local.run(ctx)


STAGE = Stage(name="extract", deps=(), params=extract_params, inputs=input_hashes,
              outputs=("dataset", "skipped", "activations"), run=run, version="1")
