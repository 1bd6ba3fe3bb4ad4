"""All reading and writing of a run directory. Every write is atomic: temp path, then rename.

Stages never touch files; they receive and return arrays and DataFrames, and the runner hands
those to this store.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError

PARTIAL = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunStore:
    """One run directory.

    Parameters
    ----------
    root : str or Path
        The run directory; created on first write.
    """

    def __init__(self, root):
        self.root = Path(root)

    def path(self, name) -> Path:
        return self.root / name

    def exists(self, name) -> bool:
        return self.path(name).exists()

    @contextmanager
    def _atomic_file(self, name, suffix=""):
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are meant to be shared
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_table(self, name, df: pd.DataFrame) -> None:
        """Write a DataFrame as parquet (``name`` ends in ``.parquet``) or CSV (``.csv``)."""
        with self._atomic_file(name) as tmp:
            if str(name).endswith(".csv"):
                df.to_csv(tmp, index=False)
            else:
                df.to_parquet(tmp, index=False)

    def read_table(self, name) -> pd.DataFrame:
        p = self.path(name)
        if str(name).endswith(".csv"):
            return pd.read_csv(p, keep_default_na=False) if p.stat().st_size else pd.DataFrame()
        return pd.read_parquet(p)

    def write_json(self, name, obj) -> None:
        with self._atomic_file(name) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def read_json(self, name, default=None):
        p = self.path(name)
        if not p.exists():
            return default
        return json.loads(p.read_text())

    def write_bytes(self, name, data: bytes) -> None:
        with self._atomic_file(name) as tmp:
            tmp.write_bytes(data)

    # -- directories built in place, then published by rename (zarr stores, image folders) --
    # A ``.partial`` folder is only reused or deleted when this tool made it: a hidden sibling
    # file marks it (a file inside would be wiped by zarr's mode="w"). Inside a run directory,
    # which is ours as a whole, older unmarked ones count as ours too.

    def _partial_marker(self, name) -> Path:
        target = self.path(name)
        return target.with_name(f".{target.name}{PARTIAL}.pipeline")

    def _own_partial(self, name) -> bool:
        from pipeline.storage.rundir import owned

        return self._partial_marker(name).exists() or owned(self.root)

    def _refuse_foreign_partial(self, name) -> None:
        p = self.path(str(name) + PARTIAL)
        if p.exists() and not self._own_partial(name):
            raise UserError(f"{p} exists and was not made by this tool; move it away or choose another "
                            "output folder — nothing was changed")

    def partial_dir(self, name) -> Path:
        """Where a directory output is built; it survives a crash so work can resume."""
        self._refuse_foreign_partial(name)
        p = self.path(str(name) + PARTIAL)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._partial_marker(name).touch()
        p.mkdir(exist_ok=True)
        return p

    def discard_partial(self, name) -> None:
        """Delete an unfinished build of ``name``; refuses one this tool did not make."""
        self._refuse_foreign_partial(name)
        shutil.rmtree(self.path(str(name) + PARTIAL), ignore_errors=True)
        self._partial_marker(name).unlink(missing_ok=True)

    def publish_dir(self, name) -> None:
        """Replace ``name`` by its finished ``.partial`` build."""
        target, built = self.path(name), self.path(str(name) + PARTIAL)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(built, target)
        self._partial_marker(name).unlink(missing_ok=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, name) -> None:
        p = self.path(name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def open_zarr(self, name, mode="r"):
        import zarr

        return zarr.open_group(str(self.path(name)), mode=mode)
