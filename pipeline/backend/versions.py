"""The TensorFlow and Keras versions the private-API shims were tested with, checked once per process.

Every shim in :mod:`pipeline.backend.keras_internals` and :mod:`pipeline.backend.tf_internals`
calls :func:`check` first. Outside the tested range (the ``install_requires`` pins in
``setup.cfg``) the shims still run, and fall back where their callers have a fallback, but the
private attributes they read may have moved: one :class:`UntestedVersionWarning` per package and
process says so.
"""
from __future__ import annotations

import re
import sys
import threading
import warnings

# ``>= low, < high``: the same bounds as setup.cfg's install_requires (tests/test_backend.py checks).
TESTED = {"tensorflow": ("2.18", "2.22"), "keras": ("3.14", "3.16")}

_checked: dict = {}  # package -> whether its version is in the tested range
_lock = threading.Lock()


class UntestedVersionWarning(UserWarning):
    """TensorFlow or Keras is outside the versions whose private APIs :mod:`pipeline.backend` was tested with."""


def installed_version(package) -> str | None:
    """The version of ``package``: its ``__version__`` once imported, else its distribution's; None if absent."""
    version = getattr(sys.modules.get(package), "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def release(version) -> tuple:
    """``"2.21.0rc1"`` -> ``(2, 21, 0)``: the numeric release, for comparisons."""
    try:
        from packaging.version import Version

        return Version(str(version)).release
    except (ImportError, ValueError):  # no packaging, or not PEP 440: take the leading numbers
        pass
    return tuple(int(part) for part in re.findall(r"\d+", str(version).split("+")[0])[:3])


def check(package) -> bool:
    """Whether ``package`` (``"tensorflow"`` or ``"keras"``) is in its tested range; warns once if not.

    The first call per package and process reads the version and, outside the range, emits one
    :class:`UntestedVersionWarning`; later calls return the remembered answer.
    """
    known = _checked.get(package)
    if known is not None:
        return known
    with _lock:
        if package in _checked:
            return _checked[package]
        low, high = TESTED[package]
        version = installed_version(package)
        ok = version is not None and release(low) <= release(version) < release(high)
        _checked[package] = ok
    if not ok:
        warnings.warn(
            f"{package} {version or '(version unknown)'} is outside the versions this tool was tested with "
            f"(>={low},<{high}); the private {package} APIs it uses (pipeline/backend) may have changed, "
            "so some results may fall back to simpler ones or fail", UntestedVersionWarning, stacklevel=3)
    return ok
