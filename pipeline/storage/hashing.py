"""Cheap fingerprints of the user's inputs (model files, image folders) for the runner's staleness rule."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_hash(path) -> str:
    """Content hash of a file, or of every file under a directory (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def listing_hash(root) -> str:
    """Hash of a folder's file names, sizes and modification times: cheap for 100k images."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            try:
                st = p.stat()
                h.update(os.fsencode(p.relative_to(root)) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(os.fsencode(p.relative_to(root)) + b"|unreadable\n")
    return h.hexdigest()[:16]
