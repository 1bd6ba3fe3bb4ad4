"""Safe, stable file names for report pages and images.

Layer and class names come from the user's model and folders: they may contain ``/`` (nested
layers ``outer/inner``), spaces, markup or non-ASCII. A file name is a short ASCII slug for
people plus a hash of the exact name, so two names never share a file, even on case-insensitive
file systems or after the slug is cut short. The Projector export names its folders with the
same :func:`slug` (:func:`pipeline.orchestration.export.folder_name`).
"""
from __future__ import annotations

import hashlib
import re


def slug(name) -> str:
    """``"block 1/Conv"`` -> ``"block-1-conv-1a2b3c4d"``: ``[a-z0-9-]`` only, at most 49 characters."""
    text = str(name)
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"
    return f"{base}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def layer_page(layer) -> str:
    return f"layer-{slug(layer)}.html"


def units_page(layer, page: int) -> str:
    """The unit gallery of ``layer``, pages numbered from 1."""
    return f"layer-{slug(layer)}-units-{page}.html"


def class_page(class_name) -> str:
    return f"class-{slug(class_name)}.html"
