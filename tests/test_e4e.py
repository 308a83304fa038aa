"""model/e4e.py: Encoder4Editing, tiny configs, and the official checkpoint layout."""

from __future__ import annotations

import argparse

import pytest
import torch

from model.checkpoint import CheckpointError
from model.e4e import CONFIGS, E4E, E4EConfig, create_e4e, infer_config, load_e4e, save_e4e


def _images(seed: int, b: int, s: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, s, s, generator=g) * 2 - 1


def _official(model: E4E, latent_avg: torch.Tensor, size: int = 1024) -> dict:
    """What the official training script saves (e4e_ffhq_encode.pt)."""
    return {
        "state_dict": {**model.official_state_dict(), "decoder.style.1.weight": torch.zeros(4, 4)},
        "latent_avg": latent_avg,
        "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": size, "lr": 0.0001},
    }


def test_creation_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = create_e4e("tiny", seed=0)
    assert torch.rand(1) == before
    assert create_e4e("tiny", seed=0).fingerprint == a.fingerprint
    assert create_e4e("tiny", seed=1).fingerprint != a.fingerprint


@pytest.mark.parametrize("name,shape", [("tiny", (3, 10, 32)), ("world-32", (3, 8, 64))])
def test_forward_shapes(name, shape):
    m = create_e4e(name)
    x = _images(0, 3, m.input_size)
    with torch.no_grad():
        w = m(x)
    assert w.shape == shape and (m.n_latent, m.w_dim) == shape[1:]
    assert torch.isfinite(w).all()
    with torch.no_grad():  # encode() resizes any size to the input size
        assert m.encode(_images(1, 2, 50)).shape == (2, *shape[1:])
    with pytest.raises(ValueError, match="encode"):
        m(_images(0, 1, m.input_size * 2))


def test_wplus_is_w0_repeated_plus_deltas_plus_latent_avg():
    avg = torch.randn(10, 32)
    m = create_e4e("tiny", seed=3, latent_avg=avg)
    x = _images(2, 2, 64)
    with torch.no_grad():
        w = m(x)
        for head in list(m.styles)[1:]:  # silence every delta head
            head.linear.weight.zero_()
            head.linear.bias.zero_()
        w_no_delta = m(x)
    torch.testing.assert_close(w_no_delta[:, 0], w[:, 0])  # row 0 has no delta
    w0 = w_no_delta - avg
    torch.testing.assert_close(w0, w0[:, :1].expand_as(w0))  # w0 repeated on every row
    assert (w - w_no_delta)[:, 1:].abs().amax(dim=-1).min() > 0  # every later row has a delta


def test_encoder_is_differentiable_wrt_input():
    m = create_e4e("world-32")
    x = _images(3, 2, 32).requires_grad_(True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_official_layout_round_trip_tiny(tmp_path):
    m = create_e4e("tiny", seed=4, latent_avg=torch.randn(10, 32))
    path = tmp_path / "e4e_tiny.pt"
    torch.save(_official(m, m.latent_avg.clone(), size=64), path)
    back = load_e4e(path)
    assert back.config == m.config and back.fingerprint == m.fingerprint
    assert not back.training
    x = _images(5, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    # a single latent_avg row [W] is broadcast to every W+ row
    torch.save(_official(m, m.latent_avg[0].clone(), size=64), path)
    assert torch.equal(load_e4e(path).latent_avg, m.latent_avg[0].expand(10, 32))


def _official_ir_se50_spec() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official IR-SE50 Encoder4Editing, written from its structure."""
    spec: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{prefix}.{n}"] = (c,)
        spec[f"{prefix}.num_batches_tracked"] = ()

    spec["input_layer.0.weight"] = (64, 3, 3, 3)
    bn("input_layer.1", 64)
    spec["input_layer.2.weight"] = (64,)
    units = []
    for c_in, depth, n in [(64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)]:
        units += [(c_in, depth)] + [(depth, depth)] * (n - 1)
    for i, (c_in, depth) in enumerate(units):
        p = f"body.{i}"
        if c_in != depth:
            spec[f"{p}.shortcut_layer.0.weight"] = (depth, c_in, 1, 1)
            bn(f"{p}.shortcut_layer.1", depth)
        bn(f"{p}.res_layer.0", c_in)
        spec[f"{p}.res_layer.1.weight"] = (depth, c_in, 3, 3)
        spec[f"{p}.res_layer.2.weight"] = (depth,)
        spec[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
        bn(f"{p}.res_layer.4", depth)
        spec[f"{p}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
        spec[f"{p}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
    for i in range(18):
        n_convs = 4 if i < 3 else 5 if i < 7 else 6  # spatial 16 / 32 / 64
        for j in range(n_convs):
            spec[f"styles.{i}.convs.{2 * j}.weight"] = (512, 512, 3, 3)
            spec[f"styles.{i}.convs.{2 * j}.bias"] = (512,)
        spec[f"styles.{i}.linear.weight"] = (512, 512)
        spec[f"styles.{i}.linear.bias"] = (512,)
    spec["latlayer1.weight"], spec["latlayer1.bias"] = (512, 256, 1, 1), (512,)
    spec["latlayer2.weight"], spec["latlayer2.bias"] = (512, 128, 1, 1), (512,)
    return spec


def test_ir_se50_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        m = E4E(CONFIGS["ir_se50"])
    got = {k[len("encoder.") :]: tuple(v.shape) for k, v in m.official_state_dict().items()}
    assert got == _official_ir_se50_spec()
    assert (
        infer_config({k: torch.empty(s, device="meta") for k, s in got.items()})
        == CONFIGS["ir_se50"]
    )


@pytest.fixture(scope="module")
def ir_se50_file(tmp_path_factory):
    """The official layout at full size. Every tensor is a view of one small storage (the file
    stays ~10 MB): convs are zero and BN variances one, so W+ must come out as latent_avg."""
    spec = _official_ir_se50_spec()
    zeros = torch.zeros(max(torch.Size(s).numel() for s in spec.values()))
    ones = torch.ones(512)
    state = {}
    for k, s in spec.items():
        n = torch.Size(s).numel()
        if k.endswith("num_batches_tracked"):
            state[f"encoder.{k}"] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[f"encoder.{k}"] = ones[:n].view(s)
        else:
            state[f"encoder.{k}"] = zeros[:n].view(s)
    avg = torch.randn(18, 512, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("e4e") / "e4e_ffhq_encode.pt"
    torch.save(
        {"state_dict": state, "latent_avg": avg, "opts": {"encoder_type": "Encoder4Editing"}},
        path,
    )
    assert path.stat().st_size < 50e6
    return path, set(state), avg


def test_ir_se50_official_checkpoint_loads(ir_se50_file):
    path, keys, avg = ir_se50_file
    m = load_e4e(path)
    assert m.config == CONFIGS["ir_se50"] and (m.n_latent, m.w_dim, m.input_size) == (18, 512, 256)
    assert set(m.official_state_dict()) == keys  # keys map 1:1
    assert torch.equal(m.latent_avg, avg)


@pytest.mark.slow
def test_ir_se50_official_checkpoint_forward(ir_se50_file):
    path, _, avg = ir_se50_file  # the full IR-SE50 at 256 px: ~10 s on 2 CPU cores
    with torch.no_grad():
        w = load_e4e(path)(_images(6, 1, 256))
    assert w.shape == (1, 18, 512)
    torch.testing.assert_close(w[0], avg)


def test_official_layout_with_18_rows_of_512():
    # the official head layout (L = 18, W = 512, heads on c3 / p2 / p1) on a narrow body
    cfg = E4EConfig(64, (16, 24, 32, 64), (1, 1, 1, 1), n_latent=18, w_dim=512, se_reduction=8)
    m = create_e4e(cfg, seed=0)
    state = {k[len("encoder.") :]: v for k, v in m.official_state_dict().items()}
    assert infer_config(state) == cfg
    with torch.no_grad():
        assert m(_images(8, 2, 64)).shape == (2, 18, 512)


def test_save_load_round_trip(tmp_path):
    m = create_e4e("world-32", seed=5, latent_avg=torch.randn(64))
    path = tmp_path / "e4e.safetensors"
    save_e4e(m, path)
    back = load_e4e(path)
    assert back.fingerprint == m.fingerprint and back.config == m.config
    x = _images(7, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_bad_checkpoints_are_refused(tmp_path):
    m = create_e4e("tiny")
    code = tmp_path / "code.pt"
    bad = _official(m, m.latent_avg)
    bad["opts"] = argparse.Namespace(stylegan_size=64)  # an object: not weights-only
    torch.save(bad, code)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_e4e(code)
    empty = tmp_path / "empty.pt"
    torch.save({"state_dict": {"decoder.x": torch.zeros(1)}}, empty)
    with pytest.raises(CheckpointError, match="encoder"):
        load_e4e(empty)
    no_avg = tmp_path / "no_avg.pt"
    torch.save({"state_dict": m.official_state_dict()}, no_avg)
    with pytest.raises(CheckpointError, match="latent_avg"):
        load_e4e(no_avg)
    wrong = tmp_path / "wrong.pt"
    torch.save(_official(m, torch.zeros(3, 32)), wrong)
    with pytest.raises(CheckpointError, match="latent_avg"):
        load_e4e(wrong)
