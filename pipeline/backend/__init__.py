"""TensorFlow and Keras: one quiet import, and every use of their private internals in one place.

- :mod:`.tf`: the environment TensorFlow needs before it is imported, and the quiet import;
- :mod:`.keras_internals`, :mod:`.tf_internals`: each private Keras / TensorFlow API behind one
  small function, version-checked by :mod:`.versions` (one warning per process outside the tested
  range) and falling back where the caller has a fallback.
"""
