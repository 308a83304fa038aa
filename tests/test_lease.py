"""store.lease: one writer per store (in-process; the CLI cases are in test_reliability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from store import LeaseHeld, LeaseLost, StoreError, hold_lease, read_lease
from store.lease import LeaseInfo, lease_url


def _fake_lease(
    store: Path, pid: int, heartbeat_ago: float, host: str | None = None, name: str = "encode-clip"
) -> None:
    """Another pass's lease on `store`, written whole (as store.lease does)."""
    import socket

    now = time.time()
    host = host or socket.gethostname()
    info = LeaseInfo("someone", host, pid, now - 3600, now - heartbeat_ago, name, "f" * 32)
    tmp = Path(lease_url(str(store)) + ".tmp")
    tmp.write_bytes(info.to_json())
    os.replace(tmp, lease_url(str(store)))


def test_lease_is_written_held_and_released(tmp_path: Path) -> None:
    store = tmp_path / "clip.zarr"
    with hold_lease(str(store), "encode-clip") as lease:
        held = read_lease(str(store))
        assert held is not None and held.token == lease.info.token
        assert held.pid == os.getpid() and held.pass_name == "encode-clip"
        raw = json.loads(Path(lease_url(str(store))).read_text())
        assert {"owner", "host", "pid", "started", "heartbeat", "pass_name"} <= set(raw)
        with pytest.raises(LeaseHeld, match=r"in use by encode-clip by .* pid \d+ since"):
            with hold_lease(str(store), "encode-s"):
                pass
    assert read_lease(str(store)) is None
    assert not Path(lease_url(str(store))).exists()


def test_released_on_error_and_ctrl_c(tmp_path: Path) -> None:
    store = str(tmp_path / "s.zarr")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with hold_lease(store, "encode-s"):
                raise exc
        assert read_lease(store) is None


def test_heartbeat_refreshes_and_a_taken_over_lease_is_reported(tmp_path: Path) -> None:
    store = str(tmp_path / "m.zarr")
    with pytest.raises(LeaseLost, match="taken over by sample by someone"):
        with hold_lease(store, "ingest", timeout_minutes=0.004) as lease:  # beat every 0.06 s
            first = lease.info.heartbeat
            time.sleep(0.3)
            assert read_lease(store).heartbeat > first
            _fake_lease(Path(store), os.getpid(), 0.0, name="sample")  # another pass breaks it
            time.sleep(0.3)
            assert lease.lost
    assert read_lease(store).token == "f" * 32  # the new holder's lease is left alone


def test_two_threads_racing_for_a_free_lease_one_wins(tmp_path: Path) -> None:
    store = str(tmp_path / "race.zarr")
    for _ in range(3):
        barrier = threading.Barrier(2)
        outcome: list[str] = []

        def take(barrier: threading.Barrier = barrier, outcome: list[str] = outcome) -> None:
            barrier.wait()
            try:
                with hold_lease(store, "encode-clip"):
                    outcome.append("held")
                    time.sleep(0.8)
            except LeaseHeld:
                outcome.append("refused")

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome) == ["held", "refused"]
        assert read_lease(store) is None


def test_a_free_local_lease_is_created_exclusively_without_the_settle_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pass takes up to three leases: on a local disk a free one costs no wait (the
    exclusive create decides), a takeover still waits and re-reads; no temp file is left."""
    import store.lease as lease_mod

    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(lease_mod.time, "sleep", lambda s: (waits.append(s), real_sleep(s)))
    store = tmp_path / "clip.zarr"
    with hold_lease(str(store), "encode-clip"):
        assert read_lease(str(store)).pass_name == "encode-clip"
    assert lease_mod.SETTLE_SECONDS not in waits
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_lease(store, dead.pid, heartbeat_ago=1.0)
    with hold_lease(str(store), "encode-clip"):
        pass
    assert lease_mod.SETTLE_SECONDS in waits
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_leases_are_taken_over_with_a_note(tmp_path: Path) -> None:
    store = tmp_path / "clip.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    notes: list[str] = []
    _fake_lease(store, dead.pid, heartbeat_ago=1.0)
    with hold_lease(str(store), "encode-clip", log=notes.append):
        pass
    assert notes and f"pid {dead.pid} is no longer running" in notes[0]
    _fake_lease(store, 1, heartbeat_ago=11 * 60, host="elsewhere")
    notes.clear()
    with hold_lease(str(store), "encode-clip", log=notes.append):
        pass
    assert "no heartbeat for 11.0 min" in notes[0]
    _fake_lease(store, os.getpid(), heartbeat_ago=1.0)  # live
    with pytest.raises(LeaseHeld):
        with hold_lease(str(store), "encode-clip"):
            pass
    notes.clear()
    with hold_lease(str(store), "encode-clip", break_lease=True, log=notes.append):
        pass
    assert "--break-lease" in notes[0]
    assert read_lease(str(store)) is None


def test_unwritable_place_is_one_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot write there .*file"):
        with hold_lease(str(tmp_path / "file" / "clip.zarr"), "encode-clip"):
            pass


def test_the_lease_holds_on_object_storage(s3_server) -> None:
    """On a real S3 server (moto on loopback): no POSIX lock, the checked re-read decides.
    One of two racing passes holds the lease, the other is refused naming it; released,
    the lease object is gone; a pass with no heartbeat for too long is taken over."""
    so = s3_server.options
    store = f"s3://{s3_server.make_bucket('leases')}/ds/clip.zarr"
    barrier = threading.Barrier(2)
    outcome: list[str] = []

    def take() -> None:
        barrier.wait()
        try:
            with hold_lease(store, "encode-clip", storage_options=so):
                outcome.append("held")
                time.sleep(1.5)
        except LeaseHeld as exc:
            outcome.append(f"refused: {exc}")

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split(":")[0] for o in outcome) == ["held", "refused"], outcome
    assert "in use by encode-clip" in next(o for o in outcome if o.startswith("refused"))
    assert read_lease(store, so) is None

    import s3fs

    now = time.time()
    info = LeaseInfo("someone", "elsewhere", 1, now - 3600, now - 11 * 60, "encode-s", "f" * 32)
    s3fs.S3FileSystem(**so).pipe(lease_url(store).removeprefix("s3://"), info.to_json())
    notes: list[str] = []
    with hold_lease(store, "encode-clip", storage_options=so, log=notes.append):
        assert read_lease(store, so).pass_name == "encode-clip"
    assert notes and "no heartbeat for 11.0 min" in notes[0]
