"""Incremental stage outputs: reuse unchanged rows, compute only new or changed ones.

Every pass that writes keyed rows (ingest, encode-clip, encode-s) goes through
`update_output`, from scratch or not:

1. the rows the pass wants (in manifest order: sources sorted by path) and their keys
   (sha256 of each source's bytes) are known up front;
2. every wanted row whose key is an OK row of the previous output (same producer: models
   and preprocessing) or of a `--reuse` store is reused; the rest are computed by the
   stage's model into a compute store `<name>.zarr.compute` (rows compacted, resumable
   block-wise, every model call on exactly `batch_size` rows so a row's latents do not
   depend on which other rows share its batch);
3. the new output is assembled beside the old one in `<name>.zarr.next`, block by block
   (one writer per shard, done marks), then swapped in (store.update.swap_in).

A from-scratch pass and an update over the same folder build the same rows in the same
order from the same per-row values: their stores are bitwise equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stages.common import ExecutionConfig
from stages.execution import BlockReport, PassSummary, create_output, run_blocks
from store import ArraySpec, FingerprintMismatch, RowStore, Status, StoreError
from store import fs as storefs
from store import update as up


@dataclass(frozen=True)
class UpdateCounts:
    """What one pass did with the rows: reused from earlier stores, computed, dropped."""

    reused: int
    computed: int
    dropped: int

    def line(self, name: str) -> str:
        return (
            f"{name}: rows reused {self.reused}, computed {self.computed}, dropped {self.dropped}"
        )


@dataclass(frozen=True)
class _AssembleTask:
    out_url: str
    sources: tuple[str, ...]
    plan: up.RowPlan
    keys: np.ndarray
    storage_options: dict = field(default_factory=dict)

    def __call__(self, block: int) -> BlockReport:
        start = time.perf_counter()
        so = self.storage_options
        out = RowStore.open(self.out_url, storage_options=so)
        stores = [RowStore.open(u, storage_options=so) for u in self.sources]
        status = up.assemble_block(out, block, stores, self.plan, self.keys)
        names, counts = np.unique(status, return_counts=True)
        return BlockReport(
            block,
            len(status),
            {Status(int(v)).name: int(c) for v, c in zip(names, counts, strict=True)},
            (),
            time.perf_counter() - start,
        )


# compute(compute_url, rows) -> summary: run the model over `rows` (indices of the new
# store) into the compute store at compute_url (created by update_output, row i = rows[i])
ComputeFn = Callable[[str, np.ndarray], PassSummary]


def _same_output(old: RowStore, attrs: dict) -> bool:
    a = {k: v for k, v in old.attrs.items() if k != up.CHECKSUM}
    return a == up.jsonable({k: v for k, v in attrs.items() if k != up.CHECKSUM})


def update_output(
    url: str,
    rows_per_shard: int,
    arrays: dict[str, ArraySpec],
    attrs: dict,
    keys: np.ndarray,
    wanted: np.ndarray,
    compute: ComputeFn,
    execution: ExecutionConfig,
    name: str,
    reuse: Sequence[str] = (),
    overwrite: bool = False,
    restart_on_change: bool = False,
    progress: bool = True,
) -> tuple[RowStore, PassSummary, UpdateCounts]:
    """Bring the keyed output at `url` to the rows `keys` (the wanted ones computed or
    reused, the others SKIPPED). `arrays` are the data arrays (the key array is added).

    The previous output of another producer: an error naming both fingerprints, or, with
    `restart_on_change`, not reused (a note says so). A `--reuse` store of another producer
    is refused before anything is written. `overwrite` reuses nothing from the previous
    output and rebuilds it.
    """
    start = time.perf_counter()
    keys = up.as_str(keys)
    n_rows = len(keys)
    full = {**arrays, up.KEY: ArraySpec((), "str")}
    store_name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    so = execution.storage()
    reuse_stores = [up.open_reuse(u, store_name, so) for u in reuse]
    up.check_reuse(reuse_stores, attrs, full)
    notes: list[str] = []
    dropped_prev = 0  # OK rows of a previous output that is not reused at all
    up.recover(url, so)
    if overwrite:
        for u in (url, up.next_url(url), up.compute_url(url)):
            up.remove(u, so)
    old = RowStore.open(url, storage_options=so) if up.exists(url, so) else None
    if old is not None:
        why = up.reuse_difference(old, attrs, full)
        if why and not restart_on_change:
            hint = "rerun with --overwrite (or --restart-on-change) to start over"
            if old.fingerprint != attrs.get("fingerprint"):
                raise FingerprintMismatch(
                    url,
                    old.fingerprint,
                    attrs.get("fingerprint"),
                    hint=f"{hint}, or use the model that wrote it",
                )
            raise StoreError(f"{url}: cannot update it: {why}; {hint}")
        if why:
            notes.append(f"{url}: made with other models or preprocessing, started over ({why})")
            dropped_prev = int(old.ok_rows().size)
            old = None
        elif _same_output(old, attrs) and old.is_complete() and old.n_rows == n_rows:
            if np.array_equal(up.as_str(old.read(up.KEY)), keys):
                for u in (up.next_url(url), up.compute_url(url)):
                    up.remove(u, so)  # leftovers of an update killed after its swap
                summary = store_summary(name, old, PassSummary(name, 0), 0, start, notes)
                return old, summary, UpdateCounts(int(old.ok_rows().size), 0, 0)
    sources = ([old] if old is not None else []) + reuse_stores
    plan = up.plan_rows(keys, np.asarray(wanted, dtype=bool), up.key_index(sources))
    c_url = up.compute_url(url)
    c_summary = PassSummary(f"{name} compute", 0)
    src, row = plan.src.copy(), plan.row.copy()
    source_urls = [storefs.absolute(rs.url) for rs in sources]
    status = np.full(n_rows, Status.SKIPPED, dtype=np.uint8)
    reused = plan.src != up.NO_SOURCE
    status[reused] = Status.OK
    if plan.compute.size:
        c_attrs = {**attrs, "compute_rows": up.rows_checksum({"keys": keys[plan.compute]})}
        c_store = create_output(
            c_url, len(plan.compute), rows_per_shard, arrays, c_attrs, False, True, [], so
        )
        c_summary = compute(c_url, plan.compute)
        c_store.require_complete()
        src[plan.compute] = len(source_urls)
        row[plan.compute] = np.arange(len(plan.compute))
        status[plan.compute] = c_store.status()
        source_urls.append(storefs.absolute(c_url))
    full_plan = up.RowPlan(src, row, plan.compute)
    checksum = up.checksum_attr({up.KEY: keys, "status": status})
    n_attrs = {**attrs, up.CHECKSUM: checksum}
    n_url = up.next_url(url)
    nxt = create_output(n_url, n_rows, rows_per_shard, full, n_attrs, False, True, [], so)
    task = _AssembleTask(storefs.absolute(n_url), tuple(source_urls), full_plan, keys, dict(so))
    assembled = run_blocks(
        task, nxt.pending_blocks(), execution, f"{name} assemble", nxt.n_blocks, progress
    )
    nxt.require_complete()
    counts = UpdateCounts(
        int(reused.sum()),
        int(plan.compute.size),
        up.dropped_rows([old], keys) if old is not None else dropped_prev,
    )
    up.swap_in(url, n_url, so)
    up.remove(c_url, so)
    final = RowStore.open(url, storage_options=so)
    summary = store_summary(name, final, c_summary, assembled.blocks_run, start, notes)
    return final, summary, counts


def store_summary(
    name: str,
    store: RowStore,
    computed: PassSummary,
    blocks_run: int,
    start: float,
    notes: list[str],
) -> PassSummary:
    """The whole output's row counts, the computed rows' problem lines and the notes."""
    summary = PassSummary(name, store.n_blocks)
    status = store.status()
    names, counts = np.unique(status, return_counts=True)
    summary.counts.update({Status(int(v)).name: int(c) for v, c in zip(names, counts, strict=True)})
    summary.rows = store.n_rows
    summary.blocks_run = blocks_run
    summary.reasons = list(computed.reasons)
    summary.n_reasons = computed.n_reasons
    summary.notes = [*notes, *computed.notes]
    summary.seconds = time.perf_counter() - start
    return summary
