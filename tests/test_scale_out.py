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
from stages.common import ClipRef
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
    assert sum(1 for f in remote_files if f.startswith("blue/") and f.endswith(".png")) == 24
    assert any(f.startswith("blue/.record/") for f in remote_files)  # what each file is from
    for name, data in local_files.items():
        if name == "index.html":  # the page names nothing but relative files
            assert remote_files[name].decode() == data.decode()
        if "/.record/" in name and not name.startswith("originals/"):
            continue  # an edit's fingerprint names the store it was made from (here: s3://)
        assert remote_files[name] == data, name
    assert not [f for f in storefs.listdir(f"{root}/render", so) if f.endswith(".tmp")]


def test_a_worker_killed_mid_pass_the_pass_completes_equal(
    world, local_run, s3_server, dask_cluster, tmp_path
):
    from stages.common import ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, run_encode_clip
    from stages.ingest import IngestConfig, run_ingest

    so = s3_server.options
    bucket = s3_server.make_bucket("killed")
    ds = f"s3://{bucket}/images"
    ex = ExecutionConfig(
        device="cpu", scheduler_address=dask_cluster.address, storage_options=so, batch_size=8
    )
    run_ingest(IngestConfig(source=str(world), out=ds, rows_per_shard=8), ex, progress=False)
    clip = world_clip()
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

    from stages.common import ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, _ClipTask, run_encode_clip
    from stages.execution import ClusterError

    ds = str(tmp_path / "images")
    ingest_world(world, ds, 4)
    clip = world_clip()
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


def assert_rows_equal(local: str, remote: str, options: dict) -> None:
    """Row by row, array by array (the stores may have other shard sizes)."""
    a = RowStore.open(local)
    b = RowStore.open(remote, storage_options=options)
    assert a.array_names == b.array_names and a.n_rows == b.n_rows, remote
    assert np.array_equal(a.status(), b.status()), remote
    for name in a.array_names:
        assert np.array_equal(a.read(name), b.read(name)), f"{remote}:{name}"


def ingest_world(world: Path, ds: str, rows_per_shard: int, options: dict | None = None) -> None:
    """The world folder ingested into `ds` by a local pass (the cluster tests encode it)."""
    from stages.common import ExecutionConfig
    from stages.ingest import IngestConfig, run_ingest

    ex = ExecutionConfig(device="cpu", storage_options=options or {})
    run_ingest(
        IngestConfig(source=str(world), out=ds, rows_per_shard=rows_per_shard), ex, progress=False
    )


def world_clip() -> ClipRef:
    return ClipRef(
        name="world-clip",
        weights=str(ROOT / "weights/world/clip.safetensors"),
        preprocessing="deltaedit",
    )


def test_a_flaky_store_is_retried_and_the_pass_on_the_cluster_completes_equal(
    world, local_run, s3_server, dask_cluster
):
    """20% of the requests answered 503 SlowDown or dropped, botocore's and s3fs's own
    retries off in the client and on every worker: deltaedit's retries carry the pass."""
    from distributed import Client
    from servers import FlakyProxy, set_s3fs_retries

    from stages.common import ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, run_encode_clip

    bucket = s3_server.make_bucket("flaky")
    proxy = FlakyProxy(s3_server.port, fail_rate=0.2, seed=14)
    so = proxy.options(s3_server)
    ex = ExecutionConfig(
        device="cpu",
        scheduler_address=dask_cluster.address,
        storage_options=so,
        batch_size=8,
        storage_retries=8,
        storage_backoff_s=0.02,
    )
    ds = f"s3://{bucket}/images"
    # straight to the server: the faults are for the encoder pass
    ingest_world(world, ds, 16, s3_server.options)

    def on_workers(n: int) -> int:  # nested and self-contained: sent by value
        import s3fs

        old, s3fs.S3FileSystem.retries = s3fs.S3FileSystem.retries, n
        return old

    with Client(dask_cluster.address, set_as_default=False) as client:
        before = set_s3fs_retries(1)
        client.run(on_workers, 1)
        try:
            run_encode_clip(EncodeClipConfig(dataset=ds), world_clip(), ex, progress=False)
        finally:
            client.run(on_workers, before)
            set_s3fs_retries(before)
            proxy.fail_rate = 0.0
    assert proxy.failed > 20, (proxy.failed, proxy.requests)  # the faults did happen
    assert_rows_equal(f"{local_run}/images/clip.zarr", f"{ds}/clip.zarr", so)
    leftovers = [k for k in files_under(ds, s3_server.options) if k.endswith((".tmp", ".partial"))]
    assert not leftovers
    proxy.stop()


def test_a_store_that_stops_answering_mid_pass_is_one_line_and_a_rerun_resumes(
    world, local_run, s3_server, monkeypatch
):
    """Every request failing from mid-pass on: the pass stops with one line once the retries
    are spent (not a partial store called done); with the store back a rerun computes only
    the blocks that were not written and equals the local run."""
    import s3fs
    from servers import FlakyProxy

    from stages.common import ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, _ClipTask, run_encode_clip
    from store import StoreError

    bucket = s3_server.make_bucket("outage")
    ds = f"s3://{bucket}/images"
    ingest_world(world, ds, 8, s3_server.options)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # only deltaedit's retries
    proxy = FlakyProxy(s3_server.port, fail_rate=0.0, seed=1)
    so = proxy.options(s3_server)
    ex = ExecutionConfig(
        device="cpu", storage_options=so, batch_size=8, storage_retries=3, storage_backoff_s=0.02
    )
    failure: dict = {}

    def run() -> None:
        try:
            run_encode_clip(EncodeClipConfig(dataset=ds), world_clip(), ex, progress=False)
        except StoreError as exc:
            failure["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    compute_url = f"{ds}/clip.zarr.compute"
    wait_for_done_blocks(compute_url, 2, so)
    proxy.fail_rate = 1.0  # the store stops answering
    runner.join(120)
    proxy.fail_rate = 0.0
    message = str(failure.get("error", ""))
    assert "storage request failed on all 4 attempt(s)" in message, message
    assert "\n" not in message and "rerun" in message
    assert not storefs.exists(f"{ds}/clip.zarr", s3_server.options)  # nothing called done
    st = RowStore.open(compute_url, storage_options=s3_server.options)
    kept = st.done_blocks()
    assert 0 < len(kept) < st.n_blocks
    calls = []
    real_compute = _ClipTask.compute  # the model step, alone or in the staged runner

    def counting(self, block, data):
        calls.append(block)
        return real_compute(self, block, data)

    monkeypatch.setattr(_ClipTask, "compute", counting)
    # the stopped pass ran in this process: its lease names a live pid (a new process
    # would take it over by itself, the pid being gone)
    again = ExecutionConfig(device="cpu", storage_options=so, batch_size=8, break_lease=True)
    run_encode_clip(EncodeClipConfig(dataset=ds), world_clip(), again, progress=False)
    assert sorted(calls) == sorted(set(range(st.n_blocks)) - set(kept))  # only the pending
    assert_rows_equal(f"{local_run}/images/clip.zarr", f"{ds}/clip.zarr", so)
    proxy.stop()


def test_model_tasks_asking_for_a_gpu_run_only_on_the_worker_that_has_one(
    world, local_run, dask_cluster, tmp_path
):
    """execution.worker_resources {GPU: 1}: the encoder's block tasks run only on the worker
    started `--resources GPU=1` (the two plain workers get none of them); equal output."""
    from distributed import Client, get_task_stream

    from stages.common import ExecutionConfig
    from stages.encode_clip import EncodeClipConfig, run_encode_clip
    from stages.execution import ClusterError

    ds = str(tmp_path / "images")
    ingest_world(world, ds, 16)
    ex = ExecutionConfig(
        device="auto",
        scheduler_address=dask_cluster.address,
        worker_resources={"GPU": 1},
        worker_timeout_s=2,
    )
    with pytest.raises(ClusterError) as info:  # no worker has one yet: one line
        run_encode_clip(EncodeClipConfig(dataset=ds), world_clip(), ex, progress=False)
    assert "no worker with resources {'GPU': 1}" in str(info.value)
    assert "--resources GPU=1" in str(info.value) and "\n" not in str(info.value)

    gpu = dask_cluster.start_worker(resources="GPU=1")
    try:
        dask_cluster.wait_workers(3)
        with Client(dask_cluster.address, set_as_default=False) as client:
            gpu_address = next(
                a
                for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                if w.get("resources", {}).get("GPU")
            )
            with get_task_stream(client=client) as stream:
                run_encode_clip(EncodeClipConfig(dataset=ds), world_clip(), ex, progress=False)
        model_tasks = [t for t in stream.data if str(t["key"]).startswith("encode-clip-block")]
        assert len(model_tasks) == RowStore.open(f"{ds}/clip.zarr").n_blocks
        assert {t["worker"] for t in model_tasks} == {gpu_address}
    finally:
        dask_cluster.stop_worker(gpu)
    ref = RowStore.open(f"{local_run}/images/clip.zarr")
    assert np.array_equal(RowStore.open(f"{ds}/clip.zarr").read("embed"), ref.read("embed"))


def test_a_worker_missing_a_model_file_the_client_has_is_one_line_naming_both(
    world, dask_cluster, tmp_path, monkeypatch
):
    """The client checks and loads the CLIP weights, the workers do not find them (gone
    before the tasks start, as on a machine without that folder)."""
    import shutil

    import stages.encode_clip as encode_clip

    ds = str(tmp_path / "images")
    ingest_world(world, ds, 16)
    weights = tmp_path / "client-only" / "clip.safetensors"
    weights.parent.mkdir()
    for suffix in (".safetensors", ".json"):
        src = ROOT / f"weights/world/clip{suffix}"
        if src.exists():
            shutil.copy(src, weights.with_suffix(suffix))
    real_run_blocks = encode_clip.run_blocks

    def workers_lack_it(*args, **kwargs):
        shutil.rmtree(weights.parent)  # after the client used it, before any worker does
        return real_run_blocks(*args, **kwargs)

    monkeypatch.setattr(encode_clip, "run_blocks", workers_lack_it)
    result = CliRunner().invoke(
        main,
        [
            "encode-clip",
            "--dataset",
            ds,
            "-q",
            "--set",
            f"execution.scheduler_address={dask_cluster.address}",
            "--set",
            f"clip.weights={weights}",
            "--set",
            "clip.name=world-clip",
            "--set",
            "clip.preprocessing=deltaedit",
        ],
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert "on worker tcp://127.0.0.1:" in lines[0] and str(weights) in lines[0], lines
