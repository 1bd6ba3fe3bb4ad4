"""Import TensorFlow once, quietly, with the settings this project relies on.

TensorFlow's C++ runtime prints start-up chatter to file descriptor 2 (CUDA probing, absl
notices) that no Python logging setting reaches; users read our one-line messages on stderr, so
the chatter is sent to /dev/null while TensorFlow starts and probes devices. Real import errors
still raise.

This module is also the one place that sets TensorFlow's environment (:data:`TF_ENV`, through
:func:`set_env`) before TensorFlow is imported; Dask workers get the same variables.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

def _ram_mb() -> int | None:
    """This machine's physical memory in MiB (POSIX ``sysconf``), or ``None``."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20 or None
    except (AttributeError, ValueError, OSError):
        return None


# Read by TensorFlow when it is imported, so set before: oneDNN's gradient of strided 1x1
# convolutions can crash on CPU (DESIGN.md, "Lessons"). The C++ log is kept to FATAL lines: its
# ERROR lines are chatter too (TensorFlow 2.21 logs "NodeDef mentions attribute
# use_unbounded_threadpool which is not in the op definition" whenever its op-determinism rewrite
# turns the parallel map of Keras' array adapter into a plain map: at every `fit` of the demo and
# the remedy), while real failures reach us as exceptions. A value the user set is kept.
#
# CPU tensors come from TensorFlow's BFC allocator, not malloc: glibc serves every allocation over
# 32 MB (a batch's feature maps) with a fresh mmap, so each batch page-faulted its maps in and
# unmapped them again, 15-30 % of the CPU time in the kernel. Measured on 2 cores, batch 64, 224 px,
# bare compiled forward: MobileNetV2 47.6 -> 74.7 img/s, ResNet50 17.0 -> 19.5 (kernel time 12-20 ->
# 0.2-0.4 ms per image); the extract stage on ResNet50 (1024 images) 15.4 -> 18.4 img/s. The price:
# the pool keeps its peak (ResNet50 extraction: 4.0 GB resident after the stage instead of 1.4,
# peak 4.05 GB instead of 3.6) for the process's later stages to reuse. Its limit is the machine's
# memory (TensorFlow's default, 64 GB, would refuse more on larger machines); past it an allocation
# fails with TensorFlow's ResourceExhaustedError, which the auto batch sizes back off from.
TF_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CPU_ALLOCATOR_USE_BFC": "1"}
_RAM_MB = _ram_mb()
if _RAM_MB:
    TF_ENV["TF_CPU_BFC_MEM_LIMIT_IN_MB"] = str(_RAM_MB)


def set_env() -> None:
    """Set :data:`TF_ENV` in this process's environment, keeping values the user set."""
    for name, value in TF_ENV.items():
        os.environ.setdefault(name, value)


@contextmanager
def _quiet_fd2():
    if os.environ.get("PIPELINE_TF_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tensorflow():
    """Return the ``tensorflow`` module, imported with oneDNN off and start-up noise hidden."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return sys.modules["tensorflow"]
    set_env()
    with _quiet_fd2():
        import tensorflow as tf
        import keras  # noqa: F401  (its import also touches the backend)

        tf.config.list_physical_devices("GPU")
    return tf


def gpus() -> list:
    """Names of the GPUs TensorFlow sees (empty on CPU-only machines)."""
    return [d.name for d in tensorflow().config.list_physical_devices("GPU")]
