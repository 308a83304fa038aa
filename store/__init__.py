"""The latent store: Zarr v3 layout, rows, status, provenance, block writes, pair sampler.

Knows nothing of torch models (numpy, zarr, dask only).
"""
