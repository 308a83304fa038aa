"""Edit stage: the math on tensors, config checks, and the stage over a tiny store."""

from __future__ import annotations

import math

import pytest
import torch

from model.layout import SLayout
from stages.config import ConfigError
from stages.edit import (
    EditConfig,
    EditSpec,
    TargetDelta,
    apply_delta,
    beta_mask,
    global_direction_delta,
    level_mask,
    mapper_condition,
    mapper_delta,
    text_delta,
)

LAYOUT = SLayout.from_channels(32, {4: 8, 8: 8, 16: 6, 32: 4})


def unit(x):
    return x / x.norm()


# --- math ---------------------------------------------------------------------------


def test_text_delta_is_difference_of_normalized_embeddings():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    assert torch.allclose(text_delta(a, b), torch.tensor([1.0, 0.0, -1.0]))
    assert text_delta(a, a).abs().max() == 0


def test_beta_mask_uses_unnormalized_delta_and_zero_keeps_all():
    rel = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    dt = torch.tensor([0.1, 0.02])  # |r| = 0.1, 0.02, 0.06
    assert beta_mask(rel, dt, 0.05).tolist() == [True, False, True]
    # normalizing dt first would keep the second channel too (0.196 > 0.05)
    assert beta_mask(rel, unit(dt), 0.05).tolist() == [True, True, True]
    assert beta_mask(rel, dt, 0.0).all()
    with pytest.raises(ValueError, match="relevance"):
        beta_mask(None, dt, 0.03)


def test_level_mask_covers_exactly_the_chosen_levels():
    sl = LAYOUT.level_slices()
    m = level_mask(LAYOUT, ["coarse", "fine"])
    assert m.shape == (LAYOUT.conv_dim,)
    assert m[sl["coarse"]].all() and m[sl["fine"]].all() and not m[sl["medium"]].any()
    assert level_mask(LAYOUT, ["coarse", "medium", "fine"]).all()


def test_mapper_condition_normalizes_both_halves():
    c = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    cond = mapper_condition(c, torch.tensor([0.0, -5.0]))
    assert cond.shape == (2, 4)
    assert torch.allclose(cond[:, :2].norm(dim=1), torch.ones(2))
    assert torch.allclose(cond[:, 2:], torch.tensor([[0.0, -1.0], [0.0, -1.0]]))


class LinearMapper(torch.nn.Module):
    """delta_s = A s + B cond: linear, so compositions can be checked exactly."""

    def __init__(self, dconv, e):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(dconv, dconv, generator=g) * 0.1
        self.b = torch.randn(dconv, 2 * e, generator=g)

    def forward(self, s_conv, cond):
        return s_conv @ self.a.T + cond @ self.b.T


def test_mapper_delta_applies_alpha_mask_and_sums_targets():
    torch.manual_seed(0)
    dconv, e = LAYOUT.conv_dim, 5
    m = LinearMapper(dconv, e)
    s, c = torch.randn(3, dconv), torch.randn(3, e)
    d1, d2 = torch.randn(e), torch.randn(e)
    all_on = torch.ones(dconv, dtype=torch.bool)
    half = torch.arange(dconv) < dconv // 2
    one = mapper_delta(m, s, c, [TargetDelta("a", d1, 1.0, all_on)])
    assert torch.allclose(one, m(s, mapper_condition(c, d1)))
    two = mapper_delta(m, s, c, [TargetDelta("a", d1, 2.0, all_on)])
    assert torch.allclose(two, 2 * one, atol=1e-5)
    masked = mapper_delta(m, s, c, [TargetDelta("a", d1, 1.0, half)])
    assert masked[:, ~half].abs().max() == 0
    assert torch.allclose(masked[:, half], one[:, half])
    both = mapper_delta(
        m, s, c, [TargetDelta("a", d1, 1.0, all_on), TargetDelta("b", d2, -0.5, half)]
    )
    other = mapper_delta(m, s, c, [TargetDelta("b", d2, -0.5, half)])
    assert torch.allclose(both, one + other, atol=1e-5)


def test_apply_delta_touches_conv_channels_only():
    s = torch.randn(2, LAYOUT.dim)
    idx = torch.as_tensor(LAYOUT.conv_index())
    out = apply_delta(s, torch.ones(2, LAYOUT.conv_dim), idx)
    changed = (out - s).abs().sum(0) > 0
    torgb = torch.ones(LAYOUT.dim, dtype=torch.bool)
    torgb[idx] = False
    assert changed[idx].all() and not changed[torgb].any()
    assert torch.allclose(out[:, idx], s[:, idx] + 1)


def test_global_direction_scales_by_std_and_peak():
    rel = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    std = torch.tensor([2.0, 3.0, 4.0])
    dt = torch.tensor([0.4, 0.01])
    keep = beta_mask(rel, dt, 0.03)  # second channel dropped
    d = global_direction_delta(rel, std, [TargetDelta("x", dt, 1.5, keep)])
    # r = [0.4, 0, 0.2] / 0.4 -> [1, 0, 0.5]; times std and alpha
    assert torch.allclose(d, torch.tensor([3.0, 0.0, 3.0]))


# --- config checks ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "..", "", ".hidden"])
def test_edit_name_that_escapes_the_directory_is_refused(name):
    with pytest.raises(ConfigError, match="name"):
        EditSpec(name=name, target="smiling face").validate()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"alpha": 11.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"target": "  "}, "target"),
        ({"target": ("a", "b"), "alpha": (1.0,)}, "alpha"),
        ({"levels": ("coarse", "huge")}, "levels"),
        ({"alphas": (1.0, 20.0)}, "alphas"),
    ],
)
def test_bad_edit_values_fail_naming_the_key(kwargs, key):
    spec = EditSpec(name="smile", **{"target": "smiling face", **kwargs})
    with pytest.raises(ConfigError) as err:
        spec.validate()
    assert key in err.value.key


def test_sweep_expands_to_one_edit_per_alpha_and_neutral_defaults_by_kind():
    spec = EditSpec(name="smile", target=("smiling", "old"), alpha=(1.0, 0.5), alphas=(0.5, 2))
    cfg = EditConfig(edits=(spec,), dataset_kind="faces")
    cfg.validate()
    edits = cfg.resolved()
    assert [e.name for e in edits] == ["smile_a0.5", "smile_a2"]
    assert edits[1].alphas == (2.0, 1.0)
    assert cfg.neutral_for(edits[0]) == "face"
    assert EditConfig(dataset_kind="cats").neutral_for(edits[0]) == "cat"
    dup = EditConfig(edits=(EditSpec("a", "x"), EditSpec("a", "y")))
    with pytest.raises(ConfigError, match="unique"):
        dup.validate()
