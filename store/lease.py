"""One writer per store: a lease object beside the store, that works on object storage too.

A writing pass holds ``<store>.lease.json`` (next to ``<store>``, e.g. ``clip.zarr.lease.json``)
for as long as it runs::

    with hold_lease("data/images/clip.zarr", "encode-clip"):
        ...  # create / write the store

The lease is a small JSON object (owner, host, pid, start time, heartbeat time, pass name,
and a random token) written through fsspec, so it needs no POSIX lock and works the same on
a local disk and on S3/GCS. It sits beside the store, not inside it: zarr would list an
extra object inside a group as a foreign member, and `RowStore.create(mode="overwrite")`
wipes the group's prefix while the pass that overwrites it must keep its lease.

Taking it: read the object; a live holder means refusal (`LeaseHeld`, one line naming the
holder); absent on a local disk means an exclusive create (a hard link of a complete temp
file: of two passes exactly one creates it, the other refuses, with no wait); absent on
object storage, stale or broken (`break_lease`) means write our own lease, wait
`SETTLE_SECONDS`, re-read it and compare the token (checked re-read: of two passes that
wrote at the same time exactly one reads its own token back; the other refuses). Stale:
the holder's pid is dead on this host, or its heartbeat is older than `timeout_minutes`.
A background thread refreshes the heartbeat while the pass runs (it re-reads the token
first and never overwrites a lease someone else took over). Leaving the `with` block
releases it, also on an exception or Ctrl-C; a process killed outright leaves a lease with
a dead pid, which the next pass on this host takes over at once (elsewhere: after the
timeout).

Limits: the checked re-read assumes one lease write lands within `SETTLE_SECONDS` of
another pass reading the object (true for local disks and object stores in practice); a
pid reused by another process on this host looks alive until the heartbeat times out.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from store.errors import StoreError
from store.fs import filesystem

LEASE_SUFFIX = ".lease.json"
DEFAULT_TIMEOUT_MINUTES = 10.0
SETTLE_SECONDS = 0.3  # between writing our lease and reading it back
MAX_HEARTBEAT_SECONDS = 30.0


class LeaseHeld(StoreError):
    """Another live pass holds the store's lease."""


class LeaseLost(StoreError):
    """The lease was taken over by another pass while this one ran."""


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object holds (times are Unix seconds)."""

    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    pass_name: str
    token: str

    def to_json(self) -> bytes:
        data = asdict(self)
        data["started_utc"] = _iso(self.started)
        data["heartbeat_utc"] = _iso(self.heartbeat)
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LeaseInfo:
        d = json.loads(raw)
        return cls(
            owner=str(d["owner"]),
            host=str(d["host"]),
            pid=int(d["pid"]),
            started=float(d["started"]),
            heartbeat=float(d["heartbeat"]),
            pass_name=str(d["pass_name"]),
            token=str(d["token"]),
        )

    def describe(self) -> str:
        """`encode-clip by ana@box pid 123 since 2026-12-01 21:08:38 UTC`."""
        return (
            f"{self.pass_name} by {self.owner}@{self.host} pid {self.pid} "
            f"since {_iso(self.started)}"
        )


def lease_url(store_url: str) -> str:
    """Where the lease of `store_url` lives: `<store_url>.lease.json`."""
    return str(store_url).rstrip("/") + LEASE_SUFFIX


def read_lease(store_url: str, storage_options: dict | None = None) -> LeaseInfo | None:
    """The lease now held on `store_url`, None when there is none (or it is unreadable)."""
    fs, path = filesystem(lease_url(store_url), storage_options)
    info = _read(fs, path)
    return info if isinstance(info, LeaseInfo) else None


class Lease:
    """A lease this process holds; `hold_lease` makes and releases it."""

    def __init__(
        self, store_url: str, fs: Any, path: str, info: LeaseInfo, heartbeat_s: float
    ) -> None:
        self.store_url = store_url
        self.info = info
        self.lost = ""  # why the lease is no longer ours ("" = it is)
        self.created_dirs: list[str] = []  # folders made for the lease, removed if left empty
        self._fs, self._path = fs, path
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path}", daemon=True)

    def heartbeat(self) -> None:
        """Refresh the heartbeat time, unless someone else holds the lease now."""
        self.lost = _not_ours(_read(self._fs, self._path), self.info.token)
        if not self.lost:
            self.info = replace(self.info, heartbeat=time.time())
            _write(self._fs, self._path, self.info)

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s) and not self.lost:
            with contextlib.suppress(OSError, ValueError):  # a failed beat: try the next one
                self.heartbeat()

    def _start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease object if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(OSError):  # unreachable storage: the lease goes stale
            current = _read(self._fs, self._path)
            self.lost = self.lost or _not_ours(current, self.info.token)
            if not self.lost:
                self._fs.rm_file(self._path)
        for d in self.created_dirs:  # a pass that failed early leaves no empty folders
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _not_ours(current: LeaseInfo | str | None, token: str) -> str:
    if isinstance(current, LeaseInfo):
        return "" if current.token == token else f"taken over by {current.describe()}"
    return "its lease object was removed" if current is None else "its lease object was replaced"


@contextlib.contextmanager
def hold_lease(
    store_url: str,
    pass_name: str,
    storage_options: dict | None = None,
    break_lease: bool = False,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    log: Callable[[str], None] | None = None,
) -> Iterator[Lease]:
    """Hold the write lease of `store_url` for the `with` block (see the module doc).

    Raises LeaseHeld when a live pass holds it (unless `break_lease`), StoreError when the
    lease cannot be written there (a path under a file, no permission), and LeaseLost at the
    end when another pass took the lease over meanwhile. `log` gets the note printed when a
    stale or broken lease is taken over.
    """
    store_url = str(store_url)
    if not timeout_minutes > 0:
        raise StoreError(f"lease timeout must be > 0 minutes, got {timeout_minutes!r}")
    where = lease_url(store_url)
    try:
        fs, path = filesystem(where, storage_options)
        lease, note = _acquire(store_url, fs, path, pass_name, break_lease, timeout_minutes)
    except StoreError:  # StorageUnavailable (retries spent) is an OSError too: keep its line
        raise
    except OSError as exc:
        raise StoreError(
            f"{store_url}: cannot write there ({_os_reason(exc)}); choose an output path "
            f"you can write to"
        ) from None
    if note and log is not None:
        log(note)
    lease._start()
    ok = False
    try:
        yield lease
        ok = True
    finally:
        lease.release()
        if ok and lease.lost:
            raise LeaseLost(
                f"{store_url}: lost the write lease while this pass ran ({lease.lost}); "
                f"check the store with `deltaedit store verify` and rerun"
            )


# --- internals ---------------------------------------------------------------------------


def _acquire(
    store_url: str, fs: Any, path: str, pass_name: str, break_lease: bool, timeout: float
) -> tuple[Lease, str]:
    now = time.time()
    current = _read(fs, path)
    note = ""
    if current is not None:
        why = "it was broken (--break-lease)" if break_lease else _stale(current, now, timeout)
        if not why:
            raise LeaseHeld(_held_line(store_url, current, now))
        holder = current.describe() if isinstance(current, LeaseInfo) else "an unreadable lease"
        note = f"note: {store_url}: took over the lease of {holder}: {why}"
    mine = LeaseInfo(
        owner=_owner(),
        host=socket.gethostname(),
        pid=os.getpid(),
        started=now,
        heartbeat=now,
        pass_name=pass_name,
        token=uuid.uuid4().hex,
    )
    local = isinstance(fs, LocalFileSystem)
    created = _make_parents(path) if local else []
    # a free lease on a local disk: an exclusive create decides at once (no settle wait);
    # object storage, a takeover, or a disk without hard links: the checked re-read
    alone = _create_exclusive(path, mine) if local and current is None else None
    if alone is None:
        _write(fs, path, mine)
        time.sleep(SETTLE_SECONDS)
    back = mine if alone else _read(fs, path)
    if not isinstance(back, LeaseInfo) or back.token != mine.token:
        if isinstance(back, LeaseInfo):
            raise LeaseHeld(_held_line(store_url, back, time.time()))
        raise LeaseHeld(f"{store_url}: another pass is taking the write lease now; retry later")
    heartbeat_s = min(MAX_HEARTBEAT_SECONDS, max(0.05, timeout * 60.0 / 4.0))
    lease = Lease(store_url, fs, path, mine, heartbeat_s)
    lease.created_dirs = created
    return lease, note


def _make_parents(path: str) -> list[str]:
    """Create the lease's missing parent folders; return them, deepest first."""
    created = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        created.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for d in reversed(created):
        os.mkdir(d)
    return created


def _held_line(store_url: str, holder: LeaseInfo | str, now: float) -> str:
    if not isinstance(holder, LeaseInfo):
        return f"{store_url}: another pass is writing it; retry later"
    age = max(0.0, now - holder.heartbeat)
    return (
        f"{store_url}: in use by {holder.describe()} (heartbeat {age:.0f} s ago); wait for it "
        f"to finish, or pass --break-lease if it is gone"
    )


def _stale(info: LeaseInfo | str, now: float, timeout_minutes: float) -> str:
    """Why the lease may be taken over ('' = it is live)."""
    if not isinstance(info, LeaseInfo):
        return "its lease object is unreadable"
    if info.host == socket.gethostname() and not _pid_alive(info.pid):
        return f"pid {info.pid} is no longer running on this host"
    age = now - info.heartbeat
    if age > timeout_minutes * 60.0:
        return f"no heartbeat for {age / 60.0:.1f} min (lease_timeout {timeout_minutes:g} min)"
    return ""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _read(fs: Any, path: str) -> LeaseInfo | str | None:
    """The lease at path; None if absent; the raw text if it is not a lease we can read."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return LeaseInfo.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:80]


def _write(fs: Any, path: str, info: LeaseInfo) -> None:
    """Write the lease object whole: temp + rename on a local disk (a reader never sees half
    a file), one PUT (atomic by itself) on object storage."""
    if isinstance(fs, LocalFileSystem):
        os.replace(_complete_temp(path, info), path)
    else:
        fs.pipe_file(path, info.to_json())


def _complete_temp(path: str, info: LeaseInfo) -> str:
    """A temp file beside `path` holding the whole lease (renamed or linked into place)."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(info.to_json())
    return tmp


def _create_exclusive(path: str, info: LeaseInfo) -> bool | None:
    """Create the lease file only if none exists (a hard link of a complete temp file:
    atomic, and exclusive across processes): True = ours, False = another pass created it
    first, None = this file system has no hard links (the caller falls back)."""
    tmp = _complete_temp(path, info)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # EPERM / ENOTSUP: links not supported here
        return None
    finally:
        os.unlink(tmp)


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _os_reason(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    return f"{what}: {exc.filename}" if exc.filename else what
