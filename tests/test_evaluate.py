"""Evaluate stage: the metrics on held-out rows, metrics.json, the alpha plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_edit import edit_config, shared_dataset

from stages.common import ExecutionConfig
from stages.edit import EditSpec
from stages.edit import run as run_edit
from stages.evaluate import (
    EvaluateConfig,
    EvaluateError,
    directional_similarity,
    held_out_rows,
    mapper_heldout_cos,
    run,
)


def test_directional_similarity_is_cosine_of_image_change_and_text_delta():
    before = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    after = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]])
    dt = torch.tensor([0.0, 2.0, 0.0])
    sim = directional_similarity(before, after, dt)
    # normalize(after) - before = (0.707 - 1, +-0.707): cos with +y = +-0.924
    assert sim[0] == pytest.approx(0.9239, abs=1e-3) and sim[1] == pytest.approx(-0.9239, abs=1e-3)


def test_held_out_rows_fall_back_to_a_seeded_sample(tmp_path):
    ok = np.arange(100)
    rows, where = held_out_rows(str(tmp_path / "none.safetensors"), "x", ok, 10, seed=3)
    again, _ = held_out_rows(str(tmp_path / "none.safetensors"), "x", ok, 10, seed=3)
    assert where == "seeded sample" and len(rows) == 10 and np.array_equal(rows, again)


def test_mapper_heldout_cos_read_from_train_metrics(tmp_path):
    m = tmp_path / "metrics.json"
    m.write_text(json.dumps({"val": {"cos": 0.42, "mse": 1.0}}))
    assert mapper_heldout_cos(str(m), str(tmp_path / "no.safetensors")) == pytest.approx(0.42)
    assert mapper_heldout_cos(str(tmp_path / "x.json"), str(tmp_path / "y.safetensors")) is None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    ds = shared_dataset(tmp_path_factory)
    out = tmp_path_factory.mktemp("ev")
    # a real (finite-difference) relevance, so the global direction follows CLIP
    from stages.relevance import RelevanceConfig
    from stages.relevance import run as run_relevance

    rel = RelevanceConfig(store=str(ds["root"]), out=str(out / "rel.zarr"), n_images=1)
    run_relevance(rel, execution=ExecutionConfig(device="cpu"), progress=False, log=lambda _: None)
    gd = EditSpec("smile", "smiling face", beta=0.0, alphas=(0.0, 1.0, 3.0))
    cfg = edit_config(
        ds, out, method="global-direction", edits=(gd,), relevance=str(out / "rel.zarr")
    )
    run_edit(
        cfg, ExecutionConfig(device="cpu"), clip=ds["clip"], progress=False, log=lambda _: None
    )
    return ds, out


def test_evaluate_writes_metrics_and_alpha_plot(sweep):
    ds, base = sweep
    cfg = EvaluateConfig(
        edits_dir=str(base / "edits"),
        store=str(ds["root"]),
        mapper=str(ds["root"] / "mapper.safetensors"),
        train_metrics=str(base / "none.json"),
        n_rows=6,
        out=str(base / "m"),
    )
    lines = []
    metrics = run(
        cfg,
        execution=ExecutionConfig(device="cpu"),
        generator=ds["G"],
        clip=ds["clip"],
        log=lines.append,
    )
    e = metrics["edits"]
    assert sorted(e) == ["smile_a0", "smile_a1", "smile_a3"]
    # alpha 0 changes nothing; a larger alpha changes more pixels and channels
    assert e["smile_a0"]["pixel_change"] == 0 and e["smile_a0"]["channels_changed"] == 0
    assert 0 < e["smile_a1"]["pixel_change"] < e["smile_a3"]["pixel_change"]
    assert e["smile_a1"]["channels_changed"] > 0
    assert e["smile_a3"]["n_rows"] == 6 and e["smile_a3"]["rows"] == "seeded sample"
    # the global direction is built from CLIP's own gradients: it moves CLIP towards delta_t
    assert e["smile_a1"]["directional_similarity"] > 0
    assert e["smile_a3"]["target_similarity_after"] > e["smile_a3"]["target_similarity_before"]
    saved = json.loads((base / "m" / "metrics.json").read_text())
    assert saved["edits"]["smile_a1"]["alpha"] == 1.0
    with open(base / "m" / "plots" / "directional_similarity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in rows] == [0.0, 1.0, 3.0]
    assert (base / "m" / "directional_similarity.png").stat().st_size > 1000
    assert any("directional" in line for line in lines)


def test_evaluate_refuses_another_clip(sweep):
    from model.clip import load_clip

    ds, base = sweep
    other = load_clip("deltaedit-tiny", seed=1)
    cfg = EvaluateConfig(
        edits=("smile_a1",),
        edits_dir=str(base / "edits"),
        store=str(ds["root"]),
        out=str(base / "m2"),
    )
    with pytest.raises(EvaluateError, match="made with CLIP"):
        run(cfg, generator=ds["G"], clip=other)
