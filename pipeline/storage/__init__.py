"""The run directory on disk: atomic writes, the lock, the zarr array layout. Only this package touches run-directory files."""
