"""Import TensorFlow with oneDNN off: its CPU kernels crash on some conv gradients (DESIGN.md)."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402  (the flag must be set first)

__all__ = ["tf"]
