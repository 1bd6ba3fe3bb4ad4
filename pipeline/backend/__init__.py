"""TensorFlow and Keras: one quiet import, and every use of their private internals in one place."""
