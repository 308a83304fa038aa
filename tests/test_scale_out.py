"""Past one machine (issue 14): the pipeline from ingest to gallery with every store and
checkpoint in an S3 bucket (a real moto server process) and every block task on a real
Dask cluster (a `dask scheduler` and two `dask worker` processes), equal to a local run
array by array and file by file; a worker SIGKILLed mid-pass; every worker gone; a
scheduler or an endpoint that does not answer; a scheme with no implementation.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from store import RowStore
from store import fs as storefs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STORES = ("images/manifest.zarr", "images/clip.zarr", "images/s.zarr")
EDITS = ("blue", "triangle")


def pipeline_params(world: Path, root: str, execution: dict) -> dict:
    """The bundled shapes-world configuration made small; model paths relative to the repo
    root (the tests run from there, the workers do not)."""
    return {
        "execution": {"device": "cpu", "workers": 2, "batch_size": 32, **execution},
        "generator": {"path": "weights/world/generator.safetensors"},
        "e4e": {"path": "weights/world/e4e.safetensors"},
        "clip": {
            "name": "world-clip",
            "weights": "weights/world/clip.safetensors",
            "preprocessing": "deltaedit",
        },
        "ingest": {"source": str(world), "out": f"{root}/images", "rows_per_shard": 32},
        "encode_clip": {"dataset": f"{root}/images"},
        "encode_s": {"dataset": f"{root}/images"},
        "train": {
            "stores": [f"{root}/images"],
            "out": f"{root}/mapper.safetensors",
            "metrics_dir": f"{root}/metrics/train",
            "iterations": 12,
            "batch_size": 32,
            "val_every": 6,
            "checkpoint_every": 6,
        },
        "edit": {
            "dataset_kind": "shapes",
            "store": f"{root}/images",
            "mapper": f"{root}/mapper.safetensors",
            "out_dir": f"{root}/edits",
            "antisymmetric": True,
            "edits": [
                {
                    "name": "blue",
                    "target": "blue shape",
                    "neutral": "red shape",
                    "alpha": 1.0,
                    "beta": 0.0,
                },
                {
                    "name": "triangle",
                    "target": "triangle",
                    "neutral": "circle",
                    "alpha": 1.2,
                    "beta": 0.0,
                },
            ],
        },
        "render": {
            "edits_dir": f"{root}/edits",
            "store": f"{root}/images",
            "out_dir": f"{root}/render",
            "max_rows": 24,
            "sheet_rows": 4,
            "gallery_rows": 4,
            "sheet_tile": 32,
        },
    }


def cli(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"deltaedit {' '.join(args)}:\n{result.output[-3000:]}"
    return result.output


def run_pipeline(params: dict, folder: Path) -> list[str]:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = []
    for stage in (["ingest"], ["encode-clip"], ["encode-s"], ["train"], ["edit"], ["render"]):
        quiet = ["-q"] if stage[0] != "edit" else []
        outputs.append(cli([*stage, "--params", str(path), *quiet]))
    return outputs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    cli(["world", "render", "--set", "world.n_images=64", "--set", f"world.out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def local_run(world, tmp_path_factory) -> Path:
    """The reference: every stage in this process on local disk."""
    root = tmp_path_factory.mktemp("local")
    run_pipeline(pipeline_params(world, str(root), {}), root)
    return root


def files_under(url: str, options: dict | None = None) -> dict[str, bytes]:
    fs, path = storefs.filesystem(url, options)
    base = path.rstrip("/")
    return {p[len(base) + 1 :]: fs.cat_file(p) for p in fs.find(base)}


def wait_for_done_blocks(url: str, n: int, options: dict | None = None) -> int:
    """Wait (60 s at most) until the store at url has n done blocks; returns how many."""
    done = 0
    end = time.monotonic() + 60
    while time.monotonic() < end and done < n:
        try:
            done = len(RowStore.open(url, storage_options=options).done_blocks())
        except Exception:  # noqa: BLE001 - the store is still being created
            pass
        time.sleep(0.05)
    return done


def assert_stores_equal(local: str, remote: str, options: dict) -> None:
    a = RowStore.open(local)
    b = RowStore.open(remote, storage_options=options)
    assert a.array_names == b.array_names and a.n_rows == b.n_rows
    assert np.array_equal(a.status(), b.status()), remote
    assert np.array_equal(a.done_mask(), b.done_mask()), remote
    for name in a.array_names:
        assert np.array_equal(a.read(name), b.read(name)), f"{remote}:{name}"


def test_pipeline_on_s3_and_a_cluster_equals_a_local_run(
    world, local_run, s3_server, dask_cluster, tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)  # relative model paths: the workers run in another folder
    bucket = s3_server.make_bucket("pipeline")
    root = f"s3://{bucket}/run"
    so = s3_server.options
    execution = {"scheduler_address": dask_cluster.address, "storage_options": so}
    outputs = run_pipeline(pipeline_params(world, root, execution), tmp_path)
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()
    assert f"-> {root}/mapper.safetensors" in outputs[3]

    for rel in STORES + tuple(f"edits/{e}.zarr" for e in EDITS):
        assert_stores_equal(f"{local_run}/{rel}", f"{root}/{rel}", so)
    ok = RowStore.open(f"{root}/edits/blue.zarr", storage_options=so).ok_rows()
    assert len(ok) > 30  # the edits cover the dataset, not a handful of rows
    for name in ("mapper.safetensors", "mapper.json"):
        want = json.loads((local_run / name).read_text()) if name.endswith(".json") else None
        got = storefs.read_bytes(f"{root}/{name}", so)
        if want is None:
            assert got == (local_run / name).read_bytes()
        else:  # the json records the store paths it was trained from
            got_cfg = json.loads(got)
            assert got_cfg["fingerprint"] == want["fingerprint"]
            assert got_cfg["metrics"] == want["metrics"]
    metrics = json.loads(storefs.read_text(f"{root}/metrics/train/metrics.json", so))
    assert metrics == json.loads((local_run / "metrics/train/metrics.json").read_text())

    local_files = files_under(str(local_run / "render"))
    remote_files = files_under(f"{root}/render", so)
    assert set(remote_files) == set(local_files)
    assert {"index.html", "render.json", "sheets/blue.png", "sheets/triangle.png"} <= set(
        remote_files
    )
    assert sum(1 for f in remote_files if f.startswith("blue/")) == 24
    for name, data in local_files.items():
        if name == "index.html":  # the page names nothing but relative files
            assert remote_files[name].decode() == data.decode()
        assert remote_files[name] == data, name
    assert not [f for f in storefs.listdir(f"{root}/render", so) if f.endswith(".tmp")]


def test_a_worker_killed_mid_pass_the_pass_completes_equal(
    world, local_run, s3_server, dask_cluster, tmp_path
):
    from stages.common import ClipRef, ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, run_encode_clip
    from stages.ingest import IngestConfig, run_ingest

    so = s3_server.options
    bucket = s3_server.make_bucket("killed")
    ds = f"s3://{bucket}/images"
    ex = ExecutionConfig(
        device="cpu", scheduler_address=dask_cluster.address, storage_options=so, batch_size=8
    )
    run_ingest(IngestConfig(source=str(world), out=ds, rows_per_shard=8), ex, progress=False)
    clip = ClipRef(
        name="world-clip",
        weights=str(ROOT / "weights/world/clip.safetensors"),
        preprocessing="deltaedit",
    )
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(
            r=run_encode_clip(EncodeClipConfig(dataset=ds), clip, ex, progress=False)
        )
    )
    runner.start()
    url = f"{ds}/clip.zarr"
    # the rows are encoded into clip.zarr.compute, then assembled: kill once under way
    done_at_kill = wait_for_done_blocks(f"{url}.compute", 2, so)
    dask_cluster.kill_worker(0)
    runner.join(120)
    dask_cluster.start_worker(0)  # the cluster again has two workers for the next tests
    assert "r" in result, "the pass did not complete after a worker was killed"
    n_blocks = RowStore.open(url, storage_options=so).n_blocks
    assert 2 <= done_at_kill < n_blocks  # the kill happened mid-pass
    assert result["r"].summary.blocks_run == n_blocks
    # the local reference has 32-row shards, this store 8-row ones: compare the rows
    a = RowStore.open(f"{local_run}/images/clip.zarr")
    b = RowStore.open(url, storage_options=so)
    assert np.array_equal(a.status(), b.status())
    assert np.array_equal(a.read("embed"), b.read("embed"))
    dask_cluster.wait_workers(2)


def test_every_worker_gone_is_one_line_after_the_timeout_and_the_store_resumes(
    world, local_run, tmp_path, monkeypatch
):
    from servers import start_cluster

    from stages.common import ClipRef, ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, _ClipTask, run_encode_clip
    from stages.execution import ClusterError
    from stages.ingest import IngestConfig, run_ingest

    ds = str(tmp_path / "images")
    run_ingest(
        IngestConfig(source=str(world), out=ds, rows_per_shard=4),
        ExecutionConfig(device="cpu"),
        progress=False,
    )
    clip = ClipRef(
        name="world-clip",
        weights=str(ROOT / "weights/world/clip.safetensors"),
        preprocessing="deltaedit",
    )
    cluster = start_cluster(tmp_path, n_workers=1)
    try:
        ex = ExecutionConfig(
            device="cpu", scheduler_address=cluster.address, worker_timeout_s=3, batch_size=8
        )
        failure: dict = {}

        def run() -> None:
            try:
                run_encode_clip(EncodeClipConfig(dataset=ds), clip, ex, progress=False)
            except ClusterError as exc:
                failure["error"] = exc

        runner = threading.Thread(target=run)
        runner.start()
        url = f"{ds}/clip.zarr"
        compute_url = f"{url}.compute"  # where the rows are encoded before assembly
        wait_for_done_blocks(compute_url, 1)
        cluster.kill_worker(0)
        t_kill = time.monotonic()
        runner.join(60)
        waited = time.monotonic() - t_kill
    finally:
        cluster.stop()
    message = str(failure.get("error", ""))
    assert "no worker connected" in message and "worker_timeout_s" in message, message
    assert "\n" not in message
    assert 3 <= waited < 30
    st = RowStore.open(compute_url)
    kept = st.done_blocks()
    assert 0 < len(kept) < st.n_blocks  # stopped mid-pass, blocks kept
    calls = []
    real_compute = _ClipTask.compute  # the model step, alone or in the staged runner

    def counting(self, block, data):
        calls.append(block)
        return real_compute(self, block, data)

    monkeypatch.setattr(_ClipTask, "compute", counting)
    run_encode_clip(EncodeClipConfig(dataset=ds), clip, ExecutionConfig(device="cpu"))
    assert sorted(calls) == sorted(set(range(st.n_blocks)) - set(kept))  # only the pending
    ref = RowStore.open(f"{local_run}/images/clip.zarr")
    assert np.array_equal(RowStore.open(url).read("embed"), ref.read("embed"))


def test_a_scheduler_that_does_not_answer_is_one_line(world, tmp_path):
    from servers import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    result = CliRunner().invoke(
        main,
        [
            "ingest",
            str(world),
            "--out",
            str(tmp_path / "ds"),
            "-q",
            "--set",
            f"execution.scheduler_address={address}",
            "--set",
            "execution.connect_timeout_s=2",
        ],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "no scheduler answered" in lines[0], lines
    assert time.monotonic() - t0 < 30


def test_an_unreachable_endpoint_and_a_missing_scheme_are_one_line_before_any_work(world, tmp_path):
    from servers import free_port

    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"}
    args = ["ingest", str(world), "-q", "--set", f"execution.storage_options={json.dumps(dead)}"]
    result = CliRunner().invoke(main, [*args, "--out", "s3://nowhere/ds"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the store" in lines[0], lines
    assert not Path("s3:").exists()

    result = CliRunner().invoke(main, ["ingest", str(world), "-q", "--out", "gs://bkt/ds"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'deltaedit[gcs]'" in lines[0], lines
