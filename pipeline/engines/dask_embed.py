"""Embedding at scale on Dask: fit the map on a sample here, place the rest in parallel on the workers.

Above ``embed.max_fit`` points :func:`pipeline.analysis.embedding.embed` fits a t-SNE/UMAP map
(:class:`~pipeline.analysis.embedding.TSNEMap` / :class:`~pipeline.analysis.embedding.UMAPMap`) on
a seeded sample and places the other points chunk by chunk with the map's ``transform``. Each
chunk's placement depends only on the fitted map and the chunk, so the chunks can go to different
workers: this engine is only the ``placer`` hook of that function. The fitted map is shipped once
to every worker (``scatter``), the chunks (the same ones as the local engine's) are placed there,
and the result is bit-for-bit the local engine's.
"""
from __future__ import annotations

from functools import partial


def embed(x, method, cfg, **kw):
    """:func:`pipeline.analysis.embedding.embed` with the non-fitted points placed on ``cfg``'s cluster.

    Parameters are those of :func:`pipeline.analysis.embedding.tsne_2d` /
    :func:`~pipeline.analysis.embedding.umap_2d`. With at most ``max_fit`` points nothing is placed,
    everything runs here and no cluster is contacted.
    """
    from pipeline.analysis import embedding as E

    return E.embed(x, method, placer=partial(place_on_cluster, cfg), **kw)


def place_on_cluster(cfg, fitted, chunks):
    """A ``placer`` for :func:`pipeline.analysis.embedding.embed`: ``fitted.transform`` of each chunk on a worker.

    Yields the chunks' positions in order, releasing each one's future once it is taken.
    """
    from pipeline.engines import cluster as distributed

    client = distributed.client_for(cfg)
    # Shipped once to every worker, pickled whole (the map object keeps openTSNE's embedding, an
    # ndarray subclass that Dask would otherwise ship as a plain array, inside it).
    [remote] = client.scatter([fitted], broadcast=True, hash=False)
    futures = [client.submit(_transform, remote, chunk, pure=False) for chunk in chunks]
    for future in futures:
        yield future.result()
        future.release()


def _transform(fitted, chunk):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fitted.transform(chunk)
