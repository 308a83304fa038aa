"""Stores with learnable structure for trainer tests and benches (no other stage needed).

Rows share a low-rank latent z: s = z @ B_s + noise (every S channel, toRGB included)
and c = c0 + z @ B_c + noise (a fixed random linear map of the same z), so the CLIP
direction delta_c tells which way s moves: delta_s is predictable from
[normalize(c_i), normalize(delta_c)] and s_i.
"""

from __future__ import annotations

import numpy as np

from model.layout import SLayout
from store import ArraySpec, RowStore, Status, store_url

TINY_LAYOUT = SLayout.from_channels(32, {4: 32, 8: 32, 16: 32, 32: 16})
CLIP_FP = "c" * 64
GEN_FP = "g" * 64


def write_pair_store(
    root: str,
    n: int,
    layout: SLayout = TINY_LAYOUT,
    clip_dim: int = 32,
    rank: int = 8,
    seed: int = 0,
    data_seed: int = 0,
    rows_per_shard: int = 64,
    noise: float = 0.05,
    clip_fp: str = CLIP_FP,
    gen_fp: str = GEN_FP,
    status: np.ndarray | None = None,
) -> None:
    """clip.zarr + s.zarr under `root`. `seed` fixes the maps (share it across stores of
    one "world"); `data_seed` the rows."""
    maps = np.random.default_rng(seed)
    b_s = maps.standard_normal((rank, layout.dim), dtype=np.float32) * np.float32(0.5)
    b_c = maps.standard_normal((rank, clip_dim), dtype=np.float32)
    c0 = maps.standard_normal(clip_dim, dtype=np.float32) * np.float32(2.0)
    rng = np.random.default_rng([seed, data_seed, 1])
    z = rng.standard_normal((n, rank), dtype=np.float32)
    s = z @ b_s + noise * rng.standard_normal((n, layout.dim), dtype=np.float32)
    c = c0 + z @ b_c + noise * rng.standard_normal((n, clip_dim), dtype=np.float32)
    st = np.full(n, Status.OK, np.uint8) if status is None else status
    s_store = RowStore.create(
        store_url(root, "s"),
        n,
        rows_per_shard,
        {"s": ArraySpec((layout.dim,), "float32")},
        {"fingerprint": gen_fp, "layout": layout.to_dict()},
        mode="overwrite",
    )
    c_store = RowStore.create(
        store_url(root, "clip"),
        n,
        rows_per_shard,
        {"embed": ArraySpec((clip_dim,), "float32")},
        {"fingerprint": clip_fp, "normalized": False},
        mode="overwrite",
    )
    for b in range(s_store.n_blocks):
        sl = s_store.block_rows(b)
        s_store.write_block(b, {"s": s[sl]}, st[sl])
        c_store.write_block(b, {"embed": c[sl]}, st[sl])
