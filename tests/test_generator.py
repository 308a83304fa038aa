"""StyleGAN2 generator: conformance to the rosinality reference, S space, loaders, errors."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
from golden_weights import fixture_arrays, golden_weights, load_manifest

from model.checkpoint import CheckpointError, fingerprint
from model.layout import SLayout
from model.stylegan2 import (
    CONFIGS,
    Generator,
    GeneratorConfig,
    create_generator,
    load_generator,
    save_generator,
)

ATOL_IMG = 1e-4
ATOL_VEC = 1e-5


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest("stylegan2-small")


@pytest.fixture(scope="module")
def golden(manifest):
    return golden_weights(manifest)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return {**fixture_arrays("stylegan2-small"), **fixture_arrays("stylegan2-small.extra")}


@pytest.fixture(scope="module")
def rosinality_pt(tmp_path_factory, golden):
    path = tmp_path_factory.mktemp("g") / "stylegan2-small.pt"
    torch.save({"g_ema": golden}, path)
    return path


@pytest.fixture(scope="module")
def G(rosinality_pt) -> Generator:
    return load_generator(rosinality_pt)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def _maxdiff(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a.detach() - _t(b)).abs().max())


# --------------------------------------------------------------------- conformance
def test_layout_equals_fixture_table(G, manifest, arrays):
    assert G.layout.to_dict()["layers"] == manifest["layout"]
    assert G.layout.dim == 832 and G.layout.conv_dim == 544 and G.n_latent == 10
    np.testing.assert_array_equal([la.w_index for la in G.layout.layers], arrays["layout_w_index"])
    np.testing.assert_array_equal(
        [la.channels for la in G.layout.layers], arrays["layout_channels"]
    )
    np.testing.assert_array_equal(
        [la.resolution for la in G.layout.layers], arrays["layout_resolution"]
    )
    np.testing.assert_array_equal(
        [la.kind == "torgb" for la in G.layout.layers], arrays["layout_is_torgb"].astype(bool)
    )


def test_mapping_and_s_match_reference(G, arrays):
    with torch.no_grad():
        assert _maxdiff(G.mapping(_t(arrays["z"])), arrays["w"]) <= ATOL_VEC
        assert _maxdiff(G.w_to_s(_t(arrays["wplus"])), arrays["s_all"]) <= ATOL_VEC
        assert _maxdiff(G.mean_latent(), arrays["mean_latent"]) <= ATOL_VEC


def test_images_match_reference(G, arrays):
    wplus = _t(arrays["wplus"])
    with torch.no_grad():
        s = G.w_to_s(wplus)
        assert _maxdiff(G.synthesize(s, noise_mode="const"), arrays["images"]) <= ATOL_IMG
        assert _maxdiff(G.synthesize_w(wplus), arrays["images"]) <= ATOL_IMG
        trunc = G.synthesize_w(G.truncate(wplus, 0.7))
        assert _maxdiff(trunc, arrays["images_trunc"]) <= ATOL_IMG
        edit = G.synthesize(_t(arrays["s_edit"]))
        assert _maxdiff(edit, arrays["images_s_edit"]) <= ATOL_IMG
        from_z = G.synthesize_w(G.wplus(G.mapping(_t(arrays["z"]))))
        assert _maxdiff(from_z, arrays["images_z"]) <= ATOL_IMG


def test_mapping_truncation_pulls_toward_mean(G, arrays):
    z = _t(arrays["z"])
    with torch.no_grad():
        w, w7 = G.mapping(z), G.mapping(z, truncation=0.7)
        expected = G.mean_latent() + 0.7 * (w - G.mean_latent())
    torch.testing.assert_close(w7, expected)


def test_output_is_raw_not_clamped(G, arrays):
    with torch.no_grad():
        img = G.synthesize(_t(arrays["s_edit"]))
    assert img.abs().max() > 1.5  # the reference reaches about 10: nothing squashes it


def test_random_noise_differs_from_const(G, arrays):
    s = G.w_to_s(_t(arrays["wplus"])).detach()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = G.synthesize(s, "random"), G.synthesize(s, "random")
        c = G.synthesize(s, "const")
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


# --------------------------------------------------------------------- S space
def test_wrong_s_width_is_a_clear_error(G):
    with pytest.raises(ValueError, match=r"\[B, 832\].*got \[2, 544\]"):
        G.synthesize(torch.zeros(2, 544))
    with pytest.raises(ValueError, match=r"\[B, 10, 64\]"):
        G.w_to_s(torch.zeros(2, 9, 64))
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        G.mapping(torch.zeros(2, 32))


def test_conv_channel_edit_changes_image_torgb_slices_from_wplus(G, arrays):
    s = G.w_to_s(_t(arrays["wplus"])).detach()
    idx = torch.from_numpy(G.layout.conv_index())
    s2 = s.clone()
    s2[:, idx[:64]] += 3.0  # coarse conv1 channels
    with torch.no_grad():
        d = (G.synthesize(s2) - G.synthesize(s)).abs().mean()
    assert d > 1e-2


def test_synthesis_is_differentiable_wrt_s_and_weights(G, arrays):
    s = G.w_to_s(_t(arrays["wplus"][:2])).detach().requires_grad_(True)
    img = G.synthesize(s)
    img.square().mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert G.conv1.conv.weight.grad is not None and G.style[1].weight.grad is None
    G.zero_grad(set_to_none=True)
    # jacobian-vector product through the S path (relevance uses this)
    small = create_generator("tiny-64", seed=1)
    s0 = small.w_to_s(small.wplus(small.mapping(torch.randn(1, 32)))).detach()
    _, jvp = torch.func.jvp(lambda x: small.synthesize(x), (s0,), (torch.ones_like(s0),))
    assert jvp.shape == (1, 3, 64, 64) and jvp.abs().sum() > 0


# --------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["tiny-64", "world-32"])
def test_registered_configs_build_and_are_deterministic(name):
    a, b, c = create_generator(name, 0), create_generator(name, 0), create_generator(name, 1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    cfg = CONFIGS[name]
    assert a.resolution == cfg.resolution and a.w_dim == cfg.style_dim
    assert a.layout == SLayout.from_channels(cfg.resolution, cfg.channels)
    z = torch.randn(3, cfg.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = a.synthesize_w(a.wplus(a.mapping(z)))
        assert torch.equal(img, b.synthesize_w(b.wplus(b.mapping(z))))
    assert img.shape == (3, 3, cfg.resolution, cfg.resolution) and torch.isfinite(img).all()


def test_world_32_shapes():
    G = create_generator("world-32")
    assert G.layout.n_latent == 8 and G.w_dim == 64
    assert [G.config.channels[r] for r in (4, 8, 16, 32)] == [64, 64, 64, 32]


def test_fingerprint_follows_weight_changes():
    G = create_generator("tiny-64", 0)
    before = G.fingerprint
    with torch.no_grad():
        G.conv1.activate.bias.add_(1.0)
    assert G.fingerprint != before
    assert G.fingerprint == fingerprint(G.state_dict(), G.config.to_dict())


def test_unknown_config_is_an_error():
    with pytest.raises(ValueError, match="unknown generator config 'nope'"):
        create_generator("nope")


def test_architecture_from_any_channel_table(tmp_path):
    cfg = GeneratorConfig(128, 48, 3, {4: 40, 8: 36, 16: 24, 32: 24, 64: 12, 128: 8})
    G = create_generator(cfg, seed=3)
    path = tmp_path / "odd.pt"
    torch.save({"g_ema": G.state_dict()}, path)
    H = load_generator(path)
    assert H.config.channels == cfg.channels and H.config.n_mlp == 3 and H.w_dim == 48
    assert H.fingerprint == G.fingerprint
    s = G.w_to_s(torch.randn(1, G.n_latent, 48)).detach()
    with torch.no_grad():
        assert H.synthesize(s).shape == (1, 3, 128, 128)


# --------------------------------------------------------------------- loaders
def test_safetensors_roundtrip_keeps_fingerprint_and_output(G, tmp_path, arrays):
    path = tmp_path / "gen.safetensors"
    save_generator(G, path)
    assert path.with_suffix(".json").exists()
    H = load_generator(path)
    assert H.fingerprint == G.fingerprint
    with torch.no_grad():
        s = G.w_to_s(_t(arrays["wplus"]))
        assert torch.equal(H.synthesize(s), G.synthesize(s))


def test_plain_state_dict_and_latent_avg(golden, tmp_path, arrays):
    plain = tmp_path / "netG.pth"
    torch.save(dict(golden), plain)
    G = load_generator(plain)
    assert G.latent_avg is None
    avg = torch.full((64,), 0.25)
    with_avg = tmp_path / "with_avg.pt"
    torch.save({"g_ema": golden, "latent_avg": avg}, with_avg)
    H = load_generator(with_avg)
    torch.testing.assert_close(H.mean_latent(), avg[None])
    assert H.fingerprint != G.fingerprint  # latent_avg is part of the weights
    z = _t(arrays["z"])
    with torch.no_grad():
        torch.testing.assert_close(H.mapping(z, 0.5), 0.5 * avg + 0.5 * G.mapping(z))


def test_rosinality_training_checkpoint_with_args_namespace(golden, tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"g": golden, "g_ema": golden, "args": argparse.Namespace(size=64)}, path)
    assert load_generator(path).resolution == 64


def test_not_a_generator_is_a_clear_error(tmp_path):
    other = tmp_path / "mapper.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match=r"mapper\.pt: not a StyleGAN2 generator"):
        load_generator(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_generator(text)
    with pytest.raises(CheckpointError, match="no such"):
        load_generator(tmp_path / "missing.pt")


def test_truncated_checkpoint_is_a_clear_error(rosinality_pt, tmp_path):
    data = rosinality_pt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_generator(cut)


def test_wrong_shape_tensor_is_a_clear_error(golden, tmp_path):
    bad = dict(golden)
    bad["convs.3.conv.weight"] = torch.zeros(1, 64, 64, 3, 2)
    path = tmp_path / "bad.pt"
    torch.save({"g_ema": bad}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt: convs\.3\.conv\.weight has shape"):
        load_generator(path)


def test_foreign_safetensors_is_refused(tmp_path):
    from model.checkpoint import save_checkpoint

    path = tmp_path / "clip.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"format": "deltaedit-clip"})
    with pytest.raises(CheckpointError, match="not a generator checkpoint of this project"):
        load_generator(path)


def test_e4e_checkpoint_decoder_is_a_generator(golden, tmp_path):
    """e4e files hold the generator as `decoder.*` inside `state_dict`, plus latent_avg."""
    state = {f"decoder.{k}": v for k, v in golden.items()}
    state["encoder.conv.weight"] = torch.zeros(4, 3, 3, 3)
    path = tmp_path / "e4e.pt"
    torch.save({"state_dict": state, "latent_avg": torch.randn(10, 64)}, path)
    with pytest.raises(CheckpointError, match=r"latent_avg has shape \[10, 64\]"):
        load_generator(path)  # distinct per-layer rows are not one truncation centre
    torch.save({"state_dict": state, "latent_avg": torch.ones(10, 64)}, path)  # repeated
    G = load_generator(path)
    assert G.layout.dim == 832
    torch.testing.assert_close(G.mean_latent(), torch.ones(1, 64))


def test_synthesis_gradients_match_float64(G, arrays):
    """Autograd through the fused NHWC path equals the gradient of a float64 copy."""
    s = G.w_to_s(_t(arrays["wplus"][:1])).detach()
    s32 = s.clone().requires_grad_(True)
    G.synthesize(s32).mean().backward()
    G64 = load_generator_copy(G).double()
    s64 = s.double().requires_grad_(True)
    G64.synthesize(s64).mean().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)
    G.zero_grad(set_to_none=True)


def load_generator_copy(G: Generator) -> Generator:
    import copy

    return copy.deepcopy(G)


def test_random_noise_is_fresh_for_batch_one():
    G = create_generator("tiny-64", seed=0)
    with torch.no_grad():
        G.noises.noise_3.fill_(0)  # noise strengths start at 0: give them weight
        for m in G.styled[::3]:
            if hasattr(m, "noise"):
                m.noise.weight.fill_(1.0)
        s = G.w_to_s(G.wplus(G.mapping(torch.randn(1, 32))))
        a, b = G.synthesize(s, "random"), G.synthesize(s, "random")
        c, d = G.synthesize(s, "const"), G.synthesize(s, "const")
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(c, d)


def test_cached_weights_follow_in_place_updates():
    """No-grad caches (scaled weights, noise shifts) must not outlive a weight change."""
    G = create_generator("tiny-64", seed=0)
    s = G.w_to_s(G.wplus(G.mapping(torch.randn(2, 32)))).detach()
    with torch.no_grad():
        G.synthesize(s)  # fills the caches
        for m in G.modules():
            if hasattr(m, "noise"):
                m.noise.weight.fill_(0.5)
                m.activate.bias.add_(0.1)
        G.convs[3].conv.weight.mul_(-1.5)
        G.noises.noise_4.mul_(3.0)
        after = G.synthesize(s)
        fresh = copy.deepcopy(G)
        for m in fresh.modules():  # drop every cache
            m.__dict__.pop("_prep", None)
            m.__dict__.pop("_shift", None)
        torch.testing.assert_close(after, fresh.synthesize(s), rtol=0, atol=0)
    H = create_generator("tiny-64", seed=1)
    with torch.no_grad():
        G.load_state_dict(H.state_dict())
        torch.testing.assert_close(G.synthesize(s), H.synthesize(s), rtol=0, atol=0)


def test_config_roundtrip_and_hashable():
    for cfg in CONFIGS.values():
        back = GeneratorConfig.from_dict(cfg.to_dict())
        assert back == cfg and hash(back) == hash(cfg)
    with pytest.raises(ValueError, match="lacks resolutions"):
        GeneratorConfig(64, 32, 2, {4: 8, 8: 8, 16: 8, 32: 8}).validate()
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig(48, 32, 2, {4: 8}).validate()
