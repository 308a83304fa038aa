"""execution.precision (bf16 compute), decode threads sized from the cores, and the staged
block runner (reads / compute / writes of consecutive blocks overlapped)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_edit import cli, cli_base, shared_dataset

from stages.common import ExecutionConfig, cores, decode_setting, decode_threads_for
from stages.execution import BlockReport, PassSummary, Staged, run_blocks

# bf16 vs fp32 on the tiny configs, measured (bench/bench_precision.py; these tests):
# mapped delta max 9e-3 relative error, sampled S 4e-3, CLIP 6e-3; renders 45-53 dB PSNR.
DELTA_REL_TOL = 0.03
PSNR_MIN_DB = 35.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shared_dataset(tmp_path_factory)


def _edit(ds, tmp_path, precision):
    from store import RowStore

    r = cli(
        "edit",
        *cli_base(ds, tmp_path),
        "--set",
        f"execution.precision={precision}",
        "--target",
        "a smiling face",
        "--name",
        "smile",
        "--beta",
        "0",
    )
    assert r.exit_code == 0, r.output
    return RowStore.open(str(tmp_path / "edits" / "smile.zarr"))


def test_bf16_edit_through_the_cli_is_within_the_measured_tolerance_of_fp32(dataset, tmp_path):
    from store import RowStore, store_url

    s = RowStore.open(store_url(str(dataset["root"]), "s")).read("s")
    fp32 = _edit(dataset, tmp_path / "fp32", "fp32")
    bf16 = _edit(dataset, tmp_path / "bf16", "bf16")
    rows = fp32.ok_rows()
    assert np.array_equal(rows, bf16.ok_rows()) and len(rows)
    d32 = fp32.read("s", rows=rows) - s[rows]
    d16 = bf16.read("s", rows=rows) - s[rows]
    assert bf16.read("s").dtype == np.float32  # stored float32 whatever the compute dtype
    rel = np.linalg.norm(d16 - d32, axis=1) / np.linalg.norm(d32, axis=1)
    assert rel.max() < DELTA_REL_TOL, rel
    assert rel.max() > 0  # bf16 really ran: the deltas are not the fp32 ones
    # the compute dtype is part of the edit's provenance: fp32 and bf16 rows never mix
    assert bf16.attrs["precision"] == "bf16" and "precision" not in fp32.attrs
    assert bf16.attrs["fingerprint"] != fp32.attrs["fingerprint"]


@pytest.mark.parametrize("flags", [{"avx512f", "amx_tile", "amx_bf16"}, {"avx512f", "avx512_bf16"}])
def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_fast(
    dataset, tmp_path, monkeypatch, flags
):
    """precision auto follows the measurement: bf16 on an AMX CPU, fp32 on one with only
    AVX512-BF16 (slower there); the edit records what ran and equals that explicit run."""
    import stages.common

    monkeypatch.setattr(stages.common, "cpu_flags", lambda: set(flags))
    want = "bf16" if "amx_bf16" in flags else "fp32"
    assert ExecutionConfig(device="cpu", precision="auto").precision == want
    auto = _edit(dataset, tmp_path / "auto", "auto")
    explicit = _edit(dataset, tmp_path / want, want)
    assert auto.attrs.get("precision", "fp32") == want
    assert auto.attrs["fingerprint"] == explicit.attrs["fingerprint"]
    assert np.array_equal(auto.read("s"), explicit.read("s"))


@pytest.mark.parametrize("value", ["fp16", "float32", "1"])
def test_invalid_precision_is_one_line(dataset, tmp_path, value):
    args = ("--set", f"execution.precision={value}", "--target", "a smiling face")
    r = cli("edit", *cli_base(dataset, tmp_path), *args)
    assert r.exit_code != 0
    assert "execution.precision" in r.output and "'fp32'" in r.output and "'bf16'" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "edits").exists()


def test_bf16_renders_are_close_to_fp32(dataset):
    from stages.render import render_s

    G = dataset["G"]
    with torch.no_grad():
        s = G.w_to_s(G.wplus(G.mapping(torch.randn(6, G.w_dim)))).numpy()
    a = render_s(G, s, 4).astype(np.float64)
    b = render_s(G, s, 4, precision="bf16").astype(np.float64)
    mse = ((a - b) ** 2).mean()
    assert 0 < mse and 10 * np.log10(255.0**2 / mse) > PSNR_MIN_DB


def test_decode_threads_auto_follows_the_cores(monkeypatch):
    from pipeline.params import ParamError, section
    from stages.encode_clip import EncodeClipConfig
    from stages.encode_s import EncodeSConfig
    from stages.ingest import IngestConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert cores() == 12
    for cls in (EncodeClipConfig, EncodeSConfig, IngestConfig):
        assert cls().decode_threads == "auto"
        assert section({"x": {"decode_threads": 0}}, "x", cls).decode_threads == 0
        with pytest.raises(ParamError, match="decode_threads"):
            section({"x": {"decode_threads": -1}}, "x", cls)
        with pytest.raises(ParamError, match="decode_threads"):
            section({"x": {"decode_threads": "many"}}, "x", cls)
    # auto and 0: the cores shared by the block tasks running at once; a number: as given
    assert decode_setting("auto", ExecutionConfig(workers=1)) == 12
    assert decode_setting(0, ExecutionConfig(workers=3)) == 4
    assert decode_setting("auto", ExecutionConfig(workers=24)) == 1
    assert decode_setting(5, ExecutionConfig(workers=3)) == 5
    # on a cluster each worker sizes its own pool
    remote = ExecutionConfig(scheduler_address="tcp://x:1")
    assert decode_setting("auto", remote) == "auto" and decode_threads_for("auto") == 12


class _Recorder(Staged):
    """A staged task that records its steps; compute(b) waits until block b+1's read has
    started, which only an overlapping runner allows (a serial one would time out)."""

    def __init__(self, n: int) -> None:
        self.n, self.events, self.lock = n, [], threading.Lock()
        self.read_started = [threading.Event() for _ in range(n)]

    def log(self, what: str, b: int) -> None:
        with self.lock:
            self.events.append((what, b))

    def read(self, block: int) -> int:
        self.read_started[block].set()
        self.log("read", block)
        return block * 10

    def compute(self, block: int, data: int) -> int:
        if block + 1 < self.n:
            assert self.read_started[block + 1].wait(5), "the next read did not overlap"
        self.log("compute", block)
        return data + 1

    def write(self, block: int, result: int) -> BlockReport:
        assert result == block * 10 + 1
        self.log("write", block)
        return BlockReport(block, 1, {"OK": 1})


def test_staged_tasks_overlap_reads_with_compute_and_keep_block_order():
    task = _Recorder(5)
    summary = run_blocks(task, list(range(5)), ExecutionConfig(workers=1), "t", progress=False)
    assert isinstance(summary, PassSummary) and summary.rows == 5 and summary.ok == 5
    computed = [b for what, b in task.events if what == "compute"]
    assert computed == list(range(5))
    for b in range(5):  # each block read before computed, computed before written
        order = [task.events.index((w, b)) for w in ("read", "compute", "write")]
        assert order == sorted(order)
    # alone (a Dask task on a cluster) the same task runs its three steps in a row
    solo = _Recorder(1)
    assert solo(0).rows == 1 and [w for w, _ in solo.events] == ["read", "compute", "write"]


def test_bf16_sample_matches_fp32_closely(tmp_path):
    from stages.common import ClipRef, GeneratorRef
    from stages.sample import SampleConfig, run_sample
    from store import RowStore, store_url

    got = {}
    for p in ("fp32", "bf16"):
        cfg = SampleConfig(n=6, out=str(tmp_path / p), rows_per_shard=4)
        ex = ExecutionConfig(device="cpu", workers=1, batch_size=4, precision=p)
        run_sample(cfg, GeneratorRef(), ClipRef(), ex, progress=False)
        got[p] = {n: RowStore.open(store_url(cfg.out, n)) for n in ("s", "clip")}
    assert got["bf16"]["s"].attrs["precision"] == "bf16"
    for name, key in (("s", "s"), ("clip", "embed")):
        a, b = got["fp32"][name].read(key), got["bf16"][name].read(key)
        assert b.dtype == np.float32 and len(got["bf16"][name].ok_rows()) == 6
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert 0 < rel < DELTA_REL_TOL, (name, rel)
