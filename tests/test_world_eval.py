"""Scoring edits against the world's counterfactual truth (stages/world/score.py)."""

import numpy as np
import pytest
import torch

from stages.world.render import WorldConfig, counterfactual, render, scenes, to_unit
from stages.world.score import evaluate_edits, mask_iou, psnr_uint8, scenes_for_ids


class LookupGenerator(torch.nn.Module):
    """A stand-in generator: s[:, 0] indexes a table of images (exact renders)."""

    def __init__(self, images: np.ndarray):
        super().__init__()
        self.table = torch.from_numpy(to_unit(images))

    def synthesize(self, s, noise_mode="const"):
        return self.table[s[:, 0].long()]


def _setup(n=24, attribute="color", value="blue"):
    world = WorldConfig(seed=4, n_images=n)
    src = scenes(world)
    cf = [counterfactual(s, attribute, value) for s in src]
    wrong = [
        counterfactual(s, "shape", "triangle" if s.shape != "triangle" else "circle") for s in cf
    ]
    images = np.stack([render(s, world) for s in src + cf + wrong])
    G = LookupGenerator(images)
    code = lambda k: np.arange(k * n, (k + 1) * n, dtype=np.float32)[:, None]  # noqa: E731
    return world, src, G, code(0), code(1), code(2)


def test_a_perfect_edit_scores_perfectly_and_no_edit_scores_zero():
    world, src, G, s_src, s_cf, _ = _setup()
    perfect = evaluate_edits(src, s_cf, "color", "blue", G, world, s_source=s_src)
    assert perfect["status"] == "ok"
    n_blue = sum(s.color == "blue" for s in src)
    assert perfect["n_already"] == n_blue and perfect["n_scored"] == len(src) - n_blue
    assert perfect["target_reached"] == 1.0 and perfect["all_others_kept"] == 1.0
    assert perfect["mask_iou_vs_counterfactual"] == 1.0
    assert perfect["centroid_drift_px"] < 0.2
    assert perfect["psnr_vs_counterfactual"] > 60
    assert perfect["no_edit_psnr_vs_counterfactual"] < 30
    assert perfect["reconstruction_psnr"] == 100.0
    assert perfect["others_kept_vs_reconstruction"]["shape"] == 1.0
    none = evaluate_edits(src, s_src, "color", "blue", G, world)
    assert none["target_reached"] == 0.0 and none["all_others_kept"] == 1.0


def test_an_edit_that_breaks_another_attribute_is_caught():
    world, src, G, _, _, s_wrong = _setup()
    r = evaluate_edits(src, s_wrong, "color", "blue", G, world, per_row=True)
    assert r["target_reached"] == 1.0
    assert r["others_kept"]["shape"] == 0.0 and r["all_others_kept"] == 0.0
    assert r["mask_iou_vs_counterfactual"] < 0.9
    assert len(r["rows"]["psnr"]) == len(src)


def test_unknown_target_is_unscorable_not_scored():
    world, src, G, s_src, _, _ = _setup()
    r = evaluate_edits(src, s_src, "color", "pink", G, world)
    assert r["status"] == "unscorable" and "target_reached" not in r
    with pytest.raises(ValueError, match="scenes but"):
        evaluate_edits(src[:3], s_src, "color", "blue", G, world)


def test_metric_helpers_and_ids(tmp_path):
    a = np.zeros((1, 4, 4, 3), np.uint8)
    assert psnr_uint8(a, a)[0] == pytest.approx(100.0)
    m = np.zeros((4, 4))
    m[:2] = 1
    assert mask_iou(m, m) == 1.0 and mask_iou(m, 1 - m) == 0.0
    from stages.world.render import run

    run(WorldConfig(seed=8, n_images=5), tmp_path, progress=False)
    world, sc = scenes_for_ids(tmp_path, ["000003", "000001"])
    assert sc[0] == scenes(WorldConfig(seed=8), 3, 1)[0] and world.seed == 8
    with pytest.raises(KeyError, match="not in"):
        scenes_for_ids(tmp_path, ["999999"])
