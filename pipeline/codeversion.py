"""What version of the code produced a result: a hash of a module and everything it imports.

A stage is stale when the code that computed it changed. Hand-kept lists of "the modules this stage
depends on" drift (an edited helper left results marked done), so the list is computed: the
module's transitive imports within its own top-level package, function-level imports included, as
found by grimp's static import graph (nothing is imported or run to find them). The data files of
those packages (report templates, scripts, styles) count too.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def code_version(module: str) -> str:
    """Short hash of ``module``'s source and of every module of its package it imports, transitively.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"pipeline.stages.extract"``.

    Returns
    -------
    str
        8 hex digits; changes when any of those files changes.
    """
    h = hashlib.sha256()
    for name in sorted(imported_modules(module)):
        for path in _files_of(name):
            h.update(str(path.name).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:8]


def imported_modules(module: str) -> set[str]:
    """``module`` and every module of its top-level package it imports, directly or not."""
    graph = _graph(module.split(".")[0])
    found = {module} | set(graph.find_upstream_modules(module))
    # Importing a.b.c runs a/__init__ and a/b/__init__ too; the static graph lists only explicit imports.
    return found | {name.rsplit(".", k)[0] for name in found for k in range(1, name.count(".") + 1)}


@functools.lru_cache(maxsize=None)
def _graph(package: str):
    import grimp

    return grimp.build_graph(package, cache_dir=None)


def _files_of(module: str) -> list[Path]:
    """The module's source file; for a package, also the data files of its own (non-package) folders."""
    top, *rest = module.split(".")
    base = _package_dir(top).joinpath(*rest)
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    init = base / "__init__.py"
    return [init, *_data_files(base)] if init.is_file() else []


@functools.lru_cache(maxsize=None)
def _package_dir(package: str) -> Path:
    import importlib.util

    # Located, not imported: the top-level package's folder is where every module's file is.
    return Path(importlib.util.find_spec(package).origin).parent


def _data_files(folder: Path):
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name != "__pycache__" and not (entry / "__init__.py").exists():
            yield from (p for p in entry.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
