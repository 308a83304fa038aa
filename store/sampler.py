"""PairSampler: random pairs (i, j) over the ok rows of one or more stores, for the trainer.

i and j are drawn independently and uniformly over the union of all sources' rows
(e.g. an inverted-image store and a sampled store). Two modes:

- "memory": the selected s columns and c of every row fit `memory_budget`: load them
  once, draw pairs by fancy indexing.
- "sharded": K resident shards (blocks of one source) plus one prefetch buffer fill the
  budget. Candidate pairs are drawn over the resident shards; every `pairs_per_rotation`
  candidates (default 2 x rows per shard: each resident row is drawn about 4 times) the
  oldest shard is replaced by the prefetched one, read in a background thread, taken from
  a random permutation of all shards (a new one per epoch). Each shard stays resident for
  K rotations, so every row has the same chance; any two distinct shards are co-resident
  equally often; candidates are padded to full shards and same-shard pairs thinned by
  (K-1)/(N-1), so over a run (shard_i, shard_j) follows the product of the marginals: j is
  independent of i in expectation (pairs of one step share the resident set).

Near pairs (`near_fraction` > 0): that share of the pairs gets, instead of its random j,
one of the `near_k` rows whose c is closest to c_i (cosine), searched among the rows at
hand: every row in "memory" mode, the resident shards in "sharded" mode, at most
`NEAR_POOL` of them drawn at random per batch. An edit asks the mapper for a partner very
near the source (one attribute changed); random pairs are nearly all far apart.

Deterministic given the seed; `state_dict()` / `load_state_dict()` continue the exact
same sequence in a resumed trainer.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from store.errors import StoreError
from store.rowstore import RowStore
from store.status import Status

_STATE_VERSION = 1
_LOAD_FIXED_BYTES = 1 << 20
NEAR_POOL = 8192  # rows searched for near partners per batch (a random subset beyond it)


@dataclass(frozen=True)
class SamplerSource:
    """One dataset: its s store/array, its c store/array, and the rows to sample (ok rows)."""

    s: RowStore
    s_name: str
    c: RowStore
    c_name: str
    rows: np.ndarray | None = None  # None = rows ok in both s and c


@dataclass(frozen=True)
class _Unit:
    source: int
    start: int  # first store row of the block
    stop: int
    local: np.ndarray  # ok rows of the block, relative to start
    first: int  # global index (position in the union) of local[0]


def load_overhead(rows_per_shard: int, s_full: int, c_full: int) -> int:
    """Bytes the sampler needs on top of its buffers to load one block of s and c: zarr
    holds the raw shard bytes, the decoded block and our row selection (measured ~3.4x the
    block with tracemalloc), plus ~0.3 MiB of asyncio/zarr bookkeeping per read."""
    return _LOAD_FIXED_BYTES + 4 * rows_per_shard * 4 * (s_full + c_full)


def min_sharded_budget(rows_per_shard: int, s_dim: int, c_dim: int, overhead: int) -> int:
    """The smallest memory budget of a shard-blocked sampler: 2 resident shards + 1 being
    prefetched, of [rows_per_shard, s_dim + c_dim] float32 (+ int64 index), + `overhead`."""
    return 3 * rows_per_shard * (4 * (s_dim + c_dim) + 8) + overhead


class PairSampler:
    """Batches of {"s_i", "c_i", "s_j", "c_j"} (float32 [B, Ds] / [B, E]) of random pairs."""

    def __init__(
        self,
        sources: list[SamplerSource],
        batch_size: int,
        seed: int,
        memory_budget: int,
        s_columns: np.ndarray | None = None,
        pairs_per_rotation: int | None = None,
        force_mode: str | None = None,
        near_fraction: float = 0.0,
        near_k: int = 32,
    ) -> None:
        if not 0.0 <= near_fraction <= 1.0:
            raise StoreError(f"PairSampler near_fraction must be in [0, 1], got {near_fraction}")
        if near_k < 1:
            raise StoreError(f"PairSampler near_k must be >= 1, got {near_k}")
        self.near_fraction = float(near_fraction)
        self.near_k = int(near_k)
        if not sources:
            raise StoreError("PairSampler needs at least one source (a pair of s and c stores)")
        if batch_size < 1:
            raise StoreError(f"PairSampler batch_size must be >= 1, got {batch_size}")
        self.sources = list(sources)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.memory_budget = int(memory_budget)
        self.s_columns = None if s_columns is None else np.asarray(s_columns, dtype=np.int64)
        self._rows = [self._check_source(k, src) for k, src in enumerate(self.sources)]
        self._offsets = np.concatenate([[0], np.cumsum([r.size for r in self._rows])]).astype(
            np.int64
        )
        self.n_rows = int(self._offsets[-1])
        if self.n_rows == 0:
            raise StoreError(
                "PairSampler: no ok rows in any source; check the stores' status "
                "(`deltaedit store info PATH`)"
            )
        self.s_dim = int(self.s_columns.size if self.s_columns is not None else self._s_full)
        self.c_dim = int(self._c_full)
        self._row_bytes = 4 * (self.s_dim + self.c_dim) + 8
        self._load_overhead = max(
            load_overhead(src.s.rows_per_shard, self._s_full, self._c_full) for src in self.sources
        )
        self._rng = np.random.default_rng(self.seed)
        self._batches = 0
        self._scratch_bufs: dict[int, np.ndarray] = {}
        need_memory = self.n_rows * self._row_bytes + self._load_overhead
        mode = force_mode or ("memory" if need_memory <= self.memory_budget else "sharded")
        if mode not in ("memory", "sharded"):
            raise StoreError(f"PairSampler mode must be 'memory' or 'sharded', got {mode!r}")
        self.mode = mode
        if mode == "memory":
            self._load_all()
        else:
            self._init_sharded(pairs_per_rotation)

    # ------------------------------------------------------------------ setup
    def _check_source(self, k: int, src: SamplerSource) -> np.ndarray:
        s_shape, c_shape = src.s.shape(src.s_name), src.c.shape(src.c_name)
        if len(s_shape) != 2 or len(c_shape) != 2:
            raise StoreError(
                f"source {k}: s {src.s_name!r} {s_shape} and c {src.c_name!r} {c_shape} must be "
                f"2-d [N, D] and [N, E]"
            )
        if s_shape[0] != c_shape[0]:
            raise StoreError(
                f"source {k}: {src.s.url} has {s_shape[0]} rows, {src.c.url} has {c_shape[0]}; "
                f"they are not one dataset"
            )
        if k == 0:
            self._s_full, self._c_full = s_shape[1], c_shape[1]
        elif (s_shape[1], c_shape[1]) != (self._s_full, self._c_full):
            raise StoreError(
                f"source {k}: widths s={s_shape[1]}, c={c_shape[1]} differ from source 0 "
                f"(s={self._s_full}, c={self._c_full}); sources must share model and layout"
            )
        if (
            self.s_columns is not None
            and self.s_columns.size
            and (self.s_columns.min() < 0 or self.s_columns.max() >= s_shape[1])
        ):
            raise StoreError(f"s_columns out of range for s width {s_shape[1]}")
        ok = (src.s.status() == Status.OK) & (src.c.status() == Status.OK)
        if src.rows is None:
            return np.flatnonzero(ok).astype(np.int64)
        rows = np.unique(np.asarray(src.rows, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= s_shape[0]):
            raise StoreError(f"source {k}: rows out of range 0..{s_shape[0] - 1}")
        bad = int((~ok[rows]).sum())
        if bad:
            raise StoreError(
                f"source {k}: {bad} of the given rows are not ok in {src.s.url} / {src.c.url}; "
                f"pass store.ok_rows(manifest, clip, s) as rows"
            )
        return rows

    def _units(self) -> list[_Unit]:
        units = []
        for k, (src, rows) in enumerate(zip(self.sources, self._rows, strict=True)):
            blocks = rows // src.s.rows_per_shard
            bounds = np.searchsorted(blocks, np.arange(src.s.n_blocks + 1))
            for b in range(src.s.n_blocks):
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                if hi > lo:
                    sl = src.s.block_rows(b)
                    units.append(
                        _Unit(
                            k, sl.start, sl.stop, rows[lo:hi] - sl.start, int(self._offsets[k]) + lo
                        )
                    )
        return units

    def _read_unit(self, u: _Unit, s_out: np.ndarray, c_out: np.ndarray) -> None:
        """Rows u.local of the unit's block, s columns selected, into s_out / c_out."""
        src = self.sources[u.source]
        n = u.local.size
        b = u.start // src.s.rows_per_shard
        full = n == u.stop - u.start  # every row of the block is sampled
        if full and self.s_columns is None:
            src.s.read_block_into(src.s_name, b, s_out)
        else:
            scratch = self._scratch(u.stop - u.start, self._s_full)
            src.s.read_block_into(src.s_name, b, scratch)
            if self.s_columns is not None:
                rows = scratch[: u.stop - u.start] if full else scratch[u.local]
                np.take(rows, self.s_columns, axis=1, out=s_out[:n], mode="clip")
            else:
                np.take(scratch, u.local, axis=0, out=s_out[:n], mode="clip")
        if full:
            src.c.read_block_into(src.c_name, b, c_out)
        else:
            scratch = self._scratch(u.stop - u.start, self._c_full)
            src.c.read_block_into(src.c_name, b, scratch)
            np.take(scratch, u.local, axis=0, out=c_out[:n], mode="clip")

    def _scratch(self, rows: int, width: int) -> np.ndarray:
        """A reused [rows, width] float32 buffer (one per width) for blocks before selection."""
        buf = self._scratch_bufs.get(width)
        if buf is None or buf.shape[0] < rows:
            buf = np.empty(
                (max(rows, max(src.s.rows_per_shard for src in self.sources)), width),
                dtype=np.float32,
            )
            self._scratch_bufs[width] = buf
        return buf[:rows]

    def _load_all(self) -> None:
        self._s_all = np.empty((self.n_rows, self.s_dim), dtype=np.float32)
        self._c_all = np.empty((self.n_rows, self.c_dim), dtype=np.float32)
        for u in self._units():
            end = u.first + u.local.size
            self._read_unit(u, self._s_all[u.first : end], self._c_all[u.first : end])

    def _init_sharded(self, pairs_per_rotation: int | None) -> None:
        self._unit_list = self._units()
        n_units = len(self._unit_list)
        cap = max(u.local.size for u in self._unit_list)
        slot_bytes = cap * self._row_bytes
        # K resident shards + 1 spare buffer that the next shard is prefetched into
        k = int(min((self.memory_budget - self._load_overhead) // slot_bytes - 1, n_units - 1))
        if k < 2:
            need = 3 * slot_bytes + self._load_overhead
            assert need == min_sharded_budget(cap, self.s_dim, self.c_dim, self._load_overhead)
            raise StoreError(
                f"PairSampler: memory_budget {self.memory_budget} B holds fewer than 2 shards "
                f"({slot_bytes} B each, one more to prefetch, + {self._load_overhead} B to load "
                f"one); raise the budget to at least {need} B or use fewer rows_per_shard"
            )
        self.shards_resident = k
        self.pairs_per_rotation = int(pairs_per_rotation or 2 * cap)
        self._same_accept = (k - 1) / (n_units - 1)
        self._s_buf = np.empty((k + 1, cap, self.s_dim), dtype=np.float32)
        self._c_buf = np.empty((k + 1, cap, self.c_dim), dtype=np.float32)
        self._slots = [-1] * k  # unit held by each slot
        self._slot_buf = np.arange(k, dtype=np.int64)  # buffer index of each slot
        self._spare = k  # buffer the next unit is prefetched into
        self._counts = np.zeros(k, dtype=np.int64)
        self._fifo = 0
        self._pairs_since = 0
        self._order: list[int] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-sampler")
        self._future: Future | None = None
        for slot in range(k):
            unit = self._next_unit()
            u = self._unit_list[unit]
            self._read_unit(u, self._s_buf[slot], self._c_buf[slot])
            self._slots[slot] = unit
            self._counts[slot] = u.local.size
        self._next = self._next_unit()
        self._prefetch()

    def _next_unit(self) -> int:
        """Next unit of the epoch permutation that is not resident (new permutation if none)."""
        resident = set(self._slots)
        for pos, u in enumerate(self._order):
            if u not in resident:
                del self._order[pos]
                return u
        self._order.extend(self._rng.permutation(len(self._unit_list)).tolist())
        return self._next_unit()

    def _prefetch(self) -> None:
        """Start reading unit self._next into the spare buffer (background thread)."""
        u = self._unit_list[self._next]
        spare = self._spare
        self._future = self._executor.submit(
            self._read_unit, u, self._s_buf[spare], self._c_buf[spare]
        )

    def _rotate(self) -> None:
        """Replace the oldest resident shard by the prefetched one; prefetch the next."""
        assert self._future is not None
        self._future.result()
        slot = self._fifo
        self._fifo = (self._fifo + 1) % len(self._slots)
        self._spare, self._slot_buf[slot] = int(self._slot_buf[slot]), self._spare
        self._slots[slot] = self._next
        self._counts[slot] = self._unit_list[self._next].local.size
        self._next = self._next_unit()
        self._prefetch()

    def close(self) -> None:
        """Stop the prefetch thread (the sampler cannot draw sharded batches afterwards)."""
        if self.mode == "sharded":
            if self._future is not None:
                self._future.result()
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ draw
    @property
    def resident_bytes(self) -> int:
        """Bytes of the sampler's data buffers (what it holds between batches)."""
        if self.mode == "memory":
            return int(self._s_all.nbytes + self._c_all.nbytes)
        return int(self._s_buf.nbytes + self._c_buf.nbytes)  # K slots + the prefetch buffer

    def next_batch(self, return_index: bool = False) -> dict[str, np.ndarray]:
        """{"s_i", "c_i", "s_j", "c_j"} float32; with return_index also "i", "j" (int64
        positions in the union of the sources' rows, see `global_row`)."""
        b = self.batch_size
        if self.mode == "memory":
            i = self._rng.integers(self.n_rows, size=b)
            j = self._rng.integers(self.n_rows, size=b)
            out = {
                "s_i": self._s_all[i],
                "c_i": self._c_all[i],
                "s_j": self._s_all[j],
                "c_j": self._c_all[j],
            }
        else:
            out, i, j = self._draw_sharded(b, return_index)
        if self.near_fraction > 0:
            j = self._near_partners(out, j)
        self._batches += 1
        if return_index:
            out["i"] = np.asarray(i, dtype=np.int64)
            out["j"] = np.asarray(j, dtype=np.int64)
        return out

    def _draw_sharded(
        self, b: int, return_index: bool
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
        """b pairs from the resident shards.

        Candidates (i, j) are uniform over K * cap virtual positions (each slot padded to cap
        rows) and kept when both are real rows, so every row of every step carries the same
        weight whatever the pool holds; a same-shard candidate is kept with probability
        (K-1)/(N-1), as any two distinct shards are co-resident (K-1)/(N-1) times as often as a
        shard with itself. The rotation clock counts candidates.
        """
        k, cap = len(self._slots), self._s_buf.shape[1]
        s_flat = self._s_buf.reshape(-1, self.s_dim)
        c_flat = self._c_buf.reshape(-1, self.c_dim)
        out = {
            "s_i": np.empty((b, self.s_dim), np.float32),
            "c_i": np.empty((b, self.c_dim), np.float32),
            "s_j": np.empty((b, self.s_dim), np.float32),
            "c_j": np.empty((b, self.c_dim), np.float32),
        }
        gi = np.empty(b, np.int64) if return_index else None
        gj = np.empty(b, np.int64) if return_index else None
        filled = 0
        while filled < b:
            m = min(self.pairs_per_rotation - self._pairs_since, 2 * (b - filled) + 16)
            vi = self._rng.integers(k * cap, size=m)
            vj = self._rng.integers(k * cap, size=m)
            u = self._rng.random(m)
            si, ri = np.divmod(vi, cap)
            sj, rj = np.divmod(vj, cap)
            keep = (ri < self._counts[si]) & (rj < self._counts[sj])
            keep &= (si != sj) | (u < self._same_accept)
            idx = np.flatnonzero(keep)[: b - filled]
            used = m if filled + idx.size < b else int(idx[-1]) + 1
            if idx.size:
                si, ri, sj, rj = si[idx], ri[idx], sj[idx], rj[idx]
                fi = self._slot_buf[si] * cap + ri  # rows of the flat [(K+1) * cap, .] buffers
                fj = self._slot_buf[sj] * cap + rj
                sl = slice(filled, filled + idx.size)
                s_flat.take(fi, axis=0, out=out["s_i"][sl], mode="clip")
                c_flat.take(fi, axis=0, out=out["c_i"][sl], mode="clip")
                s_flat.take(fj, axis=0, out=out["s_j"][sl], mode="clip")
                c_flat.take(fj, axis=0, out=out["c_j"][sl], mode="clip")
                if gi is not None and gj is not None:
                    firsts = np.array([self._unit_list[x].first for x in self._slots], np.int64)
                    gi[sl], gj[sl] = firsts[si] + ri, firsts[sj] + rj
                filled += idx.size
            self._pairs_since += used
            if self._pairs_since >= self.pairs_per_rotation:
                self._pairs_since = 0
                self._rotate()
        return out, gi, gj

    def _pool(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(s rows, c rows, flat [P], global [P]): the rows near partners come from are
        s_rows[flat] / c_rows[flat], at global positions g (s gathered only for the picks)."""
        if self.mode == "memory":
            g = np.arange(self.n_rows, dtype=np.int64)
            s_rows, c_rows = self._s_all, self._c_all
            flat = g
        else:
            cap = self._s_buf.shape[1]
            firsts = np.array([self._unit_list[x].first for x in self._slots], np.int64)
            flat = np.concatenate(
                [self._slot_buf[k] * cap + np.arange(n) for k, n in enumerate(self._counts)]
            )
            g = np.concatenate([firsts[k] + np.arange(n) for k, n in enumerate(self._counts)])
            s_rows = self._s_buf.reshape(-1, self.s_dim)
            c_rows = self._c_buf.reshape(-1, self.c_dim)
        if g.size > NEAR_POOL:
            pick = np.sort(self._rng.choice(g.size, NEAR_POOL, replace=False))
            flat, g = flat[pick], g[pick]
        return s_rows, c_rows, flat, g

    def _near_partners(self, out: dict[str, np.ndarray], j: np.ndarray | None) -> np.ndarray | None:
        """Give `near_fraction` of the pairs a partner among the near_k rows closest to c_i
        (cosine; the row itself and exact duplicates, cosine >= 1 - 1e-6, left out)."""
        near = np.flatnonzero(self._rng.random(self.batch_size) < self.near_fraction)
        if near.size == 0:
            return j
        s_rows, c_rows, flat, g_pool = self._pool()
        k = min(self.near_k, len(g_pool) - 1)
        if k < 1:
            return j
        c_pool = c_rows[flat]  # [P, E]
        unit = c_pool / np.maximum(np.linalg.norm(c_pool, axis=1, keepdims=True), 1e-8)
        ci = out["c_i"][near]
        ci = ci / np.maximum(np.linalg.norm(ci, axis=1, keepdims=True), 1e-8)
        sim = ci @ unit.T  # [m, P]
        sim[sim >= 1 - 1e-6] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [m, k] the k nearest, any order
        pick = top[np.arange(near.size), self._rng.integers(k, size=near.size)]
        out["s_j"][near] = s_rows[flat[pick]]
        out["c_j"][near] = c_pool[pick]
        if j is not None:  # a fresh array of this batch
            j[near] = g_pool[pick]
        return j

    def global_row(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, store row) of global positions g (as returned in "i"/"j")."""
        g = np.asarray(g, dtype=np.int64)
        k = np.searchsorted(self._offsets, g, side="right") - 1
        rows = np.concatenate(self._rows)
        return k, rows[g]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain-python state (JSON/torch.save friendly) to continue the same pair sequence."""
        state = {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "n_rows": self.n_rows,
            "batch_size": self.batch_size,
            "batches": self._batches,
            "rng": self._rng.bit_generator.state,
        }
        if self.mode == "sharded":
            state.update(
                n_units=len(self._unit_list),
                slots=list(self._slots),
                fifo=self._fifo,
                pairs_since=self._pairs_since,
                pairs_per_rotation=self.pairs_per_rotation,
                order=list(self._order),
                next=self._next,
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()` of a sampler over the same sources and budget."""
        expect = {"mode": self.mode, "n_rows": self.n_rows, "batch_size": self.batch_size}
        for key, value in expect.items():
            if state.get(key) != value:
                raise StoreError(
                    f"PairSampler state has {key}={state.get(key)!r}, this sampler {value!r}; "
                    f"resume with the same stores, batch size and memory budget"
                )
        if state.get("version") != _STATE_VERSION:
            raise StoreError(f"PairSampler state version {state.get('version')!r} unknown")
        if self.mode == "sharded":
            if state["n_units"] != len(self._unit_list) or len(state["slots"]) != len(self._slots):
                raise StoreError(
                    "PairSampler state was made with other shards or another memory budget; "
                    "resume with the same stores and memory budget"
                )
            if self._future is not None:
                self._future.result()
            for slot, unit in enumerate(state["slots"]):
                unit = int(unit)
                if self._slots[slot] != unit:
                    u = self._unit_list[unit]
                    buf = int(self._slot_buf[slot])
                    self._read_unit(u, self._s_buf[buf], self._c_buf[buf])
                    self._slots[slot] = unit
                    self._counts[slot] = u.local.size
            self._fifo = int(state["fifo"])
            self._pairs_since = int(state["pairs_since"])
            self.pairs_per_rotation = int(state["pairs_per_rotation"])
            self._order = [int(u) for u in state["order"]]
            if int(state["next"]) != self._next:
                self._next = int(state["next"])
                self._prefetch()
        self._rng.bit_generator.state = state["rng"]
        self._batches = int(state["batches"])
