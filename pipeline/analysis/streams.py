"""One pass over row chunks, folded into an accumulator: the shape of every streaming statistic.

``chunks`` (see :mod:`pipeline.analysis.neurons`) is a zero-argument callable returning an iterator over
row chunks. :func:`fold` runs ``update(acc, chunk, offset)`` over them in row order. A ``chunks``
object may run the pass itself instead, through a ``reduce(new, update)`` method (the Dask
engine's :class:`pipeline.engines.cluster.RowBlocks`): it fits one fresh accumulator per chunk
elsewhere and merges them in row order with the accumulator's ``merge``, which the accumulators
of this package make exact, so both ways give bit-for-bit the same result.
"""
from __future__ import annotations


def fold(chunks, new, update):
    """``acc = new()``, then ``update(acc, chunk, offset)`` for every chunk in order; returns ``acc``.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` yields row chunks (an array, or a list of arrays with the same rows).
    new : callable
        Makes an empty accumulator (it must be picklable for the Dask engine: a class or a
        ``functools.partial``, not a lambda over large data).
    update : callable
        ``update(acc, chunk, offset)``; ``offset`` is the index of the chunk's first row.
    """
    reduce = getattr(chunks, "reduce", None)
    if reduce is not None:
        return reduce(new, update)
    acc, offset = new(), 0
    for x in chunks():
        update(acc, x, offset)
        offset += len(x[0]) if isinstance(x, (list, tuple)) else len(x)
    return acc
