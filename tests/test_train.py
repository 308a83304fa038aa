"""Train stage: learning on stores with known structure, exact resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_data import CLIP_FP, GEN_FP, TINY_LAYOUT, write_pair_store

from model.layout import SLayout
from model.mapper import load_mapper
from stages.config import ConfigError
from stages.train import TrainConfig, TrainError, make_cond, run
from store import Status


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    write_pair_store(str(root / "images"), 768, data_seed=1)
    write_pair_store(str(root / "sampled"), 320, data_seed=2)
    return root


def _cfg(roots, tmp_path, **kw) -> TrainConfig:
    base = dict(
        stores=(str(roots / "images"), str(roots / "sampled")),
        out=str(tmp_path / "mapper.safetensors"),
        metrics_dir=str(tmp_path / "metrics"),
        iterations=300,
        val_every=100,
        val_pairs=256,
        checkpoint_every=100,
    )
    return TrainConfig(**(base | kw))


def test_mapper_learns_the_condition_and_beats_controls(stores, tmp_path):
    result = run(_cfg(stores, tmp_path / "real"), progress=False, log=lambda _: None)
    control = run(
        _cfg(stores, tmp_path / "shuffled", shuffle_targets=True),
        progress=False,
        log=lambda _: None,
    )
    val, ctl = result.val, control.val
    assert val["step"] == 300 and val["zero_cos"] == 0.0
    # Far above the zero mapper and the chance level of shuffled targets ...
    assert val["cos"] > 0.6
    assert ctl["cos"] < 0.2
    assert val["cos"] > ctl["cos"] + 0.4
    assert val["mse"] < 0.6 * val["zero_mse"]
    # ... and above the best condition-free prediction (mean(s) - s_i): it uses delta_c.
    assert val["cos"] > val["mean_delta_cos"] + 0.05
    assert val["mse"] < val["mean_delta_mse"]

    mapper = load_mapper(result.mapper_path, layout=TINY_LAYOUT, clip_dim=32)
    cfg = json.loads((tmp_path / "real" / "mapper.json").read_text())
    assert cfg["clip_fingerprint"] == CLIP_FP and cfg["generator_fingerprint"] == GEN_FP
    assert cfg["step"] == 300 and cfg["fingerprint"] == mapper.fingerprint
    # dvclive metrics for `dvc metrics show` / `dvc plots show`
    summary = json.loads((tmp_path / "real" / "metrics" / "metrics.json").read_text())
    assert summary["val"]["cos"] == pytest.approx(val["cos"])
    plots = tmp_path / "real" / "metrics" / "plots" / "metrics"
    assert len((plots / "train" / "loss.tsv").read_text().splitlines()) == 1 + 300 // 10
    assert len((plots / "val" / "cos.tsv").read_text().splitlines()) == 1 + 3


def test_resume_reproduces_the_uninterrupted_run_exactly(stores, tmp_path):
    kw = dict(iterations=40, checkpoint_every=15, val_every=10, log_every=5)
    full = run(_cfg(stores, tmp_path / "full", **kw), progress=False, log=lambda _: None)

    class Killed(Exception):
        pass

    def kill_at_27(step, _loss):
        if step == 27:
            raise Killed

    cfg = _cfg(stores, tmp_path / "cut", **kw)
    with pytest.raises(Killed):
        run(cfg, progress=False, log=lambda _: None, on_step=kill_at_27)
    resumed = run(cfg, resume=True, progress=False, log=lambda _: None)
    assert resumed.losses == full.losses[15:]  # last checkpoint: step 15, bit-for-bit
    assert resumed.history == full.history
    a = load_mapper(full.mapper_path).state_dict()
    b = load_mapper(resumed.mapper_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss_rows = tmp_path / "cut" / "metrics" / "plots" / "metrics" / "train" / "loss.tsv"
    steps = [int(line.split("\t")[0]) for line in loss_rows.read_text().splitlines()[1:]]
    assert steps == list(range(5, 41, 5))  # rows logged after the checkpoint were dropped
    # Longer training continues from the finished run.
    more = run(
        _cfg(stores, tmp_path / "full", **(kw | {"iterations": 45})),
        resume=True,
        progress=False,
        log=lambda _: None,
    )
    assert more.step == 45 and len(more.losses) == 5


def test_resume_refuses_other_train_params(stores, tmp_path):
    cfg = _cfg(stores, tmp_path, iterations=5, checkpoint_every=5)
    run(cfg, progress=False, log=lambda _: None)
    with pytest.raises(TrainError, match="train.lr"):
        run(_cfg(stores, tmp_path, iterations=10, lr=0.1), resume=True, progress=False)
    with pytest.raises(TrainError, match="no training state"):
        run(_cfg(stores, tmp_path / "other", iterations=10), resume=True, progress=False)


def test_near_pairs_train_other_pairs_resume_exactly_and_are_part_of_the_trajectory(
    stores, tmp_path
):
    kw = dict(iterations=20, checkpoint_every=10, val_every=10, log_every=5)
    plain = run(_cfg(stores, tmp_path / "plain", **kw), progress=False, log=lambda _: None)
    near_kw = kw | {"near_pairs": 0.75, "near_k": 8}
    near = run(_cfg(stores, tmp_path / "near", **near_kw), progress=False, log=lambda _: None)
    assert near.losses != plain.losses  # other pairs: other losses from the first step
    resumed = run(
        _cfg(stores, tmp_path / "near", **(near_kw | {"iterations": 25})),
        resume=True,
        progress=False,
        log=lambda _: None,
    )
    assert resumed.step == 25
    with pytest.raises(TrainError, match="near_pairs"):  # a resume with random pairs only
        run(_cfg(stores, tmp_path / "near", **(kw | {"iterations": 30})), resume=True)
    with pytest.raises(ConfigError, match="near_pairs"):
        TrainConfig(near_pairs=1.5).validate()


def test_cond_is_normalized_image_and_direction():
    c_i, c_j = torch.randn(3, 8) * 5, torch.randn(3, 8) * 5
    cond = make_cond(c_i, c_j)
    torch.testing.assert_close(cond.norm(dim=1), torch.full((3,), 2**0.5))
    hat_i, hat_j = c_i / c_i.norm(dim=1, keepdim=True), c_j / c_j.norm(dim=1, keepdim=True)
    d = hat_j - hat_i
    torch.testing.assert_close(cond[:, 8:], d / d.norm(dim=1, keepdim=True))


def test_refuses_stores_that_do_not_belong_together(stores, tmp_path):
    other_layout = SLayout.from_channels(32, {4: 16, 8: 16, 16: 16, 32: 16})
    write_pair_store(str(tmp_path / "lay"), 64, layout=other_layout)
    with pytest.raises(TrainError, match="S layout"):
        run(_cfg(stores, tmp_path, stores=(str(stores / "images"), str(tmp_path / "lay"))))
    write_pair_store(str(tmp_path / "clip"), 64, clip_fp="d" * 64)
    with pytest.raises(TrainError, match="CLIP"):
        run(_cfg(stores, tmp_path, stores=(str(stores / "images"), str(tmp_path / "clip"))))
    with pytest.raises(TrainError, match="expect_clip_fingerprint"):
        run(_cfg(stores, tmp_path, expect_clip_fingerprint="e" * 64))
    with pytest.raises(TrainError, match="expect_generator_fingerprint"):
        run(_cfg(stores, tmp_path, expect_generator_fingerprint="f" * 12))
    with pytest.raises(ValueError, match="expect_clip_fingerprint"):
        run(_cfg(stores, tmp_path, expect_clip_fingerprint="abc"))


def test_bad_input_is_one_clear_error(stores, tmp_path):
    write_pair_store(str(tmp_path / "empty"), 64, status=np.full(64, Status.FAILED, np.uint8))
    with pytest.raises(TrainError, match="no ok rows"):
        run(_cfg(stores, tmp_path, stores=(str(tmp_path / "empty"),)))
    with pytest.raises(TrainError, match=r"stores\[0\]"):
        run(_cfg(stores, tmp_path, stores=(str(tmp_path / "missing"),)))
    with pytest.raises(ValueError, match="iterations"):
        run(_cfg(stores, tmp_path, iterations=0))


def test_cli_trains_and_reports_bad_input_in_one_line(stores, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n"
        f"  stores: ['{stores / 'images'}', '{stores / 'sampled'}']\n"
        f"  out: '{tmp_path / 'm.safetensors'}'\n"
        f"  metrics_dir: '{tmp_path / 'metrics'}'\n"
        "  val_every: 10\n"
        "execution:\n  device: cpu\n"
    )
    runner = CliRunner()
    ok = runner.invoke(main, ["train", "--params", str(params), "--iterations", "20", "-q"])
    assert ok.exit_code == 0, ok.output
    assert "held-out cos" in ok.output and (tmp_path / "m.safetensors").exists()
    bad = runner.invoke(main, ["train", "--params", str(params), "--iterations", "0"])
    assert bad.exit_code != 0 and "train.iterations" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(
        main, ["train", "--params", str(params), "--set", f"train.stores=['{tmp_path}/none']"]
    )
    assert missing.exit_code != 0 and len(missing.output.strip().splitlines()) == 1
    assert "Traceback" not in missing.output


def test_sharded_sampler_resume_is_exact(stores, tmp_path):
    """Stores larger than the memory budget: shard-blocked pairs, still an exact resume."""
    kw = dict(iterations=24, checkpoint_every=10, val_every=12, memory_budget_mb=3.5)
    full = run(_cfg(stores, tmp_path / "full", **kw), progress=False, log=lambda _: None)
    assert full.sampler_mode == "sharded"
    cfg = _cfg(stores, tmp_path / "cut", **kw)

    def kill(step, _loss):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, log=lambda _: None, on_step=kill)
    resumed = run(cfg, resume=True, progress=False, log=lambda _: None)
    assert resumed.losses == full.losses[10:]


def test_resume_refuses_a_state_for_another_layout(tmp_path):
    write_pair_store(str(tmp_path / "a"), 128)
    cfg = TrainConfig(
        stores=(str(tmp_path / "a"),),
        out=str(tmp_path / "m.safetensors"),
        metrics_dir=str(tmp_path / "metrics"),
        iterations=3,
    )
    run(cfg, progress=False, log=lambda _: None)
    other = SLayout.from_channels(32, {4: 16, 8: 16, 16: 16, 32: 16})
    write_pair_store(str(tmp_path / "a"), 128, layout=other)  # the store was re-encoded
    with pytest.raises(TrainError, match="another layout"):
        run(TrainConfig(**(vars(cfg) | {"iterations": 6})), resume=True, progress=False)
