"""RowStore: round trip, resume, provenance, status, bad input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

import store
from store import (
    ArraySpec,
    FingerprintMismatch,
    IncompletePass,
    MissingArray,
    NotAStore,
    RowStore,
    SchemaTooNew,
    Status,
    StoreError,
)

SPECS = {
    "s": ArraySpec((12,), "float32"),
    "ids": ArraySpec((), "str"),
    "size": ArraySpec((2,), "int32"),
}


def block_data(rs: RowStore, b: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    sl = rs.block_rows(b)
    n = sl.stop - sl.start
    rng = np.random.default_rng(seed * 1000 + b)
    data = {
        "s": rng.standard_normal((n, 12)).astype(np.float32),
        "ids": np.array([f"img-{r:05d}" for r in range(sl.start, sl.stop)]),
        "size": np.tile(np.arange(sl.start, sl.stop, dtype=np.int32)[:, None], (1, 2)),
    }
    status = np.full(n, Status.OK, dtype=np.uint8)
    status[::5] = Status.UNREADABLE
    return data, status


def mem_url(name: str) -> str:
    return f"memory://{uuid.uuid4().hex}/{name}.zarr"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "s.zarr") if where == "local" else mem_url("s")
    rs = RowStore.create(url, 103, 20, SPECS, {"fingerprint": "abc", "layout": {"dim": (12,)}})
    assert rs.n_blocks == 6 and rs.pending_blocks() == list(range(6))
    assert rs.block_rows(5) == slice(100, 103)
    expected = {}
    for b in range(rs.n_blocks):
        data, status = block_data(rs, b)
        rs.write_block(b, data, status)
        expected[b] = (data, status)
    again = RowStore.open(url, fingerprint="abc", require_complete=True)
    assert again.is_complete() and again.pending_blocks() == []
    assert again.attrs == {"fingerprint": "abc", "layout": {"dim": [12]}}
    s = again.read("s")
    assert s.shape == (103, 12) and s.dtype == np.float32
    np.testing.assert_array_equal(s, np.concatenate([expected[b][0]["s"] for b in range(6)]))
    assert list(again.read("ids", slice(0, 2))) == ["img-00000", "img-00001"]
    np.testing.assert_array_equal(again.read("size", np.array([102, 7, 50]))[:, 0], [102, 7, 50])
    status = np.concatenate([expected[b][1] for b in range(6)])
    np.testing.assert_array_equal(again.status(), status)
    np.testing.assert_array_equal(again.ok_rows(), np.flatnonzero(status == Status.OK))
    # provenance on every array, sharding codec on every data array
    for name in ["s", "ids", "size", "status"]:
        assert again.array(name).attrs["fingerprint"] == "abc"
        assert again.array(name).shards[0] == 20


def test_resume_keeps_done_blocks_and_status_hides_pending(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    rs = RowStore.create(url, 60, 20, SPECS, {"fingerprint": "f"})
    data, status = block_data(rs, 1)
    rs.write_block(1, data, status)
    # a block's data written without its done mark (a writer killed in between) stays pending
    rs.array("s")[0:20] = 7.0
    rs.array("status")[0:20] = Status.OK
    rs2 = RowStore.create(url, 60, 20, SPECS, {"fingerprint": "f"}, mode="resume")
    assert rs2.done_blocks() == [1] and rs2.pending_blocks() == [0, 2]
    assert (rs2.status()[0:20] == Status.PENDING).all()
    np.testing.assert_array_equal(rs2.ok_rows(), 20 + np.flatnonzero(status == Status.OK))
    with pytest.raises(IncompletePass, match=r"2 of 3 blocks pending \(0, 2\)"):
        RowStore.open(url, require_complete=True)
    fresh = RowStore.create(url, 60, 20, SPECS, {"fingerprint": "f"}, mode="overwrite")
    assert fresh.done_blocks() == []


def test_done_block_never_rewritten_with_different_data() -> None:
    rs = RowStore.create(mem_url("x"), 40, 20, SPECS, {"fingerprint": "f"})
    data, status = block_data(rs, 0)
    rs.write_block(0, data, status)
    rs.write_block(0, data, status)  # same data: no-op
    changed = dict(data, s=data["s"] + 1)
    with pytest.raises(StoreError, match="already done with different data"):
        rs.write_block(0, changed, status)
    with pytest.raises(StoreError, match="already done"):
        rs.write_block(0, data, np.where(status == Status.OK, Status.FAILED, status))
    np.testing.assert_array_equal(rs.read("s", slice(0, 20)), data["s"])


def test_write_block_validates_input() -> None:
    rs = RowStore.create(mem_url("x"), 40, 20, SPECS, {"fingerprint": "f"})
    data, status = block_data(rs, 0)
    with pytest.raises(StoreError, match="missing \\['size'\\]"):
        rs.write_block(0, {k: v for k, v in data.items() if k != "size"}, status)
    with pytest.raises(StoreError, match="shape"):
        rs.write_block(0, dict(data, s=data["s"][:5]), status)
    with pytest.raises(StoreError, match="PENDING"):
        rs.write_block(0, data, np.zeros_like(status))
    assert rs.pending_blocks() == [0, 1]


def test_fingerprint_mismatch_names_both() -> None:
    url = mem_url("s")
    RowStore.create(url, 20, 10, SPECS, {"fingerprint": "aaa111"})
    with pytest.raises(FingerprintMismatch, match="'aaa111'.*'bbb222'"):
        RowStore.create(url, 20, 10, SPECS, {"fingerprint": "bbb222"})
    with pytest.raises(FingerprintMismatch, match="'aaa111'.*'ccc333'"):
        RowStore.open(url, fingerprint="ccc333")
    with pytest.raises(StoreError, match="preprocessing"):
        RowStore.create(url, 20, 10, SPECS, {"fingerprint": "aaa111", "preprocessing": "clip"})
    with pytest.raises(StoreError, match="rows"):
        RowStore.create(url, 30, 10, SPECS, {"fingerprint": "aaa111"})
    assert RowStore.open(url).fingerprint == "aaa111"


def test_status_and_ok_rows_across_stores() -> None:
    a = RowStore.create(mem_url("m"), 30, 10, {"x": ArraySpec((), "float32")}, {})
    c = RowStore.create(mem_url("c"), 30, 10, {"x": ArraySpec((), "float32")}, {})
    for b in range(3):
        st = np.full(10, Status.OK, np.uint8)
        st[b] = Status.TOO_LARGE
        a.write_block(b, {"x": np.zeros(10)}, st)
        st2 = np.full(10, Status.OK, np.uint8)
        st2[9] = Status.SKIPPED
        if b < 2:
            c.write_block(b, {"x": np.zeros(10)}, st2)
    rows = store.ok_rows(a, c)
    expect = [r for r in range(20) if r not in (0, 11, 9, 19)]
    np.testing.assert_array_equal(rows, expect)
    counts = store.status_counts(a.status())
    assert counts == {"ok": 27, "too_large": 3}
    assert Status.TOO_LARGE.describe().startswith("too large")
    assert store.summary_line(c.status()) == "30 rows: 10 pending, 18 ok, 2 skipped"
    other = RowStore.create(mem_url("o"), 31, 10, {"x": ArraySpec((), "float32")}, {})
    with pytest.raises(StoreError, match="row counts differ"):
        store.ok_rows(a, other)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(NotAStore, match="no store there"):
        RowStore.open(str(tmp_path / "missing.zarr"))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"not a zarr")
    with pytest.raises(NotAStore):
        RowStore.open(str(folder))
    with pytest.raises(NotAStore, match="refusing to overwrite"):
        RowStore.create(str(folder), 10, 5, SPECS, {}, mode="overwrite")
    assert (folder / "cat.jpg").read_bytes() == b"not a zarr"
    foreign = str(tmp_path / "foreign.zarr")
    zarr.open_group(foreign, mode="w").attrs["hello"] = "world"
    with pytest.raises(NotAStore, match="not a deltaedit store"):
        RowStore.open(foreign)
    with pytest.raises(NotAStore, match="not a deltaedit store"):
        RowStore.create(foreign, 10, 5, SPECS, {}, mode="overwrite")
    assert dict(zarr.open_group(foreign, mode="r").attrs) == {"hello": "world"}


def test_schema_too_new_and_missing_array(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    rs = RowStore.create(url, 20, 10, SPECS, {"fingerprint": "f"})
    data, status = block_data(rs, 0)
    rs.write_block(0, data, status)
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = store.SCHEMA_VERSION + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(SchemaTooNew, match="upgrade deltaedit"):
        RowStore.open(url)
    with pytest.raises(SchemaTooNew):
        RowStore.create(url, 20, 10, SPECS, {"fingerprint": "f"}, mode="overwrite")
    doc["attributes"]["schema_version"] = store.SCHEMA_VERSION
    meta.write_text(json.dumps(doc))
    np.testing.assert_array_equal(RowStore.open(url).read("s", slice(0, 10)), data["s"])
    with pytest.raises(MissingArray, match="no array 'wplus'"):
        RowStore.open(url).read("wplus")
    import shutil

    shutil.rmtree(Path(url) / "size")
    with pytest.raises(MissingArray, match="'size' is missing"):
        RowStore.open(url)


def test_errors_are_one_line(tmp_path: Path) -> None:
    errors = []
    for call in (
        lambda: RowStore.open(str(tmp_path / "nope.zarr")),
        lambda: RowStore.create(mem_url("x"), 10, 0, SPECS, {}),
        lambda: RowStore.create(mem_url("x"), 10, 5, {"status": ArraySpec((), "uint8")}, {}),
        lambda: RowStore.create(mem_url("x"), 10, 5, SPECS, {"n_rows": 3}),
    ):
        with pytest.raises(StoreError) as info:
            call()
        errors.append(str(info.value))
    assert all("\n" not in e and len(e) < 400 for e in errors)


def test_fast_local_paths_match_zarr_byte_for_byte(tmp_path: Path, monkeypatch) -> None:
    """Local uncompressed shards are written and read without zarr's codec pipeline; the
    files must be exactly what zarr writes, and reads must equal zarr's reads."""
    import os

    import store.rowstore as rowstore

    monkeypatch.setattr(rowstore, "_CHUNK_TARGET_BYTES", 64)  # several inner chunks per shard
    specs = {"s": ArraySpec((5,), "float32"), "k": ArraySpec((2,), "int32", False)}
    fast = RowStore.create(str(tmp_path / "fast.zarr"), 97, 40, specs, {"fingerprint": "f"})
    slow = RowStore.create(str(tmp_path / "slow.zarr"), 97, 40, specs, {"fingerprint": "f"})
    assert fast.array("s").chunks == (2, 5)  # 20 inner chunks; the last block pads one row
    monkeypatch.setattr(slow, "_write_shard_file", lambda *args: False)
    monkeypatch.setattr(slow, "_local_done_root", lambda: None)
    rng = np.random.default_rng(0)
    for b in range(fast.n_blocks):
        sl = fast.block_rows(b)
        n = sl.stop - sl.start
        data = {
            "s": rng.standard_normal((n, 5)).astype(np.float32),
            "k": rng.integers(0, 9, (n, 2)).astype(np.int32),
        }
        status = np.full(n, Status.OK, np.uint8)
        fast.write_block(b, data, status)
        slow.write_block(b, data, status)
    files = {}
    for root, _, names in os.walk(tmp_path / "fast.zarr"):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tmp_path / "fast.zarr")
            files[rel] = (tmp_path / "fast.zarr" / rel).read_bytes()
    assert len(files) > 10
    for rel, content in files.items():
        assert (tmp_path / "slow.zarr" / rel).read_bytes() == content, rel
    reopened = RowStore.open(str(tmp_path / "fast.zarr"), require_complete=True)
    for b in range(reopened.n_blocks):
        out = np.full((40, 5), -1, np.float32)
        reopened.read_block_into("s", b, out)
        sl = reopened.block_rows(b)
        np.testing.assert_array_equal(out[: sl.stop - sl.start], reopened.read("s", sl))
    # a block never written reads as the fill value, through zarr
    partial = RowStore.create(str(tmp_path / "p.zarr"), 97, 40, specs, {})
    out = np.full((40, 5), -1, np.float32)
    partial.read_block_into("s", 1, out)
    assert (out == 0).all()


def test_retry_policy_retries_transient_errors_only_and_gives_up_in_one_line():
    import errno

    from store.fs import RetryPolicy, StorageUnavailable

    policy = RetryPolicy(retries=3, backoff_s=0.001)
    calls = []

    def flaky(fail: int, exc: Exception):
        def f():
            calls.append(1)
            if len(calls) <= fail:
                raise exc
            return "ok"

        return f

    assert policy.call("s3://b/k", "cat_file", flaky(2, OSError(errno.EBUSY, "SlowDown"))) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # a missing key is an answer, not a failure
        policy.call("s3://b/k", "cat_file", flaky(5, FileNotFoundError("k")))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(StorageUnavailable) as info:
        policy.call("s3://b/k", "pipe_file", flaky(9, ConnectionResetError("reset")))
    assert len(calls) == 4 and isinstance(info.value, OSError)
    assert "s3://b/k: storage request failed on all 4 attempt(s)" in str(info.value)
    assert "\n" not in str(info.value)
    calls.clear()
    # a delete whose first answer got lost: the retry finds nothing, which means done
    seq = iter([TimeoutError("lost"), FileNotFoundError("k")])

    def delete():
        raise next(seq)

    assert policy.call("s3://b/k", "rm_file", delete) is None
