import os

# Must precede any TensorFlow import: oneDNN's gradient of a strided 1x1 conv can crash on CPU.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
