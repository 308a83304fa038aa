"""The red-team cases of issue 13, driven through the CLI as a user would (subprocesses):
exit status, exactly one error line and no traceback, nothing written or lost.

Mixed generators in edit, two writers on one store (the store lease), models returning
NaN for some rows, and the errors that used to print a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from store import ArraySpec, RowStore, Status, read_lease, store_url
from store.lease import LeaseInfo, lease_url

ROOT = Path(__file__).resolve().parents[1]
NAN_CLI = str(ROOT / "tests" / "nan_models.py")
QUIET = ["-q", "--params", os.devnull, "--set", "execution.device=cpu"]


def cli(*args: str, nan: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """`deltaedit ARGS` in a fresh process (this checkout first on the path)."""
    head = [NAN_CLI] if nan else ["-m", "pipeline"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *head, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def here(*args: str) -> str:
    """`deltaedit ARGS` in this process (setup steps that are not under test); its output."""
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (exit 1, no traceback)."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes (what 'nothing written or lost' compares)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("src") / "img", 24)


def ingest(src: Path, out: Path, rows_per_shard: int = 4) -> Path:
    here(
        "ingest",
        str(src),
        "--out",
        str(out),
        *QUIET,
        "--set",
        f"ingest.rows_per_shard={rows_per_shard}",
    )
    return out


def verified(path: Path) -> bool:
    """`deltaedit store verify PATH` passes (in this process)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, ["store", "verify", str(path)]).exit_code == 0


# --- 2. one writer per store --------------------------------------------------------------


def fake_lease(store: Path, pid: int, heartbeat_ago: float = 1.0, host: str = "") -> None:
    now = time.time()
    info = LeaseInfo(
        "someone",
        host or socket.gethostname(),
        pid,
        now - 60,
        now - heartbeat_ago,
        "encode-clip",
        "f" * 32,
    )
    Path(lease_url(str(store))).write_bytes(info.to_json())


def test_second_pass_on_a_store_refuses_naming_the_holder(tmp_path: Path) -> None:
    ds = ingest(make_images(tmp_path / "img", 64), tmp_path / "ds", rows_per_shard=2)
    clip = ds / "clip.zarr"
    args = ["encode-clip", "--dataset", str(ds), *QUIET, "--set", "execution.batch_size=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while read_lease(str(clip)) is None and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # the first pass holds the lease, mid-pass
        held = Path(lease_url(str(clip))).read_bytes()
        # a second pass, with another CLIP (the red-team race that broke the store)
        second = cli(*args, "--set", "clip.seed=1")
        line = one_line_error(second)
        assert "clip.zarr: in use by encode-clip by" in line and f"pid {first.pid}" in line
        assert "since" in line and "--break-lease" in line
        assert Path(lease_url(str(clip))).read_bytes() == held  # the holder's lease untouched
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "ok 64" in out
    assert verified(ds)
    assert read_lease(str(clip)) is None  # released at the end


def test_stale_lease_of_a_dead_pid_is_taken_over_with_a_note(images, tmp_path: Path) -> None:
    ds = ingest(images, tmp_path / "ds")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_lease(ds / "clip.zarr", dead.pid)
    res = cli("encode-clip", "--dataset", str(ds), *QUIET)
    assert res.returncode == 0, res.stderr
    assert (
        f"took over the lease of encode-clip by someone@{socket.gethostname()} pid "
        f"{dead.pid}" in res.stdout
    )
    assert "no longer running on this host" in res.stdout
    assert read_lease(str(ds / "clip.zarr")) is None
    assert verified(ds)


def test_live_lease_refuses_and_break_lease_takes_it_over(images, tmp_path: Path) -> None:
    ds = ingest(images, tmp_path / "ds")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        fake_lease(ds / "s.zarr", holder.pid)
        args = ["encode-s", "--dataset", str(ds), *QUIET]
        line = one_line_error(cli(*args))
        assert (
            f"s.zarr: in use by encode-clip by someone@{socket.gethostname()} pid "
            f"{holder.pid} since" in line
        )
        assert not (ds / "s.zarr").exists()
        res = cli(*args, "--break-lease")
        assert res.returncode == 0, res.stderr
        assert "took over the lease" in res.stdout and "--break-lease" in res.stdout
    finally:
        holder.kill()
        holder.wait()
    assert read_lease(str(ds / "s.zarr")) is None
    assert verified(ds)


def test_lease_without_heartbeat_for_the_timeout_is_stale(images, tmp_path: Path) -> None:
    ds = ingest(images, tmp_path / "ds")
    fake_lease(ds / "clip.zarr", 1, heartbeat_ago=120, host="another-host")
    args = ["encode-clip", "--dataset", str(ds), *QUIET]
    line = one_line_error(cli(*args))  # 2 minutes without heartbeat: live for the default 10
    assert "someone@another-host pid 1" in line
    res = cli(*args, "--set", "execution.lease_timeout=1")
    assert res.returncode == 0, res.stderr
    assert "no heartbeat for 2." in res.stdout and "min (lease_timeout 1 min)" in res.stdout


# --- 3. non-finite model outputs ----------------------------------------------------------


def test_encode_clip_marks_nan_rows_failed_and_keeps_the_rest(images, tmp_path: Path) -> None:
    clean = ingest(images, tmp_path / "clean")
    here("encode-clip", "--dataset", str(clean), *QUIET)
    ds = ingest(images, tmp_path / "ds")
    res = cli("encode-clip", "--dataset", str(ds), *QUIET, nan=True)
    assert res.returncode == 0, res.stderr
    store = RowStore.open(str(ds / "clip.zarr"))
    status = store.status()
    n_bad = int((status == Status.NON_FINITE).sum())
    assert 0 < n_bad < 24
    assert f"NON_FINITE {n_bad}" in res.stdout.splitlines()[0]
    assert "NON_FINITE: " in res.stdout  # the rows are listed
    ok = status == Status.OK
    assert ok.sum() == 24 - n_bad
    want = RowStore.open(str(clean / "clip.zarr")).read("embed")[ok]
    assert store.read("embed")[ok].tobytes() == want.tobytes()  # the good rows are untouched
    assert np.isfinite(store.read("embed")).all()  # no NaN stored at all
    assert verified(ds)
    assert "failed: non-finite output" in Status.NON_FINITE.describe()


def test_encode_s_and_sample_mark_nan_rows(images, tmp_path: Path) -> None:
    ds = ingest(images, tmp_path / "ds")
    res = cli("encode-s", "--dataset", str(ds), *QUIET, nan=True)
    assert res.returncode == 0, res.stderr
    n_bad = int((RowStore.open(str(ds / "s.zarr")).status() == Status.NON_FINITE).sum())
    assert 0 < n_bad < 24 and f"NON_FINITE {n_bad}" in res.stdout
    out = tmp_path / "smp"
    res = cli("sample", "--n", "12", "--out", str(out), *QUIET, nan=True)
    assert res.returncode == 0, res.stderr
    for name in ("manifest", "clip", "s"):
        status = RowStore.open(store_url(str(out), name)).status()
        assert 0 < (status == Status.NON_FINITE).sum() < 12
    n_bad = int((status == Status.NON_FINITE).sum())
    assert f"NON_FINITE {n_bad}" in res.stdout
    assert verified(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A sampled dataset (tiny generator, seed 0) and a mapper trained on it by the CLI."""
    root = tmp_path_factory.mktemp("trained")
    ds, mapper = root / "ds", root / "mapper.safetensors"
    here("sample", "--n", "16", "--out", str(ds), *QUIET, "--set", "sample.rows_per_shard=8")
    here(
        "train",
        *QUIET,
        "--iterations",
        "3",
        "--set",
        f"train.stores=['{ds}']",
        "--set",
        f"train.out={mapper}",
        "--set",
        f"train.metrics_dir={root / 'metrics'}",
        "--set",
        "train.batch_size=4",
    )
    return {"root": root, "ds": ds, "mapper": mapper}


def edit_args(store: Path, mapper: Path, out: Path) -> list[str]:
    return [
        "edit",
        *QUIET,
        "--target",
        "a red shape",
        "--name",
        "red",
        "--beta",
        "0",
        "--set",
        f"edit.store={store}",
        "--set",
        f"edit.mapper={mapper}",
        "--set",
        f"edit.out_dir={out}",
    ]


def test_edit_marks_rows_the_mapper_gives_nan_for(trained, tmp_path: Path) -> None:
    res = cli(*edit_args(trained["ds"], trained["mapper"], tmp_path / "edits"), nan=True)
    assert res.returncode == 0, res.stderr
    status = RowStore.open(str(tmp_path / "edits" / "red.zarr")).status()
    n_bad = int((status == Status.NON_FINITE).sum())
    assert 0 < n_bad < 16
    assert f"{16 - n_bad} rows edited" in res.stdout
    assert f"{n_bad} failed: non-finite output" in res.stdout
    assert verified(tmp_path / "edits")


def write_nan_store(root: Path, n: int, nan_rows: list[int], data_seed: int = 0) -> None:
    """clip.zarr + s.zarr under root (blocks of 8 rows, all ok) whose s holds NaN in
    `nan_rows`, as an older deltaedit stored a NaN model output."""
    from train_data import write_pair_store

    write_pair_store(str(root), n, rows_per_shard=8, data_seed=data_seed)
    s = RowStore.open(store_url(str(root), "s"))
    values = s.read("s")
    values[nan_rows] = np.nan
    fresh = RowStore.create(
        s.url, n, 8, {"s": ArraySpec((values.shape[1],), "float32")}, s.attrs, mode="overwrite"
    )
    for b in range(fresh.n_blocks):
        sl = fresh.block_rows(b)
        fresh.write_block(b, {"s": values[sl]}, np.full(sl.stop - sl.start, Status.OK, np.uint8))


def test_train_refuses_a_store_with_non_finite_ok_rows(tmp_path: Path) -> None:
    from train_data import write_pair_store

    write_pair_store(str(tmp_path / "ds"), 32, rows_per_shard=8)
    poisoned = tmp_path / "bad"
    write_nan_store(poisoned, 32, [3, 9, 17], data_seed=1)
    mapper = tmp_path / "mapper.safetensors"
    res = cli(
        "train",
        *QUIET,
        "--iterations",
        "2",
        "--set",
        f"train.stores=['{tmp_path / 'ds'}', '{poisoned}']",
        "--set",
        f"train.out={mapper}",
        "--set",
        f"train.metrics_dir={tmp_path / 'm'}",
    )
    line = one_line_error(res)
    assert f"{poisoned}/s.zarr: 3 ok rows hold NaN or Inf" in line
    assert not mapper.exists() and not (tmp_path / "m").exists()


# --- 1. a mapper applied to a store of another generator ----------------------------------


def test_edit_refuses_a_store_of_another_generator(trained, tmp_path: Path) -> None:
    other = tmp_path / "other"
    here("sample", "--n", "8", "--out", str(other), *QUIET, "--set", "generator.seed=1")
    from model.stylegan2 import create_generator

    g0 = create_generator("tiny-64", seed=0).fingerprint
    g1 = create_generator("tiny-64", seed=1).fingerprint
    before = tree(other)
    line = one_line_error(cli(*edit_args(other, trained["mapper"], tmp_path / "edits")))
    assert f"trained on latents of generator {g0[:12]}" in line
    assert f"encoded with generator {g1[:12]}" in line
    assert not (tmp_path / "edits").exists() and tree(other) == before


# --- 4. errors that used to be tracebacks -------------------------------------------------


def test_missing_clip_weights_names_the_path(images, tmp_path: Path) -> None:
    ds = ingest(images, tmp_path / "ds")
    before = tree(ds)
    missing = tmp_path / "weights" / "clip.safetensors"
    res = cli(
        "encode-clip",
        "--dataset",
        str(ds),
        *QUIET,
        "--set",
        "clip.name=world-clip",
        "--set",
        f"clip.weights={missing}",
    )
    line = one_line_error(res)
    assert f"{missing}: CLIP weights file not found" in line
    assert tree(ds) == before  # no clip.zarr, no lease left behind


def test_output_path_that_cannot_be_written(images, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_line_error(cli("ingest", str(images), "--out", str(blocker / "ds"), *QUIET))
    assert str(blocker) in line and "cannot write there" in line
    assert blocker.read_text() == "not a folder"
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a place no one can write
        target = Path("/sys/deltaedit-test-ds")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "ds"
    line = one_line_error(cli("ingest", str(images), "--out", str(target), *QUIET))
    assert str(target.parent) in line and "cannot write there" in line
    assert not target.exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "--params {path}: no such file"),
        (
            "encode_clipp:\n  dataset: x\n",
            "{path}: unknown params section 'encode_clipp'; known "
            "sections: execution, generator, clip",
        ),
        (
            "execution:\n  workers: [1, 2\nclip: {}\n",
            "{path}:3:5: not valid YAML (while parsing a flow sequence",
        ),
        (
            "execution:\n  - cpu\n",
            "params: execution: got ['cpu'], expected a mapping of ExecutionConfig fields",
        ),
    ],
    ids=["missing-file", "unknown-section", "invalid-yaml", "section-as-list"],
)
def test_params_file_errors_are_one_line(images, tmp_path: Path, text, expected) -> None:
    ds = ingest(images, tmp_path / "ds")
    before = tree(ds)
    params = tmp_path / "params.yaml"
    if text is not None:
        params.write_text(text)
    res = cli("encode-clip", "--dataset", str(ds), "-q", "--params", str(params))
    line = one_line_error(res)
    assert expected.format(path=params) in line
    assert "execution.execution" not in line
    assert tree(ds) == before


def test_a_second_train_on_one_mapper_refuses(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from train_data import write_pair_store

    from pipeline.cli import main
    from store import hold_lease

    write_pair_store(str(tmp_path / "ds"), 16, rows_per_shard=8)
    mapper = tmp_path / "mapper.safetensors"
    args = [
        "train",
        *QUIET,
        "--iterations",
        "2",
        "--set",
        f"train.stores=['{tmp_path / 'ds'}']",
        "--set",
        f"train.out={mapper}",
        "--set",
        f"train.metrics_dir={tmp_path / 'm'}",
    ]
    with hold_lease(str(mapper), "train"):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "mapper.safetensors: in use by train by" in res.output
    assert not mapper.exists()
    assert CliRunner().invoke(main, args).exit_code == 0 and mapper.exists()
