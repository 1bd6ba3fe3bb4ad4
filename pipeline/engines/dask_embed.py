"""Embedding at scale on Dask: fit the map on a sample here, place the rest in parallel on the workers.

Above ``embed.max_fit`` points the local engine fits t-SNE/UMAP on a seeded sample and places the
other points chunk by chunk into that fixed map (openTSNE ``prepare_partial`` + ``optimize``,
UMAP ``transform``). Each chunk's placement depends only on the fitted map and the chunk, so
the chunks can go to different workers: the fitted model is shipped once to every worker
(``scatter``), the chunks (the same ones as the local engine's) are placed there, and the result
is bit-for-bit the local engine's.
"""
from __future__ import annotations

import numpy as np


def embed(x, method, cfg, *, random_state=0, max_fit=10000, chunk_size=None, **kw):
    """:func:`pipeline.analysis.embedding.embed` with the placement of the non-fitted points on ``cfg``'s cluster.

    Parameters are those of :func:`pipeline.analysis.embedding.tsne_2d` / :func:`~pipeline.analysis.embedding.umap_2d`.
    With at most ``max_fit`` points nothing is placed and the local function runs here.
    """
    from pipeline.engines import cluster as distributed
    from pipeline.analysis import embedding as E

    x = E._as_matrix(x)
    if len(x) < E.MIN_POINTS or len(x) <= max_fit:
        return E.embed(x, method, random_state=random_state, max_fit=max_fit, chunk_size=chunk_size, **kw)
    seed = E._seed(random_state)
    fit_rows, rest = E._split_sample(len(x), max_fit, seed)
    xy = np.empty((len(x), 2), dtype=np.float32)
    if method == "tsne":
        model = E._tsne_fit(x[fit_rows], seed, kw.get("perplexity", 30.0), kw.get("negative_gradient_method"))
        xy[fit_rows] = np.asarray(model, dtype=np.float32)
        place = E._tsne_place
    elif method == "umap":
        model = E._umap_model(max(2, min(kw.get("n_neighbors", 15), max_fit - 1)), seed)
        xy[fit_rows] = model.fit_transform(x[fit_rows])
        place = _umap_place
    else:
        raise ValueError(f"unknown embedding method {method!r}: expected one of {list(E.METHODS)}")
    client = distributed.client_for(cfg)
    # Wrapped: Dask would ship openTSNE's embedding (an ndarray subclass) as a plain array.
    [fitted] = client.scatter([_Fitted(model)], broadcast=True, hash=False)
    pieces = E._chunks(rest, chunk_size or max_fit)
    futures = [client.submit(_place, place, fitted, x[rows], pure=False) for rows in pieces]
    for rows, future in zip(pieces, futures):
        xy[rows] = future.result()
        future.release()
    return xy


class _Fitted:
    """A fitted map, pickled whole when shipped to the workers."""

    def __init__(self, model):
        self.model = model


def _place(place, fitted, x_new):
    return place(fitted.model, x_new)


def _umap_place(model, x_new):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.transform(x_new)
