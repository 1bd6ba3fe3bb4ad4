"""The demo: a generated dataset with a planted colour shortcut, a small model trained in seconds, every stage run."""
