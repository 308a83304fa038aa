"""PairSampler: coverage, independence of i and j, modes, determinism, resume, memory bound."""

from __future__ import annotations

import json
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
    i, j = draw(sampler, 1200)  # 77k pairs
    # only ok rows, every ok row of both sources reached, through the values themselves
    k, rows = sampler.global_row(i)
    values = np.where(k == 0, rows, 10_000 + rows)
    assert set(np.unique(values)) == set(a.rows.tolist()) | set((10_000 + b.rows).tolist())
    # uniform over the union (both i and j), per-row chi-square z-score within bounds
    assert abs(chi_square_uniform(np.bincount(i, minlength=600))) < 4
    assert abs(chi_square_uniform(np.bincount(j, minlength=600))) < 4
    # j independent of i
    bins = 6
    table = np.histogram2d(i * bins // 600, j * bins // 600, bins=bins, range=[[0, bins]] * 2)[0]
    if mode == "memory":  # iid pairs: chi-square test of independence at sampling precision
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        chi2 = ((table - expected) ** 2 / expected).sum()
        dof = (bins - 1) ** 2
        assert (chi2 - dof) / np.sqrt(2 * dof) < 4
    else:
        # Pairs of one rotation step share the resident set, so a single run carries extra
        # noise from which shards happened to be co-resident; dependence is zero in
        # expectation. Bounds catch the 1/K same-shard excess of naive pool sampling
        # (measured without the correction: TV 0.06, same-shard 0.129 vs 0.074, corr 0.055).
        cond = table / table.sum(1, keepdims=True)
        marginal = table.sum(0) / table.sum()
        assert 0.5 * np.abs(cond - marginal).sum(1).max() < 0.03
        ki, ri = sampler.global_row(i)
        kj, rj = sampler.global_row(j)
        shard_i, shard_j = ki * 100 + ri // 50, kj * 100 + rj // 50
        _, counts = np.unique(shard_i, return_counts=True)
        same_expected = ((counts / counts.sum()) ** 2).sum()
        assert abs((shard_i == shard_j).mean() / same_expected - 1) < 0.1
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
    state = json.loads(json.dumps(first.state_dict()))  # plain data, saved with a checkpoint
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


def test_local_store_gives_the_same_batches_as_memory(tmp_path) -> None:
    """The sampler reads local shards through the direct path: same pairs, same values."""
    rng = np.random.default_rng(5)
    n, rps = 230, 40
    s_data = rng.standard_normal((n, D)).astype(np.float32)
    c_data = rng.standard_normal((n, E)).astype(np.float32)
    status = np.where(rng.random(n) < 0.2, Status.FAILED, Status.OK).astype(np.uint8)
    sources = []
    for root in (str(tmp_path), f"memory://{uuid.uuid4().hex}"):
        s = RowStore.create(f"{root}/s.zarr", n, rps, {"s": ArraySpec((D,), "float32")}, {})
        c = RowStore.create(f"{root}/c.zarr", n, rps, {"e": ArraySpec((E,), "float32")}, {})
        for b in range(s.n_blocks):
            sl = s.block_rows(b)
            s.write_block(b, {"s": s_data[sl]}, status[sl])
            c.write_block(b, {"e": c_data[sl]}, np.full(sl.stop - sl.start, Status.OK))
        sources.append(SamplerSource(s, "s", c, "e", ok_rows(s, c)))
    cols = np.array([1, 4, 8])
    for budget in (10**8, 1_062_500):
        local, memory = (
            PairSampler([src], 16, seed=2, memory_budget=budget, s_columns=cols) for src in sources
        )
        assert local.mode == memory.mode == ("memory" if budget == 10**8 else "sharded")
        for _ in range(40):
            x, y = local.next_batch(return_index=True), memory.next_batch(return_index=True)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
            _, rows = local.global_row(x["i"])
            np.testing.assert_array_equal(x["s_i"], s_data[rows][:, cols])
            np.testing.assert_array_equal(x["c_i"], c_data[rows])


def make_cloud_source(n: int, rps: int, seed: int) -> tuple[SamplerSource, np.ndarray]:
    """c rows random directions in E dims, s row r = r in every column; returns c too."""
    root = f"memory://{uuid.uuid4().hex}"
    c_all = np.random.default_rng(seed).normal(size=(n, E)).astype(np.float32)
    s = RowStore.create(f"{root}/s.zarr", n, rps, {"s": ArraySpec((D,), "float32")}, {})
    c = RowStore.create(f"{root}/c.zarr", n, rps, {"embed": ArraySpec((E,), "float32")}, {})
    for b in range(s.n_blocks):
        sl = s.block_rows(b)
        r = np.arange(sl.start, sl.stop, dtype=np.float32)[:, None]
        s.write_block(b, {"s": np.tile(r, (1, D))}, np.full(r.size, Status.OK, np.uint8))
        c.write_block(b, {"embed": c_all[sl]}, np.full(r.size, Status.OK, np.uint8))
    return SamplerSource(s, "s", c, "embed", ok_rows(s, c)), c_all


@pytest.mark.parametrize("budget", [10**8, 1_090_000])
def test_near_pairs_take_partners_among_the_nearest_and_resume(budget: int) -> None:
    src, c_all = make_cloud_source(400, 50, seed=0)
    unit = c_all / np.linalg.norm(c_all, axis=1, keepdims=True)
    near = PairSampler([src], 64, seed=3, memory_budget=budget, near_fraction=1.0, near_k=5)
    plain = PairSampler([src], 64, seed=3, memory_budget=budget)
    cos_near, cos_plain = [], []
    for _ in range(12):
        b = near.next_batch(return_index=True)
        i, j = b["i"], b["j"]
        assert (i != j).all()
        np.testing.assert_array_equal(b["s_j"][:, 0], j)  # s, c and index name one row
        np.testing.assert_array_equal(b["c_j"], c_all[j])
        sim = unit[i] @ unit.T
        if near.mode == "memory":  # every row is searched: j is one of the 5 nearest of i
            sim[np.arange(len(i)), i] = -np.inf
            rank = (sim > sim[np.arange(len(i)), j][:, None]).sum(1)
            assert rank.max() < 5
        cos_near.append((unit[i] * unit[j]).sum(1))
        p = plain.next_batch(return_index=True)
        cos_plain.append((unit[p["i"]] * unit[p["j"]]).sum(1))
    assert np.mean(cos_near) > 0.8 > 0.2 > abs(np.mean(cos_plain))
    # half near, half random; resumed from a saved state it continues the same pairs
    half = PairSampler([src], 64, seed=4, memory_budget=budget, near_fraction=0.5, near_k=5)
    for _ in range(5):
        half.next_batch()
    state = json.loads(json.dumps(half.state_dict()))
    rest = [half.next_batch() for _ in range(8)]
    again = PairSampler([src], 64, seed=4, memory_budget=budget, near_fraction=0.5, near_k=5)
    again.load_state_dict(state)
    for want in rest:
        got = again.next_batch()
        for key in ("s_i", "c_i", "s_j", "c_j"):
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(StoreError, match="near_fraction"):
        PairSampler([src], 64, seed=0, memory_budget=budget, near_fraction=1.5)
