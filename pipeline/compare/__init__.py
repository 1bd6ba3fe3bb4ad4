"""Compare two runs over the same images: ``python -m pipeline compare RUN_A RUN_B``.

:func:`compare_runs` (paths in; writes the comparison folder and its page; returns the tables)
is the public entry point; :mod:`pipeline.compare.analysis` holds the pure computations.
"""
from pipeline.compare.run import CompareResult, compare_runs, default_out

__all__ = ["CompareResult", "compare_runs", "default_out"]
