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
  key beside it, then a server-side move (copy + delete), so the final key appears whole.
- `check_reachable(url)`: one line before any work when the endpoint is unreachable or the
  credentials are refused.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec

from store.errors import StorageError

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
    """The options that apply to `url`: all of them for a URL, none for a local path."""
    return dict(storage_options or {}) if is_remote(url) else {}


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; a one-line StorageError when no fsspec
    implementation of the scheme is installed (naming the extra to install)."""
    url = str(url)
    proto = protocol(url)
    try:
        return fsspec.core.url_to_fs(url, **options_for(url, storage_options))
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


def zarr_options(url: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    """Keyword arguments for zarr.open_group: `storage_options` for URLs only (zarr refuses
    them for local paths). Also checks the scheme has an implementation (one line if not)."""
    if not is_remote(url):
        return {}
    filesystem(url, storage_options)
    return {"storage_options": dict(storage_options or {})}


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
    fs, path = filesystem(url, storage_options)
    tmp = f"{parent(path)}/.{name(path)}.{uuid.uuid4().hex}.tmp"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def write_text_atomic(url: str, text: str, storage_options: StorageOptions | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def put_file_atomic(local: str, url: str, storage_options: StorageOptions | None = None) -> None:
    """Copy the local file `local` to `url` atomically (temp key + move on object storage)."""
    url = str(url)
    if not is_remote(url):
        with open(local, "rb") as f:
            _write_local_atomic(absolute(url), f.read())
        return
    fs, path = filesystem(url, storage_options)
    tmp = f"{parent(path)}/.{name(path)}.{uuid.uuid4().hex}.tmp"
    try:
        fs.put_file(local, tmp)
        fs.mv(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


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
