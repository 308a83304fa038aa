"""`deltaedit store info` and `deltaedit store verify` on good and broken stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.cli import main
from store import ArraySpec, RowStore, Status

N, RPS = 50, 20


def make_dataset(root: Path, n_clip: int = N) -> dict[str, RowStore]:
    """A dataset folder: manifest.zarr, clip.zarr, s.zarr, fully written."""
    manifest = RowStore.create(
        str(root / "manifest.zarr"), N, RPS, {"ids": ArraySpec((), "str")}, {"stage": "ingest"}
    )
    clip = RowStore.create(
        str(root / "clip.zarr"),
        n_clip,
        RPS,
        {"embed": ArraySpec((8,), "float32")},
        {"fingerprint": "clip-abc", "preprocessing": "clip", "stage": "encode-clip"},
    )
    s = RowStore.create(
        str(root / "s.zarr"),
        N,
        RPS,
        {"s": ArraySpec((6,), "float32")},
        {"fingerprint": "gen-xyz", "layout": {"dim": 6}, "stage": "encode-s"},
    )
    for rs in (manifest, clip, s):
        for b in range(rs.n_blocks):
            sl = rs.block_rows(b)
            n = sl.stop - sl.start
            status = np.full(n, Status.OK, np.uint8)
            if sl.start == 0:
                status[3] = Status.UNREADABLE if rs is manifest else Status.SKIPPED
            data = {
                name: (
                    np.array([f"id{r}" for r in range(sl.start, sl.stop)])
                    if spec.dtype == "str"
                    else np.ones((n, *spec.tail), np.float32)
                )
                for name, spec in rs.specs.items()
            }
            rs.write_block(b, data, status)
    return {"manifest": manifest, "clip": clip, "s": s}


def test_info_shows_arrays_status_and_provenance(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    result = CliRunner().invoke(main, ["store", "info", str(tmp_path / "clip.zarr")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rows: 50 in 3 blocks of 20 (3 done, 0 pending)" in out
    assert "status: 49 ok, 1 skipped" in out
    assert "embed   [50, 8] float32  shards [20, 8] chunks [20, 8] uncompressed" in out
    assert "fingerprint: clip-abc" in out and "preprocessing: clip" in out
    result = CliRunner().invoke(main, ["store", "info", "--json", str(tmp_path)])
    doc = json.loads(result.output)
    assert [Path(s["url"]).name for s in doc["stores"]] == ["clip.zarr", "manifest.zarr", "s.zarr"]
    assert doc["stores"][2]["provenance"]["layout"] == {"dim": 6}


def test_verify_sound_dataset(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    result = CliRunner().invoke(main, ["store", "verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "verify: 3 store(s) sound" in result.output


def test_verify_reports_each_problem_and_exits_1(tmp_path: Path) -> None:
    stores = make_dataset(tmp_path)
    s = stores["s"]
    s.array("s")[25] = np.full(6, np.nan, np.float32)  # ok row with NaN
    s.array("s")[3] = np.full(6, np.inf, np.float32)  # not ok row: allowed
    s.array("_done")[2] = 0  # an interrupted pass: last block pending
    clip = stores["clip"]
    clip.array("status")[3] = Status.OK  # ok in clip, unreadable in the manifest
    result = CliRunner().invoke(main, ["store", "verify", str(tmp_path)])
    assert result.exit_code == 1
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    text = "\n".join(fails)
    assert "s.zarr: pass incomplete: 1 of 3 blocks pending (2)" in text
    assert "s.zarr: array 's': 1 ok rows hold NaN or Inf" in text
    assert "clip.zarr: 1 rows ok here are not ok in manifest.zarr" in text
    assert len(fails) == 3


def test_verify_row_counts_and_done_marks(tmp_path: Path) -> None:
    stores = make_dataset(tmp_path, n_clip=60)
    stores["s"].array("status")[0:20] = Status.PENDING
    result = CliRunner().invoke(main, ["store", "verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "row counts differ across the dataset's stores: clip.zarr 60" in result.output
    assert "blocks [0] are marked done but hold PENDING rows" in result.output


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["store", "info", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["store", "verify", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "holds no .zarr stores" in result.output
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "junk.zarr").mkdir()
    result = runner.invoke(main, ["store", "verify", str(tmp_path / "ds")])
    assert result.exit_code == 1
    assert result.output.startswith("FAIL") and "no store there" in result.output
    assert isinstance(result.exception, SystemExit)
