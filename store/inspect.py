"""What `deltaedit store info` and `deltaedit store verify` report, as data (no click here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np

from store.errors import NotAStore, StoreError
from store.rowstore import (
    DONE,
    STATUS,
    RowStore,
    _hint,
    _is_str_dtype,
    is_float,
    storage_dtype,
    value_dtype,
)
from store.status import Status, status_counts
from store.update import verify_checksum


def find_stores(path: str) -> list[str]:
    """[path] if path is one Zarr group, else the `*.zarr` groups directly inside it (sorted)."""
    path = str(path).rstrip("/")
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(f"{p}/zarr.json"):
        return [path]
    if not fs.exists(p):
        raise NotAStore(f"{path}: does not exist; check the path (a .zarr store or its folder)")
    if not fs.isdir(p):
        raise NotAStore(f"{path}: not a store or a folder of stores; point to a .zarr group")
    names = sorted(
        entry.rstrip("/").rsplit("/", 1)[-1]
        for entry in fs.ls(p, detail=False)
        if entry.rstrip("/").endswith(".zarr")
    )
    if not names:
        raise NotAStore(
            f"{path}: holds no .zarr stores; point to a store (x.zarr) or a dataset folder "
            f"(manifest.zarr, clip.zarr, s.zarr)"
        )
    return [f"{path}/{name}" for name in names]


def describe(rs: RowStore) -> dict[str, Any]:
    """Arrays, shapes, dtypes, codecs, row status counts, blocks and provenance of one store."""
    arrays = {}
    for name in [*rs.array_names, STATUS]:
        a = rs.array(name)
        arrays[name] = {
            "shape": list(a.shape),
            "dtype": str(rs.specs[name].dtype) if name in rs.specs else str(a.dtype),
            "shards": list(a.shards) if a.shards else None,
            "chunks": list(a.chunks),
            "compressors": [type(c).__name__ for c in a.compressors],
        }
    done = rs.done_mask()
    return {
        "url": rs.url,
        "schema_version": rs.schema_version,
        "n_rows": rs.n_rows,
        "rows_per_shard": rs.rows_per_shard,
        "blocks": {"total": rs.n_blocks, "done": int(done.sum()), "pending": int((~done).sum())},
        "status": status_counts(rs.status()),
        "arrays": arrays,
        "provenance": rs.attrs,
    }


def _short(value: Any, limit: int = 90) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_info(info: dict[str, Any]) -> list[str]:
    """Human lines for one store's `describe()`."""
    blocks = info["blocks"]
    status = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in info["status"].items())
    lines = [
        f"{info['url']}  (deltaedit store, schema {info['schema_version']})",
        f"  rows: {info['n_rows']} in {blocks['total']} blocks of {info['rows_per_shard']} "
        f"({blocks['done']} done, {blocks['pending']} pending)",
        f"  status: {status or 'no rows'}",
        "  arrays:",
    ]
    width = max(len(n) for n in info["arrays"])
    for name, a in info["arrays"].items():
        codec = "+".join(a["compressors"]) or "uncompressed"
        lines.append(
            f"    {name:<{width}}  {a['shape']} {a['dtype']}  shards {a['shards']} "
            f"chunks {a['chunks']} {codec}"
        )
    lines.append("  provenance:" + ("" if info["provenance"] else " (none)"))
    for key, value in info["provenance"].items():
        lines.append(f"    {key}: {_short(value)}")
    return lines


def verify_store(rs: RowStore, progress: Callable[[int], None] | None = None) -> list[str]:
    """Reasons the store is not sound (empty list = sound).

    Checks: every array has N rows, its declared tail and dtype, and shards of one block;
    provenance (fingerprint) on every array; no pending blocks; done blocks hold no PENDING
    rows; no NaN/Inf in ok rows of float arrays; the key arrays (row sources, sha256,
    status) still hash to the checksum the pass recorded (no hand edits).
    """
    reasons: list[str] = []
    fp = rs.attrs.get("fingerprint")
    for name in [*rs.array_names, STATUS]:
        a = rs.array(name)
        spec = rs.specs.get(name)
        tail = tuple(spec.tail) if spec else ()
        if tuple(a.shape) != (rs.n_rows, *tail):
            reasons.append(
                f"array {name!r} has shape {tuple(a.shape)}, expected {(rs.n_rows, *tail)}"
            )
        if spec and not _is_str_dtype(spec.dtype):
            try:
                want = storage_dtype(spec.dtype)
            except StoreError as exc:
                reasons.append(f"array {name!r}: {exc}")
                continue
            if np.dtype(a.dtype) != want:
                reasons.append(f"array {name!r} has dtype {a.dtype}, expected {spec.dtype}")
        if not a.shards or a.shards[0] != rs.rows_per_shard:
            reasons.append(
                f"array {name!r} shards {a.shards} do not match blocks of {rs.rows_per_shard} rows"
            )
        if a.attrs.get("fingerprint") != fp:
            reasons.append(
                f"array {name!r} fingerprint {a.attrs.get('fingerprint')!r} differs from the "
                f"store's {fp!r}"
            )
    if DONE in rs.specs:
        reasons.append(f"array name {DONE!r} is reserved")
    done = rs.done_mask()
    pending = np.flatnonzero(~done).tolist()
    if pending:
        shown = ", ".join(map(str, pending[:8])) + (", ..." if len(pending) > 8 else "")
        reasons.append(
            f"pass incomplete: {len(pending)} of {rs.n_blocks} blocks pending ({shown}); "
            f"rerun {_hint(rs.attrs)} (it resumes)"
        )
    raw_status = np.asarray(rs.array(STATUS)[...], dtype=np.uint8)
    if raw_status.size and raw_status.max() > max(Status):
        reasons.append(
            f"status holds unknown codes {sorted(set(raw_status.tolist()) - set(Status))}"
        )
    float_arrays = [n for n, s in rs.specs.items() if _known(s.dtype) and is_float(s.dtype)]
    bad_pending: list[int] = []
    bad_values: dict[str, int] = {}
    done_blocks = np.flatnonzero(done).tolist()
    for b in done_blocks:
        if (raw_status[rs.block_rows(b)] == Status.PENDING).any():
            bad_pending.append(b)
    # blocks with ok rows, streamed: the next block is read (one thread) while this one is
    # checked, into one of two reused float32 buffers per array: memory of 2 blocks
    to_check = [b for b in done_blocks if (raw_status[rs.block_rows(b)] == Status.OK).any()]
    rps = rs.rows_per_shard
    buffers = [
        {n: np.empty((rps, *rs.specs[n].tail), np.float32) for n in float_arrays} for _ in (0, 1)
    ]

    def read(b: int, slot: int) -> dict[str, np.ndarray]:
        sl = rs.block_rows(b)
        out = {}
        for name in float_arrays:
            if value_dtype(rs.specs[name].dtype) == np.float32:
                out[name] = buffers[slot][name][: sl.stop - sl.start]
                rs.read_block_into(name, b, out[name])
            else:
                out[name] = rs.read(name, sl)
        return out

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-read") as pool:
        ahead = pool.submit(read, to_check[0], 0) if to_check and float_arrays else None
        for k, b in enumerate(to_check):
            ok = raw_status[rs.block_rows(b)] == Status.OK
            blocks = ahead.result() if ahead is not None else {}
            if ahead is not None and k + 1 < len(to_check):
                ahead = pool.submit(read, to_check[k + 1], (k + 1) % 2)
            for name, block in blocks.items():
                finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
                n_bad = int((ok & ~finite).sum())
                if n_bad:
                    bad_values[name] = bad_values.get(name, 0) + n_bad
            if progress is not None:
                progress(1)
        if progress is not None:
            progress(len(done_blocks) - len(to_check))
    if bad_pending:
        reasons.append(
            f"done marks inconsistent with status: blocks {bad_pending[:8]} are marked done but "
            f"hold PENDING rows"
        )
    for name, n_bad in bad_values.items():
        reasons.append(f"array {name!r}: {n_bad} ok rows hold NaN or Inf")
    edited = verify_checksum(rs)
    if edited:
        reasons.append(edited)
    return reasons


def _known(dtype: str) -> bool:
    try:
        storage_dtype(dtype)
    except StoreError:
        return False
    return True


def count_non_finite(rs: RowStore, names: Sequence[str], rows: np.ndarray) -> int:
    """How many of `rows` hold a NaN or Inf in any of the arrays `names` (read block by
    block: bounded memory on stores of any size)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    bad = 0
    for b in np.unique(rs.block_of_row(rows)).tolist():
        sl = rs.block_rows(b)
        pick = rows[(rows >= sl.start) & (rows < sl.stop)] - sl.start
        hit = np.zeros(pick.size, dtype=bool)
        for name in names:
            block = rs.read(name, sl)[pick]
            hit |= ~np.isfinite(block.reshape(pick.size, -1)).all(axis=1)
        bad += int(hit.sum())
    return bad


def verify_dataset(stores: list[RowStore]) -> list[str]:
    """Cross-store reasons for the groups of one folder: row counts agree; rows ok downstream
    are ok in manifest.zarr (when the folder has one)."""
    reasons: list[str] = []
    if len(stores) < 2:
        return reasons
    counts = {rs.url.rstrip("/").rsplit("/", 1)[-1]: rs.n_rows for rs in stores}
    if len(set(counts.values())) > 1:
        text = ", ".join(f"{k} {v}" for k, v in counts.items())
        reasons.append(f"row counts differ across the dataset's stores: {text}")
        return reasons
    manifest = [rs for rs in stores if rs.url.rstrip("/").endswith("/manifest.zarr")]
    if manifest:
        m_ok = manifest[0].status() == Status.OK
        for rs in stores:
            if rs is manifest[0]:
                continue
            extra = int(((rs.status() == Status.OK) & ~m_ok).sum())
            if extra:
                reasons.append(
                    f"{rs.url}: {extra} rows ok here are not ok in manifest.zarr; rerun the stage "
                    f"that writes it with overwrite"
                )
    return reasons


def open_for_check(url: str) -> tuple[RowStore | None, str | None]:
    """(store, None) or (None, one-line reason) for stores that cannot be opened."""
    try:
        return RowStore.open(url), None
    except StoreError as exc:
        return None, str(exc)
