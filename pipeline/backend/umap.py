"""umap-learn, imported without TensorFlow and with numba's cache in a user folder.

Both work around how umap-learn and numba behave at import time, so they live with the other
library shims.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


def default_numba_cache_dir() -> None:
    """Point numba's on-disk JIT cache at a user folder unless the user chose one.

    Only effective before numba is first imported (numba reads it at import time).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    path = Path.home() / ".cache" / "pipeline-numba"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # unwritable home: numba keeps its default (next to the package, or none)
    os.environ["NUMBA_CACHE_DIR"] = str(path)


def import_umap():
    """``umap.umap_.UMAP`` without importing TensorFlow.

    ``umap/__init__.py`` imports ``parametric_umap``, which imports TensorFlow (seconds, and
    GBs of RAM). When TensorFlow is not loaded yet it is hidden for the duration of the import:
    umap then falls back to its placeholder ``ParametricUMAP`` (not used here) and TensorFlow
    stays importable afterwards. A thread importing TensorFlow during that window would fail.
    """
    default_numba_cache_dir()
    hide = "tensorflow" not in sys.modules
    if hide:
        sys.modules["tensorflow"] = None  # makes ``import tensorflow`` raise ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from umap.umap_ import UMAP
    finally:
        if hide and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return UMAP
