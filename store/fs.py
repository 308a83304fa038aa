"""Paths and URLs: every file the pipeline reads or writes goes through these helpers.

A location is a local path or an fsspec URL (`s3://bucket/ds`, `gs://...`, `memory://...`).
`storage_options` (params `execution.storage_options`: endpoint_url, key, secret, anon,
profile, ... passed to the fsspec filesystem as keyword arguments) apply to URLs only,
never to local paths. Nothing here keeps state between calls: the options travel with
each call (and inside each task sent to a Dask worker).

- `absolute(url)`: local paths made absolute (what a worker started elsewhere needs);
  URLs unchanged.
- `write_bytes_atomic(url, data)`: never a half-written file under the final name:
  locally a temp file in the same folder + fsync + os.replace; on object storage a temp
  key beside it, then a server-side copy to the final key (which appears whole), then the
  temp key deleted (each step retried on its own).
- `check_reachable(url)`: one line before any work when the endpoint is unreachable or the
  credentials are refused.

Retries (a flaky object store). Every request the project makes to a URL is retried with
backoff by one policy (`RetryPolicy`: `execution.storage_retries`, `storage_backoff_s`),
applied at the two doors all storage traffic passes: `filesystem()` hands out the fsspec
filesystem wrapped in `RetryingFileSystem` (each public method call = one retried unit:
the store/fs helpers, the lease, the store swap), and `RowStore` opens zarr groups on a
`RetryingStore` (each zarr store request: a shard GET/PUT, a listing, a delete). Every
retried unit is idempotent (whole-object PUTs, GETs, listings, copies; a delete that finds
nothing after a failed attempt counts as done), so a retry never writes a row twice or
half. Only transient errors are retried (connection drops, timeouts, 5xx / SlowDown =
OSError EIO/EBUSY/...); a missing key, refused credentials or a bad request fail at once.
When the retries run out the error is `StorageUnavailable`: one line naming the URL and
the attempts, an OSError and a StoreError, so the pass stops there (blocks already written
stay done, a rerun resumes) instead of leaving a silent partial output. The policy travels
inside the storage_options dict under `RETRY_OPTION` (stripped before fsspec sees the
options), so it reaches every Dask worker with the options, in every task. Local paths are
not retried (a local disk error is not transient).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import http.client
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from zarr.storage import FsspecStore, WrapperStore

from store.errors import StorageError

T = TypeVar("T")

StorageOptions = Mapping[str, Any]
LOCAL_PROTOCOLS = ("file", "local")
# protocol -> the deltaedit extra that installs its fsspec implementation
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


def protocol(url: str) -> str:
    """`s3` for `s3://b/k`, `file` for a local path (also `file://...`)."""
    proto, _ = fsspec.core.split_protocol(str(url))
    return proto or "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in LOCAL_PROTOCOLS


def absolute(url: str) -> str:
    """A local path made absolute (`~` expanded); URLs returned unchanged."""
    url = str(url)
    if is_remote(url):
        return url
    _, path = fsspec.core.split_protocol(url)
    return os.path.abspath(os.path.expanduser(path))


def join(url: str, *parts: str) -> str:
    """`url/part/part` with exactly one slash between pieces (works for paths and URLs)."""
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def parent(url: str) -> str:
    url = str(url).rstrip("/")
    return url.rsplit("/", 1)[0] if "/" in url else "."


def name(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def options_for(url: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    """The fsspec options that apply to `url`: all of them for a URL (less the retry
    policy), none for a local path."""
    if not is_remote(url):
        return {}
    return {k: v for k, v in (storage_options or {}).items() if k != RETRY_OPTION}


# --- retries -------------------------------------------------------------------------------

RETRY_OPTION = "deltaedit_retry"  # storage_options key holding RetryPolicy.to_dict()
MAX_BACKOFF_S = 20.0
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable, 409
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 InternalError
}
_DELETES = {"rm", "rm_file", "_rm", "_rm_file", "delete", "delete_dir"}


class StorageUnavailable(StorageError, OSError):
    """A storage request still failing after every retry (one line). An OSError too, so
    code that tolerates unreachable storage (the lease's release) keeps doing so."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage unavailable"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the HTTP stacks fsspec backends use that mean 'the request did
    not get through' (not OSError subclasses): botocore's and aiohttp's, when installed."""
    found: list[type[BaseException]] = [http.client.HTTPException]
    try:
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError

        found += [HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        found += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: connection drops, timeouts, 5xx/SlowDown (OSError with
    EIO/EBUSY/...); never a missing key, refused access or an error of ours."""
    if isinstance(exc, (StorageError, *_PERMANENT)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in _TRANSIENT_ERRNOS
    return isinstance(exc, _transport_errors())


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after a transient failure, waiting `backoff_s` * 2^k (k = 0,
    1, ...; capped at MAX_BACKOFF_S; 50-100% of it, jittered so workers do not retry in
    step) before each."""

    retries: int = 5
    backoff_s: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        return {"retries": int(self.retries), "backoff_s": float(self.backoff_s)}

    def delay(self, retry: int) -> float:
        full = min(MAX_BACKOFF_S, self.backoff_s * 2**retry)
        return full * (0.5 + 0.5 * random.random())

    def _give_up(self, what: str, exc: BaseException, t0: float) -> StorageUnavailable:
        reason = str(exc).strip().splitlines()
        reason = reason[0][:200] if reason else ""
        return StorageUnavailable(
            f"{what}: storage request failed on all {self.retries + 1} attempt(s) in "
            f"{time.monotonic() - t0:.1f} s ({type(exc).__name__}: {reason}); the store is "
            f"unavailable or overloaded: rerun later (the pass resumes), or raise "
            f"execution.storage_retries / storage_backoff_s"
        )

    def _handle(self, name: str, exc: BaseException, retry: int) -> bool:
        """True when a delete's FileNotFoundError after a failed attempt means 'done'."""
        return retry > 0 and name in _DELETES and isinstance(exc, FileNotFoundError)

    def call(self, what: str, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), retried; `what` (a URL) and `name` (the method) for errors."""
        t0 = time.monotonic()
        for retry in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified right below
                if self._handle(name, exc, retry):
                    return None  # type: ignore[return-value]
                if not is_transient(exc):
                    raise
                if retry == self.retries:
                    raise self._give_up(what, exc, t0) from exc
                time.sleep(self.delay(retry))
        raise AssertionError("unreachable")

    async def acall(self, what: str, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """The same for a coroutine function of no arguments."""
        t0 = time.monotonic()
        for retry in range(self.retries + 1):
            try:
                return await fn()
            except Exception as exc:  # noqa: BLE001 - classified right below
                if self._handle(name, exc, retry):
                    return None  # type: ignore[return-value]
                if not is_transient(exc):
                    raise
                if retry == self.retries:
                    raise self._give_up(what, exc, t0) from exc
                await asyncio.sleep(self.delay(retry))
        raise AssertionError("unreachable")


def with_retries(storage_options: StorageOptions | None, policy: RetryPolicy) -> dict[str, Any]:
    """storage_options carrying `policy` (what ExecutionConfig.storage() hands out)."""
    return {**(storage_options or {}), RETRY_OPTION: policy.to_dict()}


def retry_policy(storage_options: StorageOptions | None) -> RetryPolicy:
    """The policy inside storage_options (the default one when there is none)."""
    d = (storage_options or {}).get(RETRY_OPTION) or {}
    return RetryPolicy(**d)


def _url_of(fs: Any, path: Any) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    path = path[0] if isinstance(path, (list, tuple)) and path else path
    return f"{proto}://{path}" if isinstance(path, str) else f"{proto}://"


class RetryingFileSystem:
    """An fsspec filesystem whose public method calls are each retried by `policy`
    (attributes and private methods pass through). What `filesystem()` returns for URLs."""

    def __init__(self, fs: Any, policy: RetryPolicy) -> None:
        self.fs = fs
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.fs, name)
        if name.startswith("_") or not callable(attr) or name == "invalidate_cache":
            return attr
        return functools.partial(self._call, name, attr)

    def _call(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        what = _url_of(self.fs, args[0] if args else kwargs.get("path"))
        return self.policy.call(what, name, fn, *args, **kwargs)


def open_zarr_store(url: str, storage_options: StorageOptions | None) -> Any:
    """A zarr store for the URL `url` whose every request is retried (RetryingStore)."""
    filesystem(url, storage_options)  # one line for a scheme with no implementation
    inner = FsspecStore.from_url(url, storage_options=options_for(url, storage_options))
    return RetryingStore(inner, retry_policy(storage_options), url)


class RetryingStore(WrapperStore):
    """A zarr store whose requests (get, set, list, delete, ...) are each retried."""

    def __init__(self, store: Any, policy: RetryPolicy, url: str) -> None:
        super().__init__(store)
        self.policy = policy
        self.url = url

    def _with_store(self, store: Any) -> Any:
        return type(self)(store, self.policy, self.url)

    def _what(self, key: str = "") -> str:
        return join(self.url, key) if key else self.url

    async def _retry(self, name: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await self.policy.acall(self._what(key), name, fn)

    async def _listed(self, name: str, key: str, make: Callable[[], AsyncIterator[str]]):
        async def collect() -> list[str]:
            return [k async for k in make()]

        for k in await self._retry(name, key, collect):
            yield k

    async def get(self, key, prototype, byte_range=None):
        return await self._retry("get", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        first = key_ranges[0][0] if key_ranges else ""
        return await self._retry(
            "get", first, lambda: self._store.get_partial_values(prototype, key_ranges)
        )

    async def exists(self, key):
        return await self._retry("exists", key, lambda: self._store.exists(key))

    async def set(self, key, value):
        return await self._retry("set", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key, value):
        return await self._retry("set", key, lambda: self._store.set_if_not_exists(key, value))

    async def delete(self, key):
        return await self._retry("delete", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix):
        return await self._retry("delete_dir", prefix, lambda: self._store.delete_dir(prefix))

    async def getsize(self, key):
        return await self._retry("getsize", key, lambda: self._store.getsize(key))

    async def is_empty(self, prefix):
        return await self._retry("list", prefix, lambda: self._store.is_empty(prefix))

    async def clear(self):
        return await self._retry("delete_dir", "", self._store.clear)

    def list(self):
        return self._listed("list", "", self._store.list)

    def list_prefix(self, prefix):
        return self._listed("list", prefix, lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix):
        return self._listed("list", prefix, lambda: self._store.list_dir(prefix))


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url` (for a URL: wrapped in
    RetryingFileSystem); a one-line StorageError when no fsspec implementation of the
    scheme is installed (naming the extra to install)."""
    url = str(url)
    proto = protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
        if is_remote(url):
            return RetryingFileSystem(fs, retry_policy(storage_options)), path
        return fs, path
    except ImportError as exc:
        raise StorageError(_missing(url, proto, exc)) from None
    except ValueError as exc:
        if "known" in str(exc) or "protocol" in str(exc).lower():
            raise StorageError(_missing(url, proto, exc)) from None
        raise StorageError(f"{url}: bad storage options for {proto}:// ({exc})") from None
    except TypeError as exc:
        raise StorageError(f"{url}: bad storage options for {proto}:// ({exc})") from None


def _missing(url: str, proto: str, exc: Exception) -> str:
    extra = EXTRAS.get(proto)
    if extra:
        fix = f"pip install 'deltaedit[{extra}]'"
    else:
        fix = f"install the fsspec implementation of {proto}:// "
    return f"{url}: no filesystem for {proto}:// is installed; {fix} ({type(exc).__name__})"


# --- reads ---------------------------------------------------------------------------------


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return bool(fs.exists(path))


def isdir(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return bool(fs.isdir(path))


def listdir(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Names (not paths) of the entries directly under `url`, sorted; [] when it is missing."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    base = path.rstrip("/")
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries if str(e).rstrip("/") != base}
    return sorted(n for n in names if n)


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def read_text(url: str, storage_options: StorageOptions | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def open_url(url: str, mode: str = "rb", storage_options: StorageOptions | None = None):
    """A file object for reading (`rb`/`r`). Writes go through write_bytes_atomic."""
    if "r" not in mode:
        raise ValueError("open_url is for reading; write with write_bytes_atomic")
    fs, path = filesystem(url, storage_options)
    return fs.open(path, mode)


def get_file(url: str, local: str, storage_options: StorageOptions | None = None) -> None:
    """Copy `url` to the local path `local` (a plain copy for a local `url`)."""
    fs, path = filesystem(url, storage_options)
    fs.get_file(path, local)


def fetch_local(
    url: str, folder: str, storage_options: StorageOptions | None = None, sidecars: tuple = ()
) -> str:
    """A local path holding `url`: the path itself when local, else a copy in `folder`
    (with the files beside it whose suffix replaces the URL's, e.g. `.json`, when present).
    FileNotFoundError when `url` is missing."""
    url = str(url)
    if not is_remote(url):
        return url
    fs, path = filesystem(url, storage_options)
    local = os.path.join(folder, name(path))
    fs.get_file(path, local)
    stem = path.rsplit(".", 1)[0] if "." in name(path) else path
    for suffix in sidecars:
        side = stem + suffix
        if fs.exists(side):
            fs.get_file(side, os.path.join(folder, name(side)))
    return local


# --- writes --------------------------------------------------------------------------------


def makedirs(url: str, storage_options: StorageOptions | None = None) -> None:
    """Create a local folder (and parents); nothing to do on object storage (no folders)."""
    fs, path = filesystem(url, storage_options)
    if not is_remote(url):
        os.makedirs(path, exist_ok=True)
    else:
        try:
            fs.makedirs(path, exist_ok=True)
        except (OSError, NotImplementedError):
            pass  # key prefixes need no creation


def write_bytes(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """One file of many (rendered images): a single PUT on object storage (an object is
    never visible half-written there); locally a plain write, no fsync (fast for many
    small files; a rerun rewrites them)."""
    url = str(url)
    if not is_remote(url):
        path = absolute(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(path, data)


def write_bytes_atomic(
    url: str, data: bytes, storage_options: StorageOptions | None = None
) -> None:
    """Write `data` so that `url` holds either its old content or all of `data`."""
    url = str(url)
    if not is_remote(url):
        _write_local_atomic(absolute(url), data)
        return
    _upload_atomic(url, storage_options, lambda fs, tmp: fs.pipe_file(tmp, data))


def write_text_atomic(url: str, text: str, storage_options: StorageOptions | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def put_file_atomic(local: str, url: str, storage_options: StorageOptions | None = None) -> None:
    """Copy the local file `local` to `url` atomically (temp key + move on object storage)."""
    url = str(url)
    if not is_remote(url):
        with open(local, "rb") as f:
            _write_local_atomic(absolute(url), f.read())
        return
    _upload_atomic(url, storage_options, lambda fs, tmp: fs.put_file(local, tmp))


def _upload_atomic(
    url: str, storage_options: StorageOptions | None, upload: Callable[[Any, str], None]
) -> None:
    """Object storage: upload(fs, tmp) to a temp key beside `url`, then a server-side copy
    to the final key (which appears whole), then the temp key deleted."""
    fs, path = filesystem(url, storage_options)
    tmp = f"{parent(path)}/.{name(path)}.{uuid.uuid4().hex}.tmp"
    try:
        upload(fs, tmp)
        fs.copy(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise
    _remove_quietly(fs, tmp)


def _file_pair(
    src: str, dst: str, storage_options: StorageOptions | None
) -> tuple[Any | None, str, str]:
    """(None, local src, local dst) with dst's folder made, or (fsspec fs, its src and dst
    paths) on object storage: the two names of a copy or a move within one filesystem."""
    src, dst = str(src), str(dst)
    if not is_remote(dst):
        os.makedirs(os.path.dirname(absolute(dst)) or ".", exist_ok=True)
        return None, absolute(src), absolute(dst)
    fs, path = filesystem(src, storage_options)
    return fs, path, filesystem(dst, storage_options)[1]


def copy_file(src: str, dst: str, storage_options: StorageOptions | None = None) -> None:
    """Copy one file to another name (a server-side copy on object storage)."""
    fs, a, b = _file_pair(src, dst, storage_options)
    if fs is None:
        shutil.copyfile(a, b)
    else:
        fs.copy(a, b)


def move_file(src: str, dst: str, storage_options: StorageOptions | None = None) -> None:
    """Give a file another name: locally an atomic rename over `dst`; on object storage a
    copy (which appears whole), then the source deleted."""
    fs, a, b = _file_pair(src, dst, storage_options)
    if fs is None:
        os.replace(a, b)
    else:
        fs.copy(a, b)
        fs.rm_file(a)


def remove(url: str, storage_options: StorageOptions | None = None) -> None:
    """Delete a file or a whole folder / key prefix; nothing when it is missing."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.rm_file(path)
    except Exception:  # noqa: BLE001 - cleanup of a temp key that may not exist
        pass


# --- checks before any work ----------------------------------------------------------------


def check_reachable(url: str, storage_options: StorageOptions | None = None) -> None:
    """For a URL: list its bucket / top folder once, so an unreachable endpoint or refused
    credentials is one StorageError line before any work. Local paths: nothing to check."""
    url = str(url)
    if not is_remote(url):
        return
    fs, path = filesystem(url, storage_options)
    top = path.strip("/").split("/", 1)[0]
    try:
        fs.invalidate_cache()
        fs.ls(top, detail=False)
    except FileNotFoundError:
        raise StorageError(
            f"{url}: bucket {top!r} does not exist at this endpoint; create it, or check "
            f"execution.storage_options (endpoint_url)"
        ) from None
    except PermissionError as exc:
        raise StorageError(
            f"{url}: access refused ({_short(exc)}); check the key/secret/profile in "
            f"execution.storage_options"
        ) from None
    except Exception as exc:  # noqa: BLE001 - endpoint errors come in many types
        raise StorageError(
            f"{url}: cannot reach the store ({type(exc).__name__}: {_short(exc)}); check "
            f"execution.storage_options (endpoint_url, credentials)"
        ) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def require_free_space(url: str, need: int, what: str) -> None:
    """Refuse (StorageError, one line) to start writing `need` bytes of `what` under a local
    `url` whose disk has less free space; URLs (object storage) are not checked."""
    if is_remote(url):
        return
    import shutil

    path = os.path.abspath(url)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if need > free:
        raise StorageError(
            f"{url}: {what} needs {need / 1e9:.1f} GB, the disk there has {free / 1e9:.1f} GB "
            f"free; nothing was written: free space, choose another folder, or write fewer rows"
        )
