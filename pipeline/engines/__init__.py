"""Where work runs besides this process: the Dask cluster and its extract/embed engines."""
