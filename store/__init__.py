"""The latent store: Zarr v3 layout, rows, status, provenance, block writes, pair sampler.

Knows nothing of torch models (numpy, zarr, dask only).
"""

from store.errors import (
    FingerprintMismatch,
    IncompletePass,
    MissingArray,
    NotAStore,
    SchemaTooNew,
    StorageError,
    StoreError,
)
from store.lease import LeaseHeld, LeaseLost, hold_lease, read_lease
from store.rowstore import FLOAT_DTYPES, SCHEMA_VERSION, ArraySpec, RowStore, ok_rows, store_url
from store.sampler import PairSampler, SamplerSource
from store.status import Status, status_counts, summary_line

__all__ = [
    "FLOAT_DTYPES",
    "SCHEMA_VERSION",
    "ArraySpec",
    "FingerprintMismatch",
    "IncompletePass",
    "LeaseHeld",
    "LeaseLost",
    "MissingArray",
    "NotAStore",
    "PairSampler",
    "RowStore",
    "SamplerSource",
    "SchemaTooNew",
    "Status",
    "StorageError",
    "StoreError",
    "hold_lease",
    "ok_rows",
    "read_lease",
    "status_counts",
    "store_url",
    "summary_line",
]
