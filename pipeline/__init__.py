"""CLI, params loading and validation, Dask client, progress and logging."""
