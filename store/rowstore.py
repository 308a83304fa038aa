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

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
import zarr.errors

from store import fs as storefs
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


# Reduced-precision float arrays (S codes, edits): what a store may hold, and how.
# zarr 3.1 has no bfloat16 dtype: a bfloat16 array is stored as its uint16 bit patterns
# (the top half of the float32), the spec in the group attrs names "bfloat16".
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_STORED_AS = {"bfloat16": np.dtype("uint16")}
_HALF = ("float16", "bfloat16")


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype zarr stores for an ArraySpec dtype (bfloat16 -> uint16)."""
    dtype = str(dtype)
    if dtype in _STORED_AS:
        return _STORED_AS[dtype]
    try:
        return np.dtype(dtype)
    except TypeError:
        raise StoreError(
            f"dtype {dtype!r} is not one a store can hold; use one of {', '.join(FLOAT_DTYPES)} "
            f"for latents (or a numpy dtype)"
        ) from None


def value_dtype(dtype: str) -> np.dtype:
    """The dtype readers get for an ArraySpec dtype: float32 for float16/bfloat16 arrays."""
    return np.dtype(np.float32) if str(dtype) in _HALF else storage_dtype(dtype)


def is_float(dtype: str) -> bool:
    return not _is_str_dtype(dtype) and (str(dtype) in _HALF or np.dtype(dtype).kind in "fc")


def encode_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values as the store holds them: float32 -> float16 (numpy rounding) or bfloat16 bit
    patterns (round to nearest even; NaN stays NaN, overflow goes to +-Inf)."""
    if str(dtype) != "bfloat16":
        return values.astype(storage_dtype(dtype), copy=False)
    f = np.ascontiguousarray(values, dtype=np.float32)
    x = f.reshape(-1).view(np.uint32)
    out = np.empty(x.shape, np.uint16)
    step = 1 << 16  # values a pass: the temporaries stay in cache
    r = np.empty(min(step, x.size), np.uint32)
    for lo in range(0, x.size, step):
        xs, rs = x[lo : lo + step], r[: min(step, x.size - lo)]
        np.right_shift(xs, 16, out=rs)
        np.bitwise_and(rs, 1, out=rs)
        rs += 0x7FFF
        rs += xs  # uint32 wraps only for NaN patterns, fixed below
        rs >>= 16
        out[lo : lo + step] = rs
    nan = np.flatnonzero(np.isnan(f.reshape(-1)))
    if nan.size:  # quiet NaN, sign and payload top kept (rounding could make it Inf)
        out[nan] = ((x[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out.reshape(f.shape)


def decode_into(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Stored values -> float32 `out` (same shape)."""
    if str(dtype) == "bfloat16" and out.flags.c_contiguous and out.dtype == np.float32:
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif str(dtype) == "bfloat16":
        out[...] = decode_values(raw, dtype)
    else:
        out[...] = raw


def decode_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as readers see them (float32 for float16/bfloat16 arrays)."""
    if str(dtype) == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if str(dtype) == "float16":
        return raw.astype(np.float32)
    return raw


def dtype_fingerprint(fingerprint: str, dtype: str) -> str:
    """A producer's fingerprint for rows stored as `dtype`: float32 keeps it as it is, a
    reduced dtype mixes in (rows of two dtypes are never reused into one store)."""
    if str(dtype) == "float32":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}+{dtype}".encode()).hexdigest()


def store_nbytes(n_rows: int, arrays: dict[str, ArraySpec]) -> int:
    """Bytes a store of these numeric arrays takes on disk, uncompressed (status included;
    str arrays counted at 64 bytes a value: compressed keys take less)."""
    row = 1  # status
    for spec in arrays.values():
        width = int(np.prod(spec.tail, dtype=np.int64))
        size = 64 if _is_str_dtype(spec.dtype) else storage_dtype(spec.dtype).itemsize
        row += width * size
    return int(n_rows) * row


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


def _open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    try:
        if storefs.is_remote(url):  # every request retried (store.fs, "Retries")
            store = storefs.open_zarr_store(url, storage_options)
            return zarr.open_group(store=store, mode=mode)
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

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
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
        storage_options: dict | None = None,
    ) -> RowStore:
        """Create the group with every array at its final shape, or reopen it to resume.

        mode "resume": an existing store with the same arrays, shapes and attrs is opened to
        continue (done blocks are kept); another fingerprint -> FingerprintMismatch; other
        differences -> StoreError. mode "overwrite": delete whatever is there and start empty.
        storage_options: fsspec options for a URL (endpoint, credentials); unused for paths.
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
        for spec in specs.values():
            if not _is_str_dtype(spec.dtype):
                storage_dtype(spec.dtype)  # one line for a dtype a store cannot hold
        user_attrs = _jsonable(dict(attrs))
        meta = {
            **user_attrs,
            "created_by": STORE_TAG,
            "schema_version": SCHEMA_VERSION,
            "n_rows": int(n_rows),
            "rows_per_shard": int(rows_per_shard),
            "arrays": {k: v.to_dict() for k, v in specs.items()},
        }
        so = storage_options
        existing = cls._try_open_existing(url, set(specs), so)
        if existing is not None and mode == "resume":
            existing._check_arrays()
            existing._check_same(meta)
            return existing
        group = _open_group(url, "w", so)
        for name, spec in specs.items():
            cls._create_array(group, name, spec, n_rows, rows_per_shard, user_attrs)
        cls._create_array(  # uncompressed: tiny, and block writes take the fast path
            group, STATUS, ArraySpec((), "uint8", False), n_rows, rows_per_shard, user_attrs
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
        return cls(url, _open_group(url, "r+", so), so)

    @staticmethod
    def _create_array(
        group: zarr.Group, name: str, spec: ArraySpec, n_rows: int, rps: int, attrs: dict
    ) -> None:
        is_str = _is_str_dtype(spec.dtype)
        dtype = str if is_str else storage_dtype(spec.dtype)
        tail = tuple(spec.tail)
        if is_str:
            row_bytes = 64 * int(np.prod(tail, dtype=np.int64))
        else:
            row_bytes = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
        chunk = _chunk_rows(rps, row_bytes)
        compress = spec.compress
        if compress is None:
            compress = not is_float(spec.dtype)
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
    def _try_open_existing(
        cls, url: str, names: set[str], storage_options: dict | None
    ) -> RowStore | None:
        """The store at url, None if nothing (or only our own half-created group) is there.

        Refuses (NotAStore) to touch anything else: create never wipes foreign data.
        """
        fs, path = storefs.filesystem(url, storage_options)
        if not fs.exists(path):
            return None
        if not fs.exists(f"{path.rstrip('/')}/zarr.json"):
            if fs.isdir(path) and not fs.ls(path):
                return None
            raise NotAStore(
                f"{url}: exists but is not a Zarr store; refusing to overwrite it: "
                f"choose another output path or remove it yourself"
            )
        group = _open_group(url, "r+", storage_options)
        attrs = dict(group.attrs)
        if not attrs and set(group.keys()) <= names | {STATUS, DONE}:
            return None  # an earlier create died before writing its attrs (its last step)
        return cls(url, group, storage_options)

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
        cls,
        url: str,
        fingerprint: str | None = None,
        require_complete: bool = False,
        storage_options: dict | None = None,
    ) -> RowStore:
        """Open an existing store (read/write). Checks schema, arrays, and the fingerprint if given.

        require_complete: raise IncompletePass if any block is pending. storage_options:
        fsspec options for a URL (endpoint, credentials); unused for local paths.
        """
        url = str(url)
        rs = cls(url, _open_group(url, "r+", storage_options), storage_options)
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
                arr = self._group[name]
                # store every written chunk: skips zarr's per-chunk "all fill value?" scan
                # (a pending block is never written, so it still costs no files)
                self._arrays[name] = arr.with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
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
        root = self._local_done_root()
        if root is None:
            return self.array(DONE)[: self.n_blocks].astype(bool)
        mask = np.zeros(self.n_blocks, dtype=bool)
        if root.is_dir():
            for entry in os.scandir(root):
                if entry.name.isdigit() and int(entry.name) < self.n_blocks:
                    with open(entry.path, "rb") as f:
                        mask[int(entry.name)] = f.read(1) == b"\x01"
        return mask

    def _is_done(self, b: int) -> bool:
        root = self._local_done_root()
        if root is None:
            return int(self.array(DONE)[b]) == 1
        try:
            with open(root / str(b), "rb") as f:
                return f.read(1) == b"\x01"
        except FileNotFoundError:
            return False

    def _mark_done(self, b: int) -> None:
        root = self._local_done_root()
        if root is None:
            self.array(DONE)[b] = 1
            return
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{b}.{uuid.uuid4().hex}.partial"
        tmp.write_bytes(b"\x01")
        os.replace(tmp, root / str(b))

    def _local_done_root(self) -> Path | None:
        """Folder of the done-mark chunk files (`_done/c/<b>`, one raw byte each) of a local
        store; None where zarr must read and write them."""
        if "_done_root" not in self.__dict__:
            root = None
            try:
                from zarr.codecs import BytesCodec
                from zarr.storage import LocalStore

                arr = self.array(DONE)
                codecs = arr.metadata.codecs
                if (
                    isinstance(arr.store, LocalStore)
                    and len(codecs) == 1
                    and isinstance(codecs[0], BytesCodec)
                    and arr.metadata.encode_chunk_key((7,)) == "c/7"
                    and tuple(arr.chunks) == (1,)
                ):
                    root = Path(str(arr.store.root)) / arr.path / "c"
            except (ImportError, AttributeError, TypeError):
                root = None
            self.__dict__["_done_root"] = root
        return self.__dict__["_done_root"]

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
        """Rows of one array (rows of pending blocks hold the fill value; see status()).
        float16 / bfloat16 arrays come back as float32."""
        spec = self.specs.get(name)
        raw = self.read_raw(name, rows)
        return decode_values(raw, spec.dtype) if spec is not None else raw

    def read_raw(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Rows of one array as stored (bfloat16: uint16 bit patterns)."""
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

    def read_block_into(self, name: str, b: int, out: np.ndarray) -> None:
        """Fill out[:n] with the n rows of block b of array `name` (numeric arrays).

        Local uncompressed shards are read straight into `out` (one readinto per inner
        chunk: no temporary arrays); any other store or codec goes through zarr.
        """
        sl = self.block_rows(b)
        n = sl.stop - sl.start
        arr = self.array(name)
        if out.shape[0] < n or out.shape[1:] != tuple(arr.shape[1:]):
            raise StoreError(f"{self.url}: read_block_into({name!r}, {b}) got out {out.shape}")
        spec = self.specs.get(name)
        if spec is not None and str(spec.dtype) in _HALF:  # the half-size block, then widen
            raw = np.empty((n, *arr.shape[1:]), dtype=storage_dtype(spec.dtype))
            if not self._read_shard_file(arr, b, raw):
                raw = arr[sl]
            decode_into(raw, spec.dtype, out[:n])
        elif not self._read_shard_file(arr, b, out[:n]):
            out[:n] = arr[sl]

    def _read_shard_file(self, arr: zarr.Array, b: int, out: np.ndarray) -> bool:
        """Decode one uncompressed sharding_indexed shard of a local array; False = not
        applicable (zarr reads it instead)."""
        layout = self._fast_layout(arr)
        if layout is None or not out.flags.c_contiguous or out.dtype != layout["dtype"]:
            return False
        cr, n_chunks, row_bytes = layout["chunk_rows"], layout["n_chunks"], layout["row_bytes"]
        key = arr.metadata.encode_chunk_key((b,) + (0,) * (arr.ndim - 1))
        path = layout["root"] / key
        index_bytes = 16 * n_chunks + 4
        view = out.reshape(-1).view(np.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                size = f.seek(0, 2)
                if size < index_bytes:
                    return False
                f.seek(size - index_bytes)
                index = np.frombuffer(f.read(16 * n_chunks), dtype="<u8").reshape(n_chunks, 2)
                n = out.shape[0]
                for i in range(n_chunks):
                    r0, r1 = i * cr, min((i + 1) * cr, n)
                    if r1 <= r0:
                        break
                    offset, nbytes = int(index[i, 0]), int(index[i, 1])
                    if offset == 2**64 - 1:  # chunk never written: fill value
                        out[r0:r1] = layout["fill"]
                        continue
                    if nbytes != cr * row_bytes or offset + nbytes > size - index_bytes:
                        return False
                    f.seek(offset)
                    want = (r1 - r0) * row_bytes
                    got = f.readinto(memoryview(view[r0 * row_bytes : r0 * row_bytes + want]))
                    if got != want:
                        return False
        except FileNotFoundError:
            return False
        return True

    def _write_shard_file(self, arr: zarr.Array, b: int, values: np.ndarray) -> bool:
        """Encode block b of a local uncompressed array as one sharding_indexed shard and
        write it atomically (temp file + rename), as zarr would; False = not applicable
        (zarr writes it instead). The data is written straight from `values`, no copies."""
        layout = self._fast_layout(arr)
        if layout is None or values.dtype != layout["dtype"]:
            return False
        cr, n_chunks, row_bytes = layout["chunk_rows"], layout["n_chunks"], layout["row_bytes"]
        n = values.shape[0]
        used = -(-n // cr)  # inner chunks holding rows; the rest stay absent
        index = np.full((n_chunks, 2), 2**64 - 1, dtype="<u8")
        index[:used, 0] = np.arange(used, dtype=np.uint64) * np.uint64(cr * row_bytes)
        index[:used, 1] = cr * row_bytes
        index_bytes = index.tobytes()
        crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        pad_rows = used * cr - n
        key = arr.metadata.encode_chunk_key((b,) + (0,) * (arr.ndim - 1))
        path = layout["root"] / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8)))
                if pad_rows:
                    pad = np.full((pad_rows, *values.shape[1:]), layout["fill"], layout["dtype"])
                    f.write(pad.tobytes())
                f.write(index_bytes)
                f.write(crc)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _fast_layout(self, arr: zarr.Array) -> dict | None:
        cache = self.__dict__.setdefault("_fast_layouts", {})
        if arr.path in cache:
            return cache[arr.path]
        layout = None
        try:
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
            from zarr.codecs.sharding import ShardingCodecIndexLocation
            from zarr.storage import LocalStore

            codecs = arr.metadata.codecs
            sc = codecs[0] if len(codecs) == 1 else None
            dtype = np.dtype(arr.dtype)
            little = dtype.byteorder in ("<", "=", "|") and np.little_endian
            if (
                isinstance(arr.store, LocalStore)
                and isinstance(sc, ShardingCodec)
                and len(sc.codecs) == 1
                and isinstance(sc.codecs[0], BytesCodec)
                and (sc.codecs[0].endian is None or sc.codecs[0].endian.value == "little")
                and sc.index_location == ShardingCodecIndexLocation.end
                and [type(c) for c in sc.index_codecs] == [BytesCodec, Crc32cCodec]
                and tuple(sc.chunk_shape[1:]) == tuple(arr.shape[1:])
                and dtype.kind in "biuf"
                and little
                and self.rows_per_shard % sc.chunk_shape[0] == 0
            ):
                root = Path(str(arr.store.root)) / arr.path
                tail = int(np.prod(arr.shape[1:], dtype=np.int64))
                layout = {
                    "root": root,
                    "dtype": dtype,
                    "chunk_rows": int(sc.chunk_shape[0]),
                    "n_chunks": self.rows_per_shard // int(sc.chunk_shape[0]),
                    "row_bytes": tail * dtype.itemsize,
                    "fill": arr.metadata.fill_value,
                }
        except (ImportError, AttributeError, TypeError, ValueError):
            layout = None
        cache[arr.path] = layout
        return layout

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
                v = encode_values(v, spec.dtype)
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
        if self._is_done(b):
            if self._block_equal(sl, values, st):
                return
            raise StoreError(
                f"{self.url}: block {b} (rows {sl.start}..{sl.stop - 1}) is already done with "
                f"different data; rows are never rewritten: rerun {_hint(self._attrs)} with "
                f"overwrite to start over"
            )
        for name, v in [*values.items(), (STATUS, st)]:
            arr = self.array(name)
            if not self._write_shard_file(arr, b, v):
                arr[sl] = v
        self._mark_done(b)  # the mark, only after the block's data and status are stored

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
