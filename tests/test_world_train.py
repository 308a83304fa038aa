"""Training the world models: a few steps on tiny data, and the committed weights."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.clip import load_clip, register_config
from model.e4e import E4EConfig, load_e4e
from model.stylegan2 import GeneratorConfig, load_generator
from pipeline.cli import main
from stages.world.render import SYNONYMS, WorldConfig, sample_caption, sample_scene, scenes
from stages.world.train import (
    HELD_OUT_SEED_OFFSET,
    WorldTrainConfig,
    delta_alignment,
    delta_alignment_loss,
    delta_captions,
    fit_matrix,
    make_data,
    multi_positive_infonce,
    psnr,
    reconstruct,
    train_autoencoder,
    train_clip,
    zero_shot_accuracy,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "world"
# narrow versions of the world networks: same structure, a fraction of the compute
TINY_G = GeneratorConfig(32, 16, 1, {4: 16, 8: 16, 16: 8, 32: 8})
TINY_E = E4EConfig(32, (8, 8, 8, 16), (1, 1, 1, 1), n_latent=8, w_dim=16, se_reduction=4)
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 4, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
register_config("world-clip-test", TINY_CLIP)


pytestmark = pytest.mark.usefixtures("one_thread")


def _decreases(curve: list[float], k: int = 4) -> bool:
    return float(np.mean(curve[-k:])) < float(np.mean(curve[:k]))


def test_autoencoder_loss_decreases_in_a_few_steps():
    torch.manual_seed(0)
    data = make_data(WorldConfig(seed=1), 48)
    cfg = WorldTrainConfig(ae_iterations=16, ae_batch=4, ae_max_minutes=0)
    G, E, log = train_autoencoder(cfg, data, False, TINY_G, TINY_E)
    assert log["iterations"] == 16 and _decreases(log["loss_curve"]), log["loss_curve"]
    assert not any(p.requires_grad for p in G.parameters())
    out = reconstruct(G, E, data.images[:2])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_fixed_torgb_styles_stay_one_and_counterfactual_pairs_train():
    """ae_torgb_styles fixed: every toRGB style is 1 for any w after training, the conv
    styles still vary; ae_cf_sparsity: the S difference of counterfactual pairs is scored
    and logged, and a sparse difference scores lower than a dense one."""
    from stages.world.train import s_sparsity

    torch.manual_seed(0)
    data = make_data(WorldConfig(seed=1), 48)
    cfg = WorldTrainConfig(
        ae_iterations=12,
        ae_batch=4,
        ae_max_minutes=0,
        ae_torgb_styles="fixed",
        ae_cf_sparsity=0.5,
    )
    G, E, log = train_autoencoder(cfg, data, False, TINY_G, TINY_E, world=WorldConfig(seed=1))
    s = G.w_to_s(E(data.images[:6])).numpy()
    conv = G.layout.conv_index()
    torgb = np.setdiff1d(np.arange(G.layout.dim), conv)
    assert np.array_equal(s[:, torgb], np.ones_like(s[:, torgb]))
    assert s[:, conv].std(0).max() > 1e-3
    assert 0 < log["cf_sparsity_last"] <= 1 and np.isfinite(log["loss_last"])
    dense, sparse = torch.ones(2, 100), torch.zeros(2, 100)
    sparse[:, 3] = 5.0
    assert s_sparsity(dense).item() == pytest.approx(1.0)
    assert s_sparsity(sparse).item() == pytest.approx(0.1)
    assert s_sparsity(7 * dense).item() == pytest.approx(1.0)  # scale-free


def test_gradient_l1_scores_a_blurred_corner_and_not_a_shift_in_level():
    """ae_grad_l1 adds an L1 on pixel differences: a blurred edge costs more with it, a
    constant offset (same edges) costs nothing extra."""
    from stages.world.train import ae_loss

    x = torch.zeros(1, 3, 8, 8)
    x[..., 2:6, 2:6] = 1.0  # a square
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert ae_loss(blurred, x, 0.1, 0.5) > ae_loss(blurred, x, 0.1, 0.0)
    shifted = x + 0.1
    assert ae_loss(shifted, x, 0.1, 0.5).item() == pytest.approx(ae_loss(shifted, x, 0.1).item())
    assert ae_loss(x, x, 0.1, 0.5).item() == 0.0


def _tiny_clip_cfg(**kw) -> WorldTrainConfig:
    """The tiny test CLIP, batch 16, no time cap (exactly reproducible), plus `kw`."""
    base = {"clip_batch": 16, "clip_max_minutes": 0, "clip_name": "world-clip-test"}
    return WorldTrainConfig(**(base | kw))


def test_clip_loss_decreases_in_a_few_steps():
    world = WorldConfig(seed=2)
    data = make_data(world, 64)
    cfg = _tiny_clip_cfg(clip_iterations=12, clip_lr=2e-3)
    clip, log = train_clip(cfg, world, data, progress=False)
    assert _decreases(log["loss_curve"]), log["loss_curve"]
    assert clip.fingerprint != load_clip("world-clip-test", seed=0).fingerprint
    acc = zero_shot_accuracy(clip, data.images[:8], data.scenes[:8])
    assert set(acc) == {"shape", "color", "background", "size"}


def test_delta_captions_say_the_new_value_and_differ_only_in_it():
    world = WorldConfig(seed=0)
    rng = np.random.default_rng(0)
    forms = set()
    for i in range(40):
        sc = sample_scene(world, i)
        said, other = delta_captions(sc, "color", "blue", rng, keep=0.7)
        assert "blue" in said or "navy" in said
        words = set(said.split()) ^ set(other.split())
        if sc.color in ("blue",):
            continue
        # the other caption leaves the colour unsaid or names the scene's own colour
        own = set(SYNONYMS["color"][sc.color])
        assert words - {"blue", "navy", "a", "an"} <= own, (said, other)
        forms.add(bool(words & own))
    assert forms == {True, False}  # both forms of a prompt pair occur


def test_delta_alignment_term_aligns_image_and_text_deltas():
    g = torch.Generator().manual_seed(0)
    e, d = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    assert delta_alignment_loss(e, e + d, e + d, e).item() == pytest.approx(0.0, abs=1e-5)
    # the words move the opposite way: cos -1 on every pair
    assert delta_alignment_loss(e, e + d, e, e + d).item() == pytest.approx(2.0, abs=1e-5)
    world = WorldConfig(seed=2)
    data = make_data(world, 64)
    common = dict(clip_iterations=30, clip_lr=3e-3, clip_delta_pairs=16, clip_delta_scenes=64)
    clip, log = train_clip(_tiny_clip_cfg(clip_delta=2.0, **common), world, data, False)
    assert log["delta_loss_last"] < log["delta_loss_first"], log
    plain, plain_log = train_clip(_tiny_clip_cfg(**common), world, data, False)
    assert "delta_loss_last" not in plain_log
    aligned = delta_alignment(clip, data, world, "deltaedit", n=32)
    before = delta_alignment(plain, data, world, "deltaedit", n=32)
    assert set(aligned) == {"shape", "color", "background", "size"}
    assert np.mean(list(aligned.values())) > np.mean(list(before.values())), (aligned, before)


def test_multi_positive_targets_count_every_fitting_caption():
    world = WorldConfig(seed=0)
    sc = [sample_scene(world, i) for i in range(6)]
    rng = np.random.default_rng(0)
    caps = [sample_caption(s, rng) for s in sc]
    m = fit_matrix(sc, caps)
    assert torch.all(torch.diagonal(m) == 1)
    for i in range(6):
        for j in range(6):
            assert bool(m[i, j]) == all(
                getattr(sc[i], a) == v for a, v in caps[j].attributes.items()
            )
    # perfectly aligned embeddings that separate non-fitting pairs: lower loss than random
    e = torch.eye(6)
    scale = torch.tensor(np.log(10.0))
    assert multi_positive_infonce(e, e, m, scale) < multi_positive_infonce(e, e.flip(0), m, scale)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["world_train.ae_lr=-1"], "world_train.ae_lr: got -1"),
        (["world_train.ae_grad_l1=-0.5"], "world_train.ae_grad_l1: got -0.5"),
        (["world_train.ae_torgb_styles=frozen"], "world_train.ae_torgb_styles: got 'frozen'"),
        (["world_train.device=tpu"], "world_train.device: got 'tpu'"),
        (["world_train.clip_delta=-1"], "world_train.clip_delta: got -1"),
        (["world_train.clip_delta_pairs=0"], "world_train.clip_delta_pairs: got 0"),
        (
            ["world_train.ae_cf_sparsity=0.1", "world_train.ae_batch=1"],
            "world_train.ae_batch: got 1, expected an integer >= 2 with pairs",
        ),
    ],
)
def test_world_train_cli_rejects_bad_values(tmp_path, sets, message):
    args = ["world", "train", "--params", os.devnull]
    for kv in sets:
        args += ["--set", kv]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output


# --- the committed weights ---------------------------------------------------------


def _metrics() -> dict:
    return json.loads((WEIGHTS / "metrics.json").read_text())


def test_committed_world_models_load_and_reach_their_recorded_metrics():
    metrics = _metrics()
    G = load_generator(WEIGHTS / "generator.safetensors")
    E = load_e4e(WEIGHTS / "e4e.safetensors")
    clip = load_clip(str(WEIGHTS / "clip.safetensors"))
    assert G.fingerprint == metrics["autoencoder"]["generator_fingerprint"]
    assert clip.fingerprint == metrics["clip"]["fingerprint"]
    # fresh renders: a world seed neither training nor the recorded held-out set used
    world = WorldConfig(seed=metrics["world"]["seed"] + 7 * HELD_OUT_SEED_OFFSET)
    data = make_data(world, 160)
    p = float(psnr(reconstruct(G, E, data.images), data.images).mean())
    assert p >= metrics["autoencoder"]["heldout_psnr"] - 1.0
    acc = zero_shot_accuracy(clip, data.images, data.scenes)
    for a, recorded in metrics["clip"]["zero_shot"].items():
        assert acc[a] >= recorded - 0.05, (a, acc[a], recorded)
    assert min(acc.values()) >= 0.9
    assert scenes(world, 0, 1)[0] == data.scenes[0]


def test_committed_delta_clip_aligns_text_and_image_deltas_on_fresh_scenes():
    """clip-delta (clip-pos continued with the delta term): recorded fingerprint, zero-shot
    as before, and text deltas closer to the image deltas than clip-pos's on every
    attribute, on a world seed no training used."""
    metrics = _metrics()
    delta = load_clip(str(WEIGHTS / "clip-delta.safetensors"))
    pos = load_clip(str(WEIGHTS / "clip-pos.safetensors"))
    assert delta.fingerprint == metrics["clip_delta"]["fingerprint"]
    assert metrics["clip_delta"]["train_config"]["clip_delta"] > 0
    world = WorldConfig(seed=metrics["world"]["seed"] + 7 * HELD_OUT_SEED_OFFSET)
    data = make_data(world, 96)
    acc = zero_shot_accuracy(delta, data.images, data.scenes)
    assert min(acc.values()) >= 0.9, acc
    aligned = delta_alignment(delta, data, world, "deltaedit", n=96)
    before = delta_alignment(pos, data, world, "deltaedit", n=96)
    for a in aligned:
        assert aligned[a] > before[a] + 0.05, (a, aligned, before)


def test_world_train_cli_writes_weights_and_metrics(tmp_path):
    out = tmp_path / "w"
    sets = {
        "n_train": 16,
        "n_heldout": 12,
        "ae_iterations": 2,
        "ae_batch": 2,
        "clip_iterations": 2,
        "clip_batch": 8,
        "clip_name": "world-clip-test",
        "threads": 1,
        "device": "auto",  # cuda where there is one: the weights come back as cpu tensors
    }
    args = ["world", "train", "--params", os.devnull, "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"world_train.{k}={v}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for name in ("generator", "e4e", "clip"):
        assert (out / f"{name}.safetensors").exists() and (out / f"{name}.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["autoencoder"]["iterations"] == 2 and metrics["clip"]["iterations"] == 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert metrics["autoencoder"]["device"] == device and metrics["clip"]["device"] == device
    assert set(metrics["clip"]["zero_shot"]) == {"shape", "color", "background", "size"}
    oracle = metrics["combined"]["oracle_color_blue"]
    assert oracle["status"] == "ok" and oracle["n_rows"] == 12
    # a later --only clip run keeps the autoencoder's metrics
    res = CliRunner().invoke(main, [*args, "--only", "clip"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "metrics.json").read_text())
    assert again["autoencoder"] == metrics["autoencoder"]
