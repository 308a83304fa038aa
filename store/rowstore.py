"""RowStore: one Zarr v3 group = one stage output, row-aligned arrays in shard-aligned blocks.

Layout of a group (``<root>/<name>.zarr``)::

    zarr.json            group attrs: schema_version, n_rows, rows_per_shard, arrays (specs),
                         plus the producer's provenance (fingerprint, model, layout, ...)
    <array>/             [N, *tail], sharding codec, one shard = one block of rows_per_shard rows
    status/              [N] uint8 (store.Status), sharded like the data
    _done/               [n_blocks] uint8, one tiny chunk per block: the done mark

A block's rows are one shard in every array, so two writers never touch one shard
(zarr #3682, dask #12583: concurrent partial-shard writes lose data). `write_block`
writes the data, then the status, then the done mark; a killed pass leaves the block
without its mark and a rerun redoes it. Readers see status PENDING for rows of blocks
that are not done, so they only ever see rows whose data is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.errors

from store.errors import (
    FingerprintMismatch,
    IncompletePass,
    MissingArray,
    NotAStore,
    SchemaTooNew,
    StoreError,
)
from store.status import Status

SCHEMA_VERSION = 1
STORE_TAG = "deltaedit.store"
STATUS = "status"
DONE = "_done"
_RESERVED = {"schema_version", "n_rows", "rows_per_shard", "arrays", "created_by"}
_CHUNK_TARGET_BYTES = 1 << 20  # inner chunk ~1 MiB: cheap partial reads, few index entries


@dataclass(frozen=True)
class ArraySpec:
    """One row-aligned array: shape [N, *tail], dtype ("float32", "uint8", "int32", "str", ...).

    compress: None = automatic (off for floats: latents do not compress and the codec
    costs write/read speed; zstd for ints and strings).
    """

    tail: tuple[int, ...]
    dtype: str
    compress: bool | None = None

    def to_dict(self) -> dict:
        return {"tail": [int(t) for t in self.tail], "dtype": str(self.dtype)}

    @classmethod
    def from_dict(cls, d: dict) -> ArraySpec:
        return cls(tuple(int(t) for t in d["tail"]), str(d["dtype"]))


def store_url(root: str, name: str) -> str:
    """`<root>/<name>.zarr` (root: local path or fsspec URL)."""
    return f"{str(root).rstrip('/')}/{name}.zarr"


def _jsonable(value: Any) -> Any:
    """What attrs look like after a JSON round trip (tuples -> lists, numpy scalars -> python)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"attrs value of type {type(value).__name__} is not JSON-serializable")


def _is_str_dtype(dtype: str) -> bool:
    return str(dtype) in ("str", "string", "U", "<U", "object") or str(dtype).startswith("<U")


def _chunk_rows(rows_per_shard: int, row_bytes: int) -> int:
    """Largest divisor of rows_per_shard whose chunk stays near the byte target."""
    target = max(1, _CHUNK_TARGET_BYTES // max(1, row_bytes))
    if target >= rows_per_shard:
        return rows_per_shard
    for rows in range(target, 0, -1):
        if rows_per_shard % rows == 0:
            return rows
    return 1


def _hint(attrs: dict) -> str:
    stage = attrs.get("stage")
    return f"deltaedit {stage}" if stage else "the stage that writes it"


def _open_group(url: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, NotADirectoryError):
        raise NotAStore(
            f"{url}: no store there (no Zarr group); run the stage that writes it first, "
            f"or check the path (`deltaedit store info PATH`)"
        ) from None
    except (ValueError, json.JSONDecodeError, zarr.errors.BaseZarrError) as exc:
        raise NotAStore(
            f"{url}: not a readable Zarr v3 group ({type(exc).__name__}: {exc}); "
            f"point to a deltaedit store (`deltaedit store info PATH`)"
        ) from None


def _check_schema(url: str, attrs: dict) -> None:
    if attrs.get("created_by") != STORE_TAG or "schema_version" not in attrs:
        raise NotAStore(
            f"{url}: a Zarr group but not a deltaedit store (no {STORE_TAG} schema attrs); "
            f"point to a store written by a deltaedit stage"
        )
    version = attrs["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{url}: written with store schema_version {version}, this deltaedit reads up to "
            f"{SCHEMA_VERSION}; upgrade deltaedit (pip install -U deltaedit) to read it"
        )


class RowStore:
    """One stage output: row-aligned arrays + status + per-block done marks."""

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self._group = group
        attrs = dict(group.attrs)
        _check_schema(url, attrs)
        self._attrs = attrs
        self.n_rows: int = int(attrs["n_rows"])
        self.rows_per_shard: int = int(attrs["rows_per_shard"])
        self.specs: dict[str, ArraySpec] = {
            k: ArraySpec.from_dict(v) for k, v in attrs["arrays"].items()
        }
        self.n_blocks: int = -(-self.n_rows // self.rows_per_shard)
        self._arrays: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        url: str,
        n_rows: int,
        rows_per_shard: int,
        arrays: dict[str, ArraySpec],
        attrs: dict,
        mode: str = "resume",
    ) -> RowStore:
        """Create the group with every array at its final shape, or reopen it to resume.

        mode "resume": an existing store with the same arrays, shapes and attrs is opened to
        continue (done blocks are kept); another fingerprint -> FingerprintMismatch; other
        differences -> StoreError. mode "overwrite": delete whatever is there and start empty.
        """
        url = str(url)
        if mode not in ("resume", "overwrite"):
            raise StoreError(f"{url}: mode must be 'resume' or 'overwrite', got {mode!r}")
        if n_rows < 0 or rows_per_shard < 1:
            raise StoreError(
                f"{url}: need n_rows >= 0 and rows_per_shard >= 1, "
                f"got {n_rows} and {rows_per_shard}"
            )
        bad = sorted(set(attrs) & _RESERVED)
        if bad:
            raise StoreError(f"{url}: attrs keys {bad} are reserved by the store; rename them")
        for name in arrays:
            if name in (STATUS, DONE) or "/" in name or not name:
                raise StoreError(f"{url}: array name {name!r} is reserved or invalid; rename it")
        specs = {
            k: ArraySpec(tuple(int(t) for t in v.tail), str(v.dtype), v.compress)
            for k, v in arrays.items()
        }
        user_attrs = _jsonable(dict(attrs))
        meta = {
            **user_attrs,
            "created_by": STORE_TAG,
            "schema_version": SCHEMA_VERSION,
            "n_rows": int(n_rows),
            "rows_per_shard": int(rows_per_shard),
            "arrays": {k: v.to_dict() for k, v in specs.items()},
        }
        existing = cls._try_open_existing(url, set(specs))
        if existing is not None and mode == "resume":
            existing._check_arrays()
            existing._check_same(meta)
            return existing
        group = zarr.open_group(url, mode="w")
        for name, spec in specs.items():
            cls._create_array(group, name, spec, n_rows, rows_per_shard, user_attrs)
        cls._create_array(
            group, STATUS, ArraySpec((), "uint8", True), n_rows, rows_per_shard, user_attrs
        )
        n_blocks = -(-n_rows // rows_per_shard)
        group.create_array(
            DONE,
            shape=(max(n_blocks, 1),),
            chunks=(1,),
            dtype="uint8",
            fill_value=0,
            compressors=None,
            attributes={"about": "done mark per block, written after the block's data"},
        )
        group.attrs.update(meta)  # last: a group without these attrs is not a store yet
        return cls(url, zarr.open_group(url, mode="r+"))

    @staticmethod
    def _create_array(
        group: zarr.Group, name: str, spec: ArraySpec, n_rows: int, rps: int, attrs: dict
    ) -> None:
        is_str = _is_str_dtype(spec.dtype)
        dtype = str if is_str else np.dtype(spec.dtype)
        tail = tuple(spec.tail)
        if is_str:
            row_bytes = 64 * int(np.prod(tail, dtype=np.int64))
        else:
            row_bytes = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
        chunk = _chunk_rows(rps, row_bytes)
        compress = spec.compress
        if compress is None:
            compress = is_str or dtype.kind not in "fc"
        kwargs: dict[str, Any] = {} if compress else {"compressors": None}
        group.create_array(
            name,
            shape=(n_rows, *tail),
            shards=(rps, *tail),
            chunks=(chunk, *tail),
            dtype=dtype,
            fill_value="" if is_str else 0,
            attributes={**attrs, "row_aligned": True},
            **kwargs,
        )

    @classmethod
    def _try_open_existing(cls, url: str, names: set[str]) -> RowStore | None:
        """The store at url, None if nothing (or only our own half-created group) is there.

        Refuses (NotAStore) to touch anything else: create never wipes foreign data.
        """
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return None
        if not fs.exists(f"{path.rstrip('/')}/zarr.json"):
            if fs.isdir(path) and not fs.ls(path):
                return None
            raise NotAStore(
                f"{url}: exists but is not a Zarr store; refusing to overwrite it: "
                f"choose another output path or remove it yourself"
            )
        group = _open_group(url, "r+")
        attrs = dict(group.attrs)
        if not attrs and set(group.keys()) <= names | {STATUS, DONE}:
            return None  # an earlier create died before writing its attrs (its last step)
        return cls(url, group)

    def _check_same(self, meta: dict) -> None:
        old = self._attrs
        if old.get("fingerprint") != meta.get("fingerprint"):
            raise FingerprintMismatch(
                self.url,
                old.get("fingerprint"),
                meta.get("fingerprint"),
                hint=f"rerun {_hint(meta)} with overwrite to replace it, or use the matching model",
            )
        if (old["n_rows"], old["rows_per_shard"]) != (meta["n_rows"], meta["rows_per_shard"]):
            raise StoreError(
                f"{self.url}: holds {old['n_rows']} rows in shards of {old['rows_per_shard']}, "
                f"this pass wants {meta['n_rows']} in shards of {meta['rows_per_shard']}; "
                f"rerun {_hint(meta)} with overwrite"
            )
        if old["arrays"] != meta["arrays"]:
            raise StoreError(
                f"{self.url}: holds arrays {old['arrays']}, this pass writes {meta['arrays']}; "
                f"rerun {_hint(meta)} with overwrite"
            )
        for key in sorted(set(old) | set(meta)):
            if key in _RESERVED:
                continue
            if old.get(key) != meta.get(key):
                raise StoreError(
                    f"{self.url}: written with {key}={old.get(key)!r}, this pass has "
                    f"{key}={meta.get(key)!r}; rerun {_hint(meta)} with overwrite"
                )

    @classmethod
    def open(
        cls, url: str, fingerprint: str | None = None, require_complete: bool = False
    ) -> RowStore:
        """Open an existing store (read/write). Checks schema, arrays, and the fingerprint if given.

        require_complete: raise IncompletePass if any block is pending.
        """
        url = str(url)
        rs = cls(url, _open_group(url, "r+"))
        rs._check_arrays()
        if fingerprint is not None and rs._attrs.get("fingerprint") != fingerprint:
            raise FingerprintMismatch(
                url,
                rs._attrs.get("fingerprint"),
                fingerprint,
                hint=f"rerun {_hint(rs._attrs)} with this model, or load the model that wrote it",
            )
        if require_complete:
            rs.require_complete()
        return rs

    def _check_arrays(self) -> None:
        present = set(self._group.array_keys())
        for name in [*self.specs, STATUS, DONE]:
            if name not in present:
                raise MissingArray(
                    f"{self.url}: array {name!r} is missing (store lists {sorted(self.specs)}); "
                    f"the store is damaged: rerun {_hint(self._attrs)} with overwrite"
                )

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict:
        """The producer's attrs (fingerprint, model, layout, ...) without the store's own keys."""
        return {k: v for k, v in self._attrs.items() if k not in _RESERVED}

    @property
    def schema_version(self) -> int:
        return int(self._attrs["schema_version"])

    @property
    def array_names(self) -> list[str]:
        return list(self.specs)

    @property
    def fingerprint(self) -> str | None:
        return self._attrs.get("fingerprint")

    def __repr__(self) -> str:
        return (
            f"RowStore({self.url!r}, n_rows={self.n_rows}, rows_per_shard={self.rows_per_shard}, "
            f"arrays={self.array_names})"
        )

    # ------------------------------------------------------------------ arrays
    def array(self, name: str) -> zarr.Array:
        """The zarr.Array for `name` (also "status")."""
        if name not in self._arrays:
            if name not in self.specs and name not in (STATUS, DONE):
                raise MissingArray(
                    f"{self.url}: no array {name!r} (has {self.array_names}); "
                    f"check the array name or the store path"
                )
            try:
                self._arrays[name] = self._group[name]  # type: ignore[assignment]
            except KeyError:
                raise MissingArray(
                    f"{self.url}: array {name!r} is missing on disk; the store is damaged: "
                    f"rerun {_hint(self._attrs)} with overwrite"
                ) from None
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.array(name).shape)

    def block_rows(self, b: int) -> slice:
        """Rows of block b (the last block may be short)."""
        if not 0 <= b < self.n_blocks:
            raise StoreError(f"{self.url}: block {b} out of range 0..{self.n_blocks - 1}")
        start = b * self.rows_per_shard
        return slice(start, min(start + self.rows_per_shard, self.n_rows))

    def block_of_row(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.rows_per_shard

    def done_mask(self) -> np.ndarray:
        """[n_blocks] bool: block has its done mark."""
        if self.n_blocks == 0:
            return np.zeros(0, dtype=bool)
        return self.array(DONE)[: self.n_blocks].astype(bool)

    def done_blocks(self) -> list[int]:
        return np.flatnonzero(self.done_mask()).tolist()

    def pending_blocks(self) -> list[int]:
        return np.flatnonzero(~self.done_mask()).tolist()

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def require_complete(self) -> None:
        pending = self.pending_blocks()
        if pending:
            raise IncompletePass(
                self.url,
                pending,
                self.n_blocks,
                hint=f"rerun {_hint(self._attrs)} (it resumes and redoes only pending blocks)",
            )

    # ------------------------------------------------------------------ read
    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array (raw: rows of pending blocks hold the fill value; see status())."""
        arr = self.array(name)
        if rows is None:
            return arr[...]
        if isinstance(rows, slice):
            return arr[rows]
        idx = np.asarray(rows, dtype=np.int64)
        if idx.ndim != 1:
            raise StoreError(f"{self.url}: rows must be a slice or a 1-d index array")
        if idx.size == 0:
            return arr[0:0]
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        lo, hi = int(sorted_idx[0]), int(sorted_idx[-1]) + 1
        if hi - lo <= 4 * idx.size:  # dense: one contiguous read, then select
            part = arr[lo:hi]
            return part[idx - lo]
        out = arr.get_orthogonal_selection((sorted_idx,))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return out[inverse]

    def status(self) -> np.ndarray:
        """[N] uint8 status; rows of blocks without a done mark read as PENDING."""
        raw = np.asarray(self.array(STATUS)[...], dtype=np.uint8)
        done = self.done_mask()
        if not done.all():
            row_done = np.repeat(done, self.rows_per_shard)[: self.n_rows]
            raw = np.where(row_done, raw, np.uint8(Status.PENDING))
        return raw

    def ok_rows(self) -> np.ndarray:
        """int64 indices of rows with status OK (in done blocks)."""
        return np.flatnonzero(self.status() == Status.OK).astype(np.int64)

    # ------------------------------------------------------------------ write
    def write_block(self, b: int, data: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write block b: every array's rows, then status, then the done mark.

        A block already done is never rewritten: the same data is a no-op, different data
        raises StoreError (recreate the store with mode="overwrite" to change rows).
        """
        sl = self.block_rows(b)
        n = sl.stop - sl.start
        missing = sorted(set(self.specs) - set(data))
        extra = sorted(set(data) - set(self.specs))
        if missing or extra:
            raise StoreError(
                f"{self.url}: write_block({b}) needs exactly the arrays {self.array_names}; "
                f"missing {missing}, unknown {extra}"
            )
        values: dict[str, np.ndarray] = {}
        for name, spec in self.specs.items():
            v = np.asarray(data[name])
            if _is_str_dtype(spec.dtype):
                if v.dtype.kind not in "UT":
                    v = np.array([str(x) for x in v.ravel()]).reshape(v.shape)
            else:
                v = v.astype(np.dtype(spec.dtype), copy=False)
            if v.shape != (n, *spec.tail):
                raise StoreError(
                    f"{self.url}: write_block({b}) array {name!r} has shape {v.shape}, "
                    f"expected {(n, *spec.tail)}"
                )
            values[name] = v
        st = np.asarray(status)
        if st.shape != (n,):
            raise StoreError(
                f"{self.url}: write_block({b}) status has shape {st.shape}, expected {(n,)}"
            )
        if st.size and (st.min() < 0 or st.max() > max(Status)):
            raise StoreError(f"{self.url}: write_block({b}) status holds unknown codes")
        st = st.astype(np.uint8)
        if (st == Status.PENDING).any():
            raise StoreError(
                f"{self.url}: write_block({b}) status has PENDING rows; a written row needs its "
                f"outcome (OK, FAILED, SKIPPED, ...)"
            )
        done = self.array(DONE)
        if int(done[b]) == 1:
            if self._block_equal(sl, values, st):
                return
            raise StoreError(
                f"{self.url}: block {b} (rows {sl.start}..{sl.stop - 1}) is already done with "
                f"different data; rows are never rewritten: rerun {_hint(self._attrs)} with "
                f"overwrite to start over"
            )
        for name, v in values.items():
            self.array(name)[sl] = v
        self.array(STATUS)[sl] = st
        done[b] = 1  # the mark, only after the block's data and status are stored

    def _block_equal(self, sl: slice, values: dict[str, np.ndarray], st: np.ndarray) -> bool:
        if not np.array_equal(self.array(STATUS)[sl], st):
            return False
        for name, v in values.items():
            old = self.array(name)[sl]
            if v.dtype.kind in "UT" or old.dtype.kind in "UTO":
                if [str(x) for x in old.ravel()] != [str(x) for x in v.ravel()]:
                    return False
            elif old.tobytes() != v.tobytes():
                return False
        return True


def ok_rows(*stores: RowStore) -> np.ndarray:
    """int64 rows OK in every given store (row-aligned stores of one dataset)."""
    if not stores:
        raise StoreError("ok_rows needs at least one store")
    n = stores[0].n_rows
    mask = np.ones(n, dtype=bool)
    for rs in stores:
        if rs.n_rows != n:
            raise StoreError(
                f"row counts differ: {stores[0].url} has {n} rows, {rs.url} has {rs.n_rows}; "
                f"they are not one dataset (run `deltaedit store verify` on their folder)"
            )
        mask &= rs.status() == Status.OK
    return np.flatnonzero(mask).astype(np.int64)
