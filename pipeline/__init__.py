"""Look inside image models: activations, embeddings, neuron clusters, feature visualizations, reports.

Heavy libraries (TensorFlow, umap, openTSNE) are imported inside the stages that need them, so
``python -m pipeline --help``, ``status`` and ``report`` start fast.
"""
from pipeline.version import __version__  # noqa: F401


def load_run(path):
    """Open a run directory for analysis in a notebook.

    Parameters
    ----------
    path : str or pathlib.Path
        The run directory (the ``out`` of a config).

    Returns
    -------
    pipeline.storage.results.Run
        Tables as pandas DataFrames (loaded on first access) and arrays as lazy zarr arrays.
    """
    from pipeline.storage.results import Run

    return Run(path)
