"""Who may write a run directory: ownership ("was it written by us?") and one writer at a time.

A run directory is shared state. Two processes writing one directory corrupt its arrays, and a
``--out`` pointing at a user's folder must never replace files of the same name. So:

* a folder is only written when it does not exist, is empty, or holds a pipeline manifest
  (:func:`claim`), and the manifest is created first, before any other file;
* every command that writes holds an exclusive ``fcntl.flock`` on ``<run>/.pipeline.lock``
  (:func:`hold`). The kernel drops the lock when the process exits, even after ``SIGKILL``, so a
  crashed run never leaves a stale lock; the file only records who held it last, for the message.

Read-only commands (``status``, ``layers``, ``plan``) take no lock.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage.catalog import path as artifact_path

MANIFEST = artifact_path("manifest")
LOCK = ".pipeline.lock"
_HELD: dict = {}  # resolved run directory -> nesting depth in this process (flock is per open file)


def owned(root) -> bool:
    """True when ``root`` holds a manifest this tool wrote (a JSON object with a ``stages`` map)."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict)


def check_writable(root) -> None:
    """Refuse, before any work, a ``root`` that is not ours or that another process is writing.

    Creates nothing; :func:`hold` checks again under the lock.

    Raises
    ------
    UserError
        ``root`` is a file, a folder with files the pipeline did not write, or locked.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"run directory {root} is a file; choose another --out")
    if root.is_dir() and not owned(root):
        foreign = sorted(p.name for p in root.iterdir() if p.name != LOCK)
        if foreign:
            shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
            raise UserError(f"{root} is not empty and was not written by this tool (it holds {shown}); "
                            "choose another --out (an empty or new folder) — nothing was changed")
    if root.is_dir() and not _HELD.get(root.resolve()) and locked(root):
        raise UserError(busy_message(root))


def foreign_folder(target, marker) -> str | None:
    """Why the pipeline may not replace ``target``, an output folder it marks with the file ``marker``.

    Returns
    -------
    str or None
        ``"file"`` when ``target`` is a file, ``"foreign"`` when it is a folder holding files but
        no ``marker`` (someone else's), ``None`` when it is missing, empty or ours.
    """
    target = Path(target)
    if not target.exists():
        return None
    if not target.is_dir():
        return "file"
    return "foreign" if not (target / marker).exists() and any(target.iterdir()) else None


def busy_message(root) -> str:
    return (f"run directory {root} is in use by {describe(holder(root))}; wait for it to finish "
            "(`python -m pipeline status` works meanwhile) or stop it")


def claim(root) -> None:
    """Make ``root`` a run directory (manifest first), or refuse when it belongs to someone else.

    Raises
    ------
    UserError
        As :func:`check_writable`, minus the lock test (the caller takes the lock next).
    """
    root = Path(root)
    if root.is_dir() and not owned(root):
        check_writable(root)
    elif root.exists() and not root.is_dir():
        check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    if not owned(root):
        _write_manifest(root, {"stages": {}})


def _write_manifest(root, manifest) -> None:
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST)


def holder(root) -> dict | None:
    """Who holds (or last held) the lock of ``root``: ``{pid, host, command, since}`` or None."""
    try:
        info = json.loads((Path(root) / LOCK).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def locked(root) -> bool:
    """True when another process holds ``root``'s lock right now."""
    import fcntl

    path = Path(root) / LOCK
    if not path.exists():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def describe(info) -> str:
    """One phrase naming a lock holder, for messages."""
    if not info:
        return "another process"
    return (f"process {info.get('pid', '?')} on {info.get('host', '?')} "
            f"(`{info.get('command', '?')}`, since {info.get('since', '?')})")


@contextmanager
def hold(root):
    """Claim ``root`` and hold its exclusive lock for the duration of the ``with`` block.

    Raises
    ------
    UserError
        Another process holds the lock (the message names it), or the folder is not ours.
    """
    import fcntl

    root = Path(root)
    key = root.resolve()
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    claim(root)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(busy_message(root)) from None
        _record_holder(fd)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
    finally:
        os.close(fd)  # closing releases the flock


def _record_holder(fd) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(["python -m pipeline", *sys.argv[1:]])[:200],
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
