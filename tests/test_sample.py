"""Stage `sample`, and the resume contract of every encoder pass: a pass killed with
SIGKILL and rerun ends bitwise-equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.clip import load_clip
from model.stylegan2 import create_generator
from pipeline.cli import main
from stages.common import ClipRef, ExecutionConfig, GeneratorRef
from stages.sample import SampleConfig, run_sample, sample_z
from store import RowStore, Status, StoreError


def _arrays(out: Path) -> dict[str, np.ndarray]:
    m = RowStore.open(str(out / "manifest.zarr"), require_complete=True)
    c = RowStore.open(str(out / "clip.zarr"), require_complete=True)
    s = RowStore.open(str(out / "s.zarr"), require_complete=True)
    return {
        "ids": m.read("ids"),
        "source": m.read("source"),
        "status": m.status(),
        "embed": c.read("embed"),
        "s": s.read("s"),
    }


def test_sample_rows_are_the_official_recipe(tmp_path):
    cfg = SampleConfig(n=6, seed=3, out=str(tmp_path / "smp"), rows_per_shard=4)
    result = run_sample(cfg, GeneratorRef(), ClipRef(), ExecutionConfig(), progress=False)
    assert result.summary.ok == 6
    got = _arrays(tmp_path / "smp")
    assert got["ids"].tolist()[:2] == ["sample-000000", "sample-000001"]
    assert got["source"][4] == "sample:3:4"
    assert (got["status"] == Status.OK).all()
    G = create_generator("tiny-64", seed=0)
    clip = load_clip("deltaedit-tiny", seed=0)
    z = torch.from_numpy(sample_z(3, range(6), G.config.in_dim))
    with torch.no_grad():
        s = G.w_to_s(G.wplus(G.mapping(z)))
        c = clip.encode_images(G.synthesize(s).clamp(-1, 1), "deltaedit")
    np.testing.assert_allclose(got["s"], s.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["embed"], c.numpy(), rtol=1e-4, atol=1e-5)
    s_store = RowStore.open(str(tmp_path / "smp/s.zarr"))
    assert s_store.attrs["fingerprint"] == G.fingerprint
    assert s_store.attrs["layout"] == G.layout.to_dict()
    c_store = RowStore.open(str(tmp_path / "smp/clip.zarr"))
    assert c_store.attrs["preprocessing"] == "deltaedit" and c_store.attrs["normalized"] is False


def test_rows_do_not_depend_on_blocks_or_workers(tmp_path):
    a = SampleConfig(n=10, seed=1, out=str(tmp_path / "a"), rows_per_shard=3)
    b = SampleConfig(n=10, seed=1, out=str(tmp_path / "b"), rows_per_shard=5)
    run_sample(a, GeneratorRef(), ClipRef(), ExecutionConfig(workers=1), progress=False)
    run_sample(b, GeneratorRef(), ClipRef(), ExecutionConfig(workers=2), progress=False)
    ga, gb = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    np.testing.assert_allclose(ga["s"], gb["s"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ga["embed"], gb["embed"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(ga["s"][0], ga["s"][1])  # rows differ from each other


def test_truncation_pulls_toward_the_mean_and_changed_params_need_overwrite(tmp_path):
    out = tmp_path / "smp"
    run_sample(SampleConfig(n=4, out=str(out)), GeneratorRef(), ClipRef(), ExecutionConfig(), False)
    full = _arrays(out)["s"]
    with pytest.raises(StoreError, match="truncation"):
        run_sample(
            SampleConfig(n=4, out=str(out), truncation=0.5),
            GeneratorRef(),
            ClipRef(),
            ExecutionConfig(),
            progress=False,
        )
    cfg = SampleConfig(n=4, out=str(out), truncation=0.5)
    run_sample(cfg, GeneratorRef(), ClipRef(), ExecutionConfig(), overwrite=True, progress=False)
    half = _arrays(out)["s"]
    G = create_generator("tiny-64", seed=0)
    with torch.no_grad():
        s_mean = G.w_to_s(G.wplus(G.mean_latent())).numpy()
    assert (
        np.linalg.norm(half - s_mean, axis=1).mean() < np.linalg.norm(full - s_mean, axis=1).mean()
    )


def test_sample_cli(tmp_path):
    res = CliRunner().invoke(
        main, ["sample", "--n", "5", "--out", str(tmp_path / "s"), "-q", "--params", os.devnull]
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("sample: 5 rows") and "ok 5" in res.output
    res = CliRunner().invoke(main, ["sample", "--set", "sample.truncation=0"])
    assert res.exit_code != 0 and "sample.truncation" in res.output


# --- resume after SIGKILL ------------------------------------------------------------------------


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "from pipeline.cli import main; main()", *args]


def _kill_after_some_blocks(args: list[str], store: Path, timeout: float = 120.0) -> int:
    """Start the CLI, SIGKILL it once a few blocks are done; return the done count then."""
    proc = subprocess.Popen(
        _cli(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd()
    )
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "zarr.json").exists():
                try:
                    done = len(RowStore.open(str(store)).done_blocks())
                except Exception:  # noqa: BLE001 - the store is being created
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return done


@pytest.mark.slow
def test_sample_killed_and_rerun_is_bitwise_equal_to_one_run(tmp_path):
    args = ["sample", "--n", "120", "-q", "--set", "sample.rows_per_shard=4"]
    args += ["--set", "execution.batch_size=4", "--params", os.devnull]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted reference runs in this process (same thread settings as the CLI)
    assert CliRunner().invoke(main, [*args, "--out", str(ref)]).exit_code == 0
    done = _kill_after_some_blocks([*args, "--out", str(killed)], killed / "manifest.zarr")
    n_blocks = RowStore.open(str(killed / "manifest.zarr")).n_blocks
    assert 2 <= done < n_blocks, "the pass must be killed part way"
    rerun = subprocess.run(_cli([*args, "--out", str(killed)]), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    already = int(rerun.stdout.split("; ")[-1].split()[0])
    assert already >= done  # the finished blocks were not redone
    a, b = _arrays(ref), _arrays(killed)
    for name in a:
        assert (
            a[name].tobytes() == b[name].tobytes()
            if a[name].dtype.kind != "U"
            else (a[name].tolist() == b[name].tolist())
        ), name


@pytest.mark.slow
def test_encode_clip_killed_and_rerun_is_bitwise_equal(tmp_path):
    import shutil

    from PIL import Image

    from stages.ingest import IngestConfig, run_ingest

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            src / f"{i:03d}.png"
        )
    (src / "bad.jpg").write_bytes(b"x")
    cfg = IngestConfig(source=str(src), out=str(tmp_path / "ref"), rows_per_shard=2)
    run_ingest(cfg, ExecutionConfig(), progress=False)
    shutil.copytree(tmp_path / "ref", tmp_path / "killed")
    common = ["--params", os.devnull, "-q", "--set", "execution.batch_size=2"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert CliRunner().invoke(main, ["encode-clip", "--dataset", str(ref), *common]).exit_code == 0
    # the model pass writes the compute store (rows to encode, compacted), then clip.zarr is
    # assembled from it and swapped in (stages.incremental)
    done = _kill_after_some_blocks(
        ["encode-clip", "--dataset", str(killed), *common], killed / "clip.zarr.compute"
    )
    n_blocks = RowStore.open(str(killed / "clip.zarr.compute")).n_blocks
    assert 2 <= done < n_blocks, "the pass must be killed part way"
    subprocess.run(_cli(["encode-clip", "--dataset", str(killed), *common]), check=True)
    a = RowStore.open(str(ref / "clip.zarr"), require_complete=True)
    b = RowStore.open(str(killed / "clip.zarr"), require_complete=True)
    assert a.read("embed").tobytes() == b.read("embed").tobytes()
    assert a.status().tobytes() == b.status().tobytes()


def test_restart_on_change_starts_over_only_when_inputs_changed(tmp_path):
    out = str(tmp_path / "smp")
    args = ["sample", "--n", "4", "--out", out, "-q", "--params", os.devnull, "--restart-on-change"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    same = CliRunner().invoke(main, args)
    assert "1 blocks already done" in same.output and "started over" not in same.output
    plain = CliRunner().invoke(
        main, [a for a in args if a != "--restart-on-change"] + ["--seed", "7"]
    )
    assert plain.exit_code != 0 and "overwrite" in plain.output  # default: stop, say how
    changed = CliRunner().invoke(main, [*args, "--seed", "7"])
    assert changed.exit_code == 0 and "started over" in changed.output
    assert _arrays(Path(out))["source"][1] == "sample:7:1"
