"""PairSampler: coverage, independence of i and j, modes, determinism, resume, memory bound."""

from __future__ import annotations

import tracemalloc
import uuid

import numpy as np
import pytest

from store import ArraySpec, PairSampler, RowStore, SamplerSource, Status, StoreError, ok_rows

D, E = 10, 4


def make_source(n: int, rps: int, offset: float, fail_every: int = 0) -> SamplerSource:
    """s row r = offset + r in every column (c likewise, negated) so rows are recognizable."""
    root = f"memory://{uuid.uuid4().hex}"
    s = RowStore.create(f"{root}/s.zarr", n, rps, {"s": ArraySpec((D,), "float32")}, {})
    c = RowStore.create(f"{root}/c.zarr", n, rps, {"embed": ArraySpec((E,), "float32")}, {})
    for b in range(s.n_blocks):
        sl = s.block_rows(b)
        r = np.arange(sl.start, sl.stop)
        value = (offset + r).astype(np.float32)[:, None]
        st = np.full(r.size, Status.OK, np.uint8)
        if fail_every:
            st[r % fail_every == 0] = Status.FAILED
        s.write_block(b, {"s": np.tile(value, (1, D)) + np.arange(D) / 100}, st)
        c.write_block(b, {"embed": -np.tile(value, (1, E))}, np.full(r.size, Status.OK))
    return SamplerSource(s, "s", c, "embed", ok_rows(s, c))


def draw(sampler: PairSampler, batches: int) -> tuple[np.ndarray, np.ndarray]:
    ii, jj = [], []
    for _ in range(batches):
        b = sampler.next_batch(return_index=True)
        # rows stay aligned: s, c and the reported index name the same row
        np.testing.assert_array_equal(b["c_i"][:, 0], -np.floor(b["s_i"][:, 0]))
        np.testing.assert_array_equal(b["c_j"][:, 0], -np.floor(b["s_j"][:, 0]))
        ii.append(b["i"])
        jj.append(b["j"])
    return np.concatenate(ii), np.concatenate(jj)


def chi_square_uniform(counts: np.ndarray) -> float:
    """Normalized chi-square statistic: about 0 for uniform counts (z-score of the statistic)."""
    expected = counts.sum() / counts.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = counts.size - 1
    return float((chi2 - dof) / np.sqrt(2 * dof))


@pytest.mark.parametrize("mode", ["memory", "sharded"])
def test_pairs_uniform_over_union_and_j_independent_of_i(mode: str) -> None:
    # two sources (an "image" store and a "sampled" store), 30 % of the rows failed in one
    a = make_source(300, 50, offset=0.0, fail_every=3)
    b = make_source(400, 50, offset=10_000.0)
    budget = 10**8 if mode == "memory" else 1_090_000
    sampler = PairSampler([a, b], batch_size=64, seed=1, memory_budget=budget)
    assert sampler.mode == mode
    assert sampler.n_rows == 200 + 400
    if mode == "sharded":  # 14 shards, a rotating subset resident
        assert 2 <= sampler.shards_resident < 14
    i, j = draw(sampler, 1500)  # 96k pairs
    # only ok rows, every ok row of both sources reached, through the values themselves
    k, rows = sampler.global_row(i)
    values = np.where(k == 0, rows, 10_000 + rows)
    assert set(np.unique(values)) == set(a.rows.tolist()) | set((10_000 + b.rows).tolist())
    # uniform over the union (both i and j), per-row chi-square z-score within bounds
    assert abs(chi_square_uniform(np.bincount(i, minlength=600))) < 4
    assert abs(chi_square_uniform(np.bincount(j, minlength=600))) < 4
    # j independent of i: contingency table of coarse bins, chi-square test of independence
    bins = 6
    table = np.histogram2d(i * bins // 600, j * bins // 600, bins=bins, range=[[0, bins]] * 2)[0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    dof = (bins - 1) ** 2
    assert (chi2 - dof) / np.sqrt(2 * dof) < 4
    assert abs(np.corrcoef(i, j)[0, 1]) < 0.02
    assert (i == j).mean() < 0.01


def test_memory_mode_is_fully_independent() -> None:
    """In memory mode the joint distribution of (i, j) is the product on a fine grid too."""
    src = make_source(100, 20, offset=0.0)
    sampler = PairSampler([src], batch_size=100, seed=3, memory_budget=10**8)
    i, j = draw(sampler, 1000)
    table = np.bincount(i // 10 * 10 + j // 10, minlength=100).astype(float)
    assert abs(chi_square_uniform(table)) < 4


@pytest.mark.parametrize("budget", [10**8, 1_090_000])
def test_deterministic_and_resumable(budget: int) -> None:
    a = make_source(300, 50, offset=0.0, fail_every=4)
    b = make_source(200, 50, offset=10_000.0)
    cols = np.array([0, 3, 7])
    first = PairSampler([a, b], 32, seed=7, memory_budget=budget, s_columns=cols)
    assert first.next_batch()["s_i"].shape == (32, 3)
    for _ in range(20):
        first.next_batch()
    state = first.state_dict()
    rest = [first.next_batch() for _ in range(30)]
    again = PairSampler([a, b], 32, seed=7, memory_budget=budget, s_columns=cols)
    again.load_state_dict(state)
    for want in rest:
        got = again.next_batch()
        for key in ("s_i", "c_i", "s_j", "c_j"):
            np.testing.assert_array_equal(got[key], want[key])
    other_seed = PairSampler([a, b], 32, seed=8, memory_budget=budget, s_columns=cols)
    assert not np.array_equal(other_seed.next_batch()["s_i"], rest[0]["s_i"])
    wrong = PairSampler([a], 32, seed=7, memory_budget=budget, s_columns=cols)
    with pytest.raises(StoreError, match="same stores"):
        wrong.load_state_dict(state)


def test_s_columns_select_channels() -> None:
    src = make_source(50, 10, offset=0.0)
    cols = np.array([9, 2])
    batch = PairSampler([src], 8, seed=0, memory_budget=10**8, s_columns=cols).next_batch()
    frac = batch["s_i"] - np.floor(batch["s_i"])
    np.testing.assert_allclose(frac, np.tile([0.09, 0.02], (8, 1)), atol=1e-3)
    assert batch["s_i"].dtype == np.float32 and batch["c_j"].shape == (8, E)


def test_sharded_mode_stays_under_budget() -> None:
    n, rps, width = 4000, 200, 512
    root = f"memory://{uuid.uuid4().hex}"
    s = RowStore.create(f"{root}/s.zarr", n, rps, {"s": ArraySpec((width,), "float32")}, {})
    c = RowStore.create(f"{root}/c.zarr", n, rps, {"e": ArraySpec((32,), "float32")}, {})
    rng = np.random.default_rng(0)
    for b in range(s.n_blocks):
        s.write_block(b, {"s": rng.standard_normal((rps, width))}, np.full(rps, Status.OK))
        c.write_block(b, {"e": rng.standard_normal((rps, 32))}, np.full(rps, Status.OK))
    data_bytes = n * (width + 32) * 4  # 8.7 MB
    budget = 5_000_000
    tracemalloc.start()
    try:
        sampler = PairSampler([SamplerSource(s, "s", c, "e")], 64, seed=0, memory_budget=budget)
        for _ in range(200):  # 12.8k pairs: 64 rotations, about 3 passes through all shards
            sampler.next_batch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sampler.mode == "sharded"
    assert sampler.resident_bytes <= budget
    assert peak <= budget, f"peak traced {peak} B over budget {budget} B"
    assert peak < data_bytes / 2


def test_budget_too_small_and_empty_sources() -> None:
    src = make_source(100, 50, offset=0.0)
    with pytest.raises(StoreError, match="raise the budget"):
        PairSampler([src], 8, seed=0, memory_budget=1_000_000)
    none_ok = SamplerSource(src.s, "s", src.c, "embed", np.array([], dtype=np.int64))
    with pytest.raises(StoreError, match="no ok rows"):
        PairSampler([none_ok], 8, seed=0, memory_budget=10**8)
    with pytest.raises(StoreError, match="not ok"):
        bad = make_source(20, 10, offset=0.0, fail_every=2)
        PairSampler([SamplerSource(bad.s, "s", bad.c, "embed", np.arange(20))], 8, 0, 10**8)
