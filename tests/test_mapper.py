"""Delta Mapper: official conformance, general layouts, checkpoints, optimizer parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from golden_weights import fixture_arrays, golden_weights, load_manifest
from torch import nn

from model.checkpoint import CheckpointError
from model.layout import SLayout
from model.mapper import (
    DeltaMapper,
    EqualLinear,
    load_mapper,
    official_layout,
    plan_levels,
    save_mapper,
)

TINY = SLayout.from_channels(32, {4: 32, 8: 32, 16: 32, 32: 16})


def test_official_network_matches_reference_fixture():
    manifest = load_manifest("deltamapper-full")
    mapper = DeltaMapper()
    state = mapper.state_dict()
    assert list(state) == [key for key, _, _ in manifest["manifest"]]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(shape) for k, shape, _ in manifest["manifest"]
    }
    assert sum(p.numel() for p in mapper.parameters()) == 82_760_576
    mapper.load_state_dict(golden_weights(manifest))
    data = fixture_arrays("deltamapper-full")
    with torch.no_grad():
        out = mapper(torch.from_numpy(data["s"]), torch.from_numpy(data["cond"]))
    np.testing.assert_allclose(out.numpy(), data["delta_s"], rtol=0, atol=1e-4)


def test_official_pth_state_dict_loads_unchanged(tmp_path):
    ref = DeltaMapper(TINY, clip_dim=8)
    torch.save(ref.state_dict(), tmp_path / "net.pth")  # what the official trainer writes
    with pytest.raises(CheckpointError, match="layout"):
        load_mapper(tmp_path / "net.pth")  # official 1024 layout by default: shapes differ
    loaded = load_mapper(tmp_path / "net.pth", layout=TINY, clip_dim=8)
    s, cond = torch.randn(3, TINY.conv_dim), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(s, cond), ref(s, cond), rtol=1e-5, atol=1e-5)


def test_general_layout_forms_and_shapes():
    mapper = DeltaMapper(TINY, clip_dim=16)
    forms = {p.level: (p.n_layers, p.width) for p in mapper.plans}
    # coarse: conv1@4 + two convs@8, all 32 wide -> per-layer; medium: 32,32,32,16 -> flat;
    # no 64 px layers -> no fine level.
    assert forms == {"coarse": (3, 32), "medium": (1, 112)}
    assert not any(k.startswith(("sm_fine", "cm_fine", "fm_fine")) for k in mapper.state_dict())
    assert mapper.state_dict()["sm_coarse.mapping.1.weight"].shape == (32, 32)
    assert mapper.state_dict()["cm_medium.mapping.1.weight"].shape == (112, 32)
    assert mapper.state_dict()["fm_medium.mapping.0.weight"].shape == (112, 224)
    out = mapper(torch.randn(5, TINY.conv_dim), torch.randn(5, 32))
    assert out.shape == (5, TINY.conv_dim)
    with pytest.raises(ValueError, match="expects s_conv"):
        mapper(torch.randn(5, TINY.conv_dim + 1), torch.randn(5, 32))


def test_per_layer_level_normalizes_each_channel_across_layers():
    """Official PixelNorm over dim 1: scaling one channel on all coarse layers changes nothing."""
    mapper = DeltaMapper(TINY, clip_dim=4)
    s, cond = torch.randn(2, TINY.conv_dim), torch.randn(2, 8)
    scaled = s.clone()
    coarse = scaled[:, :96].view(2, 3, 32)
    coarse[:, :, 5] *= 7.0  # the same channel on every coarse layer
    with torch.no_grad():
        a, b = mapper(s, cond), mapper(scaled, cond)
    torch.testing.assert_close(a[:, :96], b[:, :96], rtol=1e-4, atol=1e-5)
    scaled2 = s.clone()
    scaled2[:, 5] *= 7.0  # one channel on one layer only: output changes
    with torch.no_grad():
        assert (mapper(scaled2, cond)[:, :96] - a[:, :96]).abs().max() > 1e-3


def test_output_depends_on_both_inputs():
    mapper = DeltaMapper(TINY, clip_dim=16)
    s, cond = torch.randn(4, TINY.conv_dim), torch.randn(4, 32)
    with torch.no_grad():
        out = mapper(s, cond)
        assert (mapper(s.flip(0), cond) - out).pow(2).mean().sqrt() > 0.01 * out.std()
        assert (mapper(s, cond.flip(0)) - out).pow(2).mean().sqrt() > 0.01 * out.std()


def test_safetensors_roundtrip_and_layout_check(tmp_path):
    mapper = DeltaMapper(TINY, clip_dim=16)
    path = tmp_path / "mapper.safetensors"
    save_mapper(mapper, path)
    assert path.with_suffix(".json").exists()
    loaded = load_mapper(path, layout=TINY, clip_dim=16)
    assert loaded.fingerprint == mapper.fingerprint
    s, cond = torch.randn(3, TINY.conv_dim), torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(s, cond), mapper(s, cond), rtol=1e-5, atol=1e-5)
    other = SLayout.from_channels(32, {4: 16, 8: 16, 16: 16, 32: 16})
    with pytest.raises(CheckpointError, match="another S layout"):
        load_mapper(path, layout=other)
    with pytest.raises(CheckpointError, match="CLIP dim"):
        load_mapper(path, clip_dim=8)
    with pytest.raises(CheckpointError, match="no such"):
        load_mapper(tmp_path / "missing.safetensors")


def test_fingerprint_changes_with_weights():
    mapper = DeltaMapper(TINY, clip_dim=4)
    before = mapper.fingerprint
    with torch.no_grad():
        mapper.fm_coarse.mapping[0].bias.add_(1.0)
    assert mapper.fingerprint != before


class _OfficialEqualLinear(nn.Module):
    """Straightforward official-convention layer: raw W, scaling at every forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, x):
        scale = 0.01 / math.sqrt(self.weight.shape[1])
        y = torch.nn.functional.linear(x, self.weight * scale) + self.bias * 0.01
        return torch.nn.functional.leaky_relu(y, 0.2) * math.sqrt(2)


def test_folded_adam_matches_official_adam():
    torch.manual_seed(0)
    layer = EqualLinear(24, 12)
    with torch.no_grad():
        layer.bias.normal_()
    ref = _OfficialEqualLinear(**layer.state_dict())
    opt = torch.optim.Adam(
        [
            {"params": [layer.weight], "lr": 0.5 * layer.gain_w, "eps": 1e-8 / layer.gain_w},
            {"params": [layer.bias], "lr": 0.5 * layer.gain_b, "eps": 1e-8 / layer.gain_b},
        ]
    )
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.5)
    for _ in range(5):
        x, t = torch.randn(16, 24), torch.randn(16, 12)
        for m, o in ((layer, opt), (ref, ref_opt)):
            o.zero_grad()
            ((m(x) - t) ** 2).mean().backward()
            o.step()
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=1e-4, atol=1e-4)


def test_param_groups_cover_every_parameter_once():
    mapper = DeltaMapper(TINY, clip_dim=4)
    groups = mapper.param_groups(lr=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in mapper.parameters())
    assert all(math.isclose(g["lr"] * (1e-8 / g["eps"]), 0.5 * g["gain"] ** 2) for g in groups)


def test_official_layout_levels():
    layout = official_layout()
    assert layout.conv_dim == 6048
    assert {p.level: (p.n_layers, p.width) for p in plan_levels(layout)} == {
        "coarse": (3, 512),
        "medium": (4, 512),
        "fine": (1, 2464),
    }
    equal = SLayout.from_channels(64, {r: 8 for r in (4, 8, 16, 32, 64)})
    assert {p.level: (p.n_layers, p.width) for p in plan_levels(equal)}["fine"] == (2, 8)


def test_inference_training_and_split_forms_compute_one_function(monkeypatch):
    """fp32 CPU inference (oneDNN fused layers), the autograd forward (F.linear on the
    concatenation) and the split fusion layer (bf16 / GPU inference) agree, for both level
    forms (per-layer coarse, flat medium)."""
    import model.mapper as mm

    torch.manual_seed(0)
    mapper = DeltaMapper(TINY, clip_dim=8)
    for p in mapper.parameters():  # nonzero biases: every term of every layer counts
        p.data.add_(0.1 * torch.randn_like(p))
    s, cond = torch.randn(6, TINY.conv_dim), torch.randn(6, 16)
    trained = mapper(s, cond)  # grad enabled: the training path
    assert trained.requires_grad
    with torch.inference_mode():
        # where oneDNN is there (every x86 torch build) inference takes the fused layers
        assert mm.fused_cpu_linear(s) == torch.backends.mkldnn.is_available()
        fused = mapper(s, cond)
        monkeypatch.setattr(mm, "fused_cpu_linear", lambda x: False)
        split = mapper(s, cond)
    torch.testing.assert_close(fused, trained.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, trained.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(split, torch.zeros_like(split))
