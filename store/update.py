"""Row identity is content: reuse rows of earlier stores, swap an updated store in.

A store whose rows are keyed (a `sha256` array: the sha256 of each row's source bytes)
can lend its rows to a later pass over a changed folder. Reuse is allowed only between
stores of one producer: `producer_attrs` (the store's attrs without the keys that name
its inputs, e.g. the manifest's fingerprint) must be equal, and so must the arrays.

An update never writes into the store it replaces: the new store is filled beside it
(`<name>.zarr.next`), block by block with the usual done marks, then swapped in
(`final -> .prev`, `next -> final`, `.prev` deleted). `recover` repairs a swap that was
killed half-way, so a killed update, rerun, ends in the same state as an uninterrupted
one. Every copy writes whole blocks of the new store: one writer per shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from store.errors import StoreError
from store.fs import filesystem
from store.rowstore import STATUS, ArraySpec, RowStore, _is_str_dtype, _jsonable, value_dtype
from store.status import Status

KEY = "sha256"  # the row key array: sha256 of the row's source bytes
INPUT_KEYS = (
    "manifest",
    "weights",
    "root",
    "inputs",
)  # attrs naming inputs (paths), not the producer
CHECKSUM = "rows_sha256"  # attrs: checksum of the key arrays (store verify recomputes it)
NO_SOURCE = -1


def jsonable(value):
    """`value` as attrs hold it after the JSON round trip (tuples -> lists, numpy -> python)."""
    return _jsonable(value)


def as_str(values) -> np.ndarray:
    """A fixed-width str array of any str-like array (zarr returns numpy StringDType)."""
    return np.array([str(x) for x in np.asarray(values).ravel().tolist()], dtype=str)


class ReuseRefused(StoreError):
    """A store given for reuse was made by another producer (models or preprocessing)."""


def producer_attrs(attrs: dict) -> dict:
    """What must match for rows to be reused: the attrs without the input names."""
    return {k: v for k, v in attrs.items() if k not in INPUT_KEYS and k != CHECKSUM}


def reuse_difference(
    old: RowStore, attrs: dict, arrays: dict[str, ArraySpec], key: str = KEY
) -> str | None:
    """Why `old` cannot lend rows to a pass with these attrs and arrays (None: it can)."""
    if key not in old.specs:
        return f"{old.url} has no row keys (array {key!r}; written before rows were keyed)"
    want = {k: ArraySpec(tuple(v.tail), str(v.dtype)).to_dict() for k, v in arrays.items()}
    have = {k: v.to_dict() for k, v in old.specs.items()}
    if want != have:
        return f"{old.url} holds arrays {have}, this pass writes {want}"
    a, b = producer_attrs(old.attrs), producer_attrs(attrs)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in diff if k != "fingerprint")
        return (
            f"{old.url} was made by producer fingerprint {a.get('fingerprint')!r}, this pass "
            f"uses {b.get('fingerprint')!r}" + (f" ({shown})" if shown else "")
        )
    return None


def check_reuse(stores: list[RowStore], attrs: dict, arrays: dict[str, ArraySpec]) -> None:
    """Refuse (ReuseRefused, one line) any `--reuse` store of another producer."""
    for rs in stores:
        why = reuse_difference(rs, attrs, arrays)
        if why:
            raise ReuseRefused(
                f"--reuse {why}; rows of other models or preprocessing are never mixed in "
                f"(nothing was written)"
            )


def open_reuse(url: str, name: str, storage_options: dict | None = None) -> RowStore:
    """A `--reuse` argument: a store, or a dataset folder holding `<name>.zarr`."""
    fs, path = filesystem(str(url), storage_options)
    if not fs.exists(f"{path.rstrip('/')}/zarr.json") and fs.exists(
        f"{path.rstrip('/')}/{name}.zarr/zarr.json"
    ):
        url = f"{str(url).rstrip('/')}/{name}.zarr"
    return RowStore.open(str(url), storage_options=storage_options)


# --- where each row comes from ------------------------------------------------------------


@dataclass(frozen=True)
class RowPlan:
    """For each row of the new store: the source store (index into `urls`, NO_SOURCE =
    not ok upstream: SKIPPED) and the row there. `compute` lists the rows (new-store
    indices) no source holds: they go through the model into the compute store."""

    src: np.ndarray  # [N] int
    row: np.ndarray  # [N] int64
    compute: np.ndarray  # [n_compute] int64, ascending


def key_index(stores: list[RowStore], key: str = KEY) -> dict[str, tuple[int, int]]:
    """key -> (store index, row) over the OK rows of done blocks; the first store wins."""
    index: dict[str, tuple[int, int]] = {}
    for s, rs in enumerate(stores):
        ok = rs.ok_rows()
        if not ok.size:
            continue
        keys = rs.read(key)
        for r in ok.tolist():
            index.setdefault(str(keys[r]), (s, r))
    return index


def plan_rows(keys: np.ndarray, wanted: np.ndarray, index: dict[str, tuple[int, int]]) -> RowPlan:
    """Reuse every wanted row whose key `index` holds; the rest are to compute."""
    n = len(keys)
    src = np.full(n, NO_SOURCE, dtype=np.int64)
    row = np.zeros(n, dtype=np.int64)
    compute: list[int] = []
    for r in np.flatnonzero(wanted).tolist():
        hit = index.get(str(keys[r]))
        if hit is None:
            compute.append(r)
        else:
            src[r], row[r] = hit
    return RowPlan(src, row, np.asarray(compute, dtype=np.int64))


def dropped_rows(stores: list[RowStore], keys: np.ndarray, key: str = KEY) -> int:
    """OK rows of `stores` (the previous store of this output) whose key the new rows lack."""
    wanted = {str(k) for k in keys.tolist()}
    n = 0
    for rs in stores:
        ok = rs.ok_rows()
        if ok.size:
            old = rs.read(key)
            n += sum(1 for r in ok.tolist() if str(old[r]) not in wanted)
    return n


def assemble_block(
    out: RowStore,
    block: int,
    sources: list[RowStore],
    plan: RowPlan,
    keys: np.ndarray,
    key: str = KEY,
) -> np.ndarray:
    """Write block `block` of `out` from its sources; returns its status.

    Each row is copied (data and status) from `sources[plan.src[r]]` row `plan.row[r]`;
    rows without a source are SKIPPED with zero data; the key array is `keys`. The whole
    block is one write_block: one writer per shard.
    """
    sl = out.block_rows(block)
    n = sl.stop - sl.start
    src, row = plan.src[sl], plan.row[sl]
    status = np.full(n, Status.SKIPPED, dtype=np.uint8)
    data: dict[str, np.ndarray] = {}
    for name, spec in out.specs.items():
        if name == key:
            data[name] = as_str(keys[sl])
        elif _is_str_dtype(spec.dtype):
            data[name] = np.full((n, *spec.tail), "", dtype=str)
        else:
            data[name] = np.zeros((n, *spec.tail), dtype=value_dtype(spec.dtype))
    for s in np.unique(src[src != NO_SOURCE]).tolist():
        at = np.flatnonzero(src == s)
        rows = row[at]
        status[at] = sources[s].read(STATUS, rows)
        for name in data:
            if name != key:
                data[name][at] = sources[s].read(name, rows)
    out.write_block(block, data, status)
    return status


# --- checksums of the key arrays ----------------------------------------------------------


def rows_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named row arrays (str arrays as UTF-8 lines, numbers as little-endian)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        v = np.asarray(arrays[name])
        h.update(name.encode() + b"\0")
        if v.dtype.kind in "UTSO":
            h.update("\n".join(str(x) for x in v.ravel().tolist()).encode())
        else:
            h.update(np.ascontiguousarray(v.astype(v.dtype.newbyteorder("<"))).tobytes())
        h.update(b"\0")
    return h.hexdigest()


def checksum_attr(arrays: dict[str, np.ndarray]) -> dict:
    return {"arrays": sorted(arrays), "sha256": rows_checksum(arrays)}


def verify_checksum(rs: RowStore) -> str | None:
    """A reason when the stored key arrays no longer hash to the recorded checksum."""
    want = rs.attrs.get(CHECKSUM)
    if not isinstance(want, dict) or not rs.is_complete():
        return None
    names = list(want.get("arrays", []))
    missing = [n for n in names if n not in rs.specs and n != STATUS]
    if missing:
        return f"{CHECKSUM} names arrays {missing} the store does not hold"
    got = rows_checksum({n: rs.read(n) for n in names})
    if got != want.get("sha256"):
        return (
            f"rows edited after the pass wrote them: arrays {names} no longer match "
            f"{CHECKSUM} (edited by hand?); rerun the stage that writes it with --overwrite"
        )
    return None


# --- next / prev / swap ---------------------------------------------------------------------


def next_url(url: str) -> str:
    return f"{str(url).rstrip('/')}.next"


def compute_url(url: str) -> str:
    return f"{str(url).rstrip('/')}.compute"


def _prev(url: str) -> str:
    return f"{str(url).rstrip('/')}.prev"


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(str(url), storage_options)
    return bool(fs.exists(path))


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(str(url), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def recover(url: str, storage_options: dict | None = None) -> None:
    """Finish or undo a swap killed half-way: `.prev` without final goes back to final;
    `.prev` beside a final (the swap got as far as the new store) is deleted."""
    fs, final = filesystem(str(url), storage_options)
    _, prev = filesystem(_prev(url), storage_options)
    if not fs.exists(prev):
        return
    if fs.exists(final):
        fs.rm(prev, recursive=True)
    else:
        _move_tree(fs, prev, final)


def _move_tree(fs, src: str, dst: str) -> None:
    """A folder renamed locally; on object storage (no rename, and s3fs's recursive mv
    copies keys it listed as folders) every object copied, then the source deleted."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "file" in protocols or "local" in protocols:
        fs.mv(src, dst, recursive=True)
        return
    fs.invalidate_cache()
    for key in fs.find(src):
        fs.copy(key, dst + key[len(src) :])
    fs.rm(src, recursive=True)
    fs.invalidate_cache()


def swap_in(url: str, new_url: str, storage_options: dict | None = None) -> None:
    """final -> .prev, new -> final, .prev deleted (each step a rename; see recover)."""
    fs, final = filesystem(str(url), storage_options)
    _, new = filesystem(str(new_url), storage_options)
    _, prev = filesystem(_prev(url), storage_options)
    if fs.exists(final):
        _move_tree(fs, final, prev)
    _move_tree(fs, new, final)
    if fs.exists(prev):
        fs.rm(prev, recursive=True)
