"""TensorFlow for the maximize modules: imported once, quietly, with oneDNN off (DESIGN.md)."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from pipeline.backend.tf import tensorflow  # noqa: E402  (the flag must be set first)

tf = tensorflow()

__all__ = ["tf"]
