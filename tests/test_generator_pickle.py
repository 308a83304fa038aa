"""NVIDIA network pickles: read as data through the restricted unpickler.

The pickles here are crafted by the test: fake classes registered under the NVIDIA
module names (`torch_utils.persistence`, `training.networks`, `dnnlib.util`) produce
the same pickle stream shape as stylegan2-ada-pytorch (`_reconstruct_persistent_obj`
records with `module_src` + the module `__dict__`), filled with the conformance
weights renamed to the NVIDIA keys.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from golden_weights import fixture_arrays, golden_weights, load_manifest

from model.checkpoint import CheckpointError
from model.stylegan2 import load_generator

FILTER = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64


@pytest.fixture()
def nvidia_modules(monkeypatch, tmp_path):
    """Register fake NVIDIA modules so pickle can name their globals when dumping."""
    marker = tmp_path / "executed"
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what NVIDIA would run: must never be called
        marker.write_text("called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Persistent:
        """Pickles like a torch_utils.persistence class instance."""

        def __init__(self, class_name, params=None, buffers=None, modules=None, **attrs):
            self.meta = {
                "type": "class",
                "version": 6,
                # if this source ran, it would leave a file behind
                "module_src": f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n",
                "class_name": class_name,
                "state": {
                    "training": False,
                    "_parameters": OrderedDict(
                        (k, torch.nn.Parameter(v.clone())) for k, v in (params or {}).items()
                    ),
                    "_buffers": OrderedDict((k, v.clone()) for k, v in (buffers or {}).items()),
                    "_non_persistent_buffers_set": set(),
                    "_modules": OrderedDict(modules or {}),
                    "_forward_hooks": OrderedDict(),
                    **attrs,
                },
            }

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    networks = types.ModuleType("training.networks")

    class AugmentPipe:  # a plain (non-persistent) class of the training code
        def __init__(self):
            self.p = torch.zeros([])
            self.xflip = 1.0

    AugmentPipe.__module__, AugmentPipe.__qualname__ = "training.networks", "AugmentPipe"
    networks.AugmentPipe = AugmentPipe

    dnnlib_util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dnnlib_util.EasyDict = EasyDict
    for name, mod in {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "training": types.ModuleType("training"),
        "training.networks": networks,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": dnnlib_util,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(
        Persistent=Persistent, AugmentPipe=AugmentPipe, EasyDict=EasyDict, marker=marker
    )


def _fc(P, weight, bias, lr, activation):
    return P(
        "FullyConnectedLayer",
        {"weight": weight, "bias": bias},
        activation=activation,
        weight_gain=np.float64(lr / np.sqrt(weight.shape[1])),
        bias_gain=lr,
    )


def _synthesis_layer(P, sd, prefix, noise_j, res, up):
    return P(
        "SynthesisLayer",
        {
            "weight": sd[f"{prefix}.conv.weight"][0],
            "noise_strength": sd[f"{prefix}.noise.weight"].reshape([]),
            "bias": sd[f"{prefix}.activate.bias"],
        },
        {"resample_filter": FILTER, "noise_const": sd[f"noises.noise_{noise_j}"][0, 0]},
        {
            "affine": _fc(
                P,
                sd[f"{prefix}.conv.modulation.weight"],
                sd[f"{prefix}.conv.modulation.bias"],
                1,
                "linear",
            )
        },
        resolution=res,
        up=up,
        use_noise=True,
        activation="lrelu",
        conv_clamp=None,
        padding=1,
    )


def _torgb(P, sd, prefix):
    c_in = sd[f"{prefix}.conv.weight"].shape[2]
    return P(
        "ToRGBLayer",
        {"weight": sd[f"{prefix}.conv.weight"][0], "bias": sd[f"{prefix}.bias"].reshape(3)},
        None,
        {
            "affine": _fc(
                P,
                sd[f"{prefix}.conv.modulation.weight"],
                sd[f"{prefix}.conv.modulation.bias"],
                1,
                "linear",
            )
        },
        conv_clamp=None,
        weight_gain=np.float64(1 / np.sqrt(c_in)),
    )


def nvidia_generator(P, sd, w_avg=None):
    """A G_ema record in stylegan2-ada-pytorch layout from rosinality-named weights."""
    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    fcs = {
        f"fc{i}": _fc(P, sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"], 0.01, "lrelu")
        for i in range(n_mlp)
    }
    w_dim = sd["style.1.weight"].shape[0]
    mapping = P(
        "MappingNetwork",
        None,
        {"w_avg": w_avg if w_avg is not None else torch.zeros(w_dim)},
        fcs,
        z_dim=w_dim,
        c_dim=0,
        w_dim=w_dim,
        num_ws=10,
        num_layers=n_mlp,
        w_avg_beta=0.995,
    )
    blocks = OrderedDict()
    blocks["b4"] = P(
        "SynthesisBlock",
        {"const": sd["input.input"][0]},
        {"resample_filter": FILTER},
        {
            "conv1": _synthesis_layer(P, sd, "conv1", 0, 4, 1),
            "torgb": _torgb(P, sd, "to_rgb1"),
        },
        architecture="skip",
        in_channels=0,
        resolution=4,
        use_fp16=False,
    )
    n_blocks = sum(1 for k in sd if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
    for i in range(n_blocks):
        res = 8 * 2**i
        blocks[f"b{res}"] = P(
            "SynthesisBlock",
            None,
            {"resample_filter": FILTER},
            {
                "conv0": _synthesis_layer(P, sd, f"convs.{2 * i}", 2 * i + 1, res, 2),
                "conv1": _synthesis_layer(P, sd, f"convs.{2 * i + 1}", 2 * i + 2, res, 1),
                "torgb": _torgb(P, sd, f"to_rgbs.{i}"),
            },
            architecture="skip",
            resolution=res,
            use_fp16=i >= n_blocks - 2,
        )
    synthesis = P("SynthesisNetwork", None, None, blocks, w_dim=w_dim, img_resolution=64)
    return P(
        "Generator",
        None,
        None,
        {"synthesis": synthesis, "mapping": mapping},
        z_dim=w_dim,
        c_dim=0,
        w_dim=w_dim,
        img_resolution=64,
        img_channels=3,
    )


@pytest.fixture(scope="module")
def golden():
    return golden_weights(load_manifest("stylegan2-small"))


@pytest.fixture(scope="module")
def arrays():
    return {**fixture_arrays("stylegan2-small"), **fixture_arrays("stylegan2-small.extra")}


def _network_pickle(nv, golden, path, w_avg=None, extra=None):
    G = nvidia_generator(nv.Persistent, golden, w_avg)
    data = {
        "G": G,
        "D": nv.Persistent("Discriminator", {"w": torch.ones(2)}, None, None, epochs=np.float64(2)),
        "G_ema": G,
        "augment_pipe": nv.AugmentPipe(),
        "training_set_kwargs": nv.EasyDict(path="ffhq.zip", resolution=64),
        **(extra or {}),
    }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def test_nvidia_pickle_matches_reference(nvidia_modules, golden, arrays, tmp_path):
    path = _network_pickle(nvidia_modules, golden, tmp_path / "network-snapshot.pkl")
    G = load_generator(path)
    assert not nvidia_modules.marker.exists()  # neither module_src nor the file's code ran
    t = torch.from_numpy
    with torch.no_grad():
        assert float((G.mapping(t(arrays["z"])) - t(arrays["w"])).abs().max()) <= 1e-5
        s = G.w_to_s(t(arrays["wplus"]))
        assert float((s - t(arrays["s_all"])).abs().max()) <= 1e-5
        img = G.synthesize(s, noise_mode="const")
        assert float((img - t(arrays["images"])).abs().max()) <= 1e-4
    assert G.config.lr_mlp == pytest.approx(0.01)
    torch.testing.assert_close(G.mean_latent(), torch.zeros(1, 64))  # w_avg of the file


def test_nvidia_w_avg_is_the_truncation_centre(nvidia_modules, golden, tmp_path):
    avg = torch.linspace(-1, 1, 64)
    G = load_generator(_network_pickle(nvidia_modules, golden, tmp_path / "g.pkl", avg))
    torch.testing.assert_close(G.mean_latent(), avg[None])


def test_nvidia_conv_clamp_is_kept(nvidia_modules, golden, tmp_path):
    G = nvidia_generator(nvidia_modules.Persistent, golden)
    for block in G.meta["state"]["_modules"]["synthesis"].meta["state"]["_modules"].values():
        for layer in block.meta["state"]["_modules"].values():
            layer.meta["state"]["conv_clamp"] = 0.5
    path = tmp_path / "clamped.pkl"
    path.write_bytes(pickle.dumps({"G_ema": G}))
    H = load_generator(path)
    assert H.config.conv_clamp == 0.5
    with torch.no_grad():
        img = H.synthesize_w(torch.randn(2, 10, 64))
    # 5 toRGB outputs clamped to 0.5, summed through the skip upsampling (each output
    # pixel's FIR taps sum to 1): the image stays within 2.5; unclamped it reaches ~10
    assert img.abs().max() <= 0.5 * 5 + 1e-5


def test_convert_checkpoint_cli(nvidia_modules, golden, tmp_path):
    from click.testing import CliRunner

    from pipeline.commands.generator import convert_checkpoint

    src = _network_pickle(nvidia_modules, golden, tmp_path / "g.pkl")
    out = tmp_path / "out" / "gen.safetensors"
    res = CliRunner().invoke(convert_checkpoint, [str(src), str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and out.with_suffix(".json").exists()
    assert load_generator(out).fingerprint == load_generator(src).fingerprint
    assert load_generator(out).fingerprint in res.output
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04junk")
    res = CliRunner().invoke(convert_checkpoint, [str(bad), str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "bad.pkl" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------- malicious files
class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _Evil(os.system, f"touch {p}"),
        lambda p: _Evil(eval, f"open({str(p)!r}, 'w').write('x')"),
        lambda p: _Evil(exec, f"open({str(p)!r}, 'w').write('x')"),
        lambda p: _Evil(subprocess.call, ["touch", str(p)]),
        lambda p: _Evil(importlib.import_module, "os"),
        lambda p: _Evil(torch.save, {"x": 1}, str(p)),
    ],
    ids=["os.system", "eval", "exec", "subprocess.call", "import_module", "torch.save"],
)
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": make(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused to load: refused global"):
        load_generator(path)
    assert not marker.exists()


def test_malicious_object_hidden_beside_a_real_generator(nvidia_modules, golden, tmp_path):
    marker = tmp_path / "pwned"
    path = _network_pickle(
        nvidia_modules, golden, tmp_path / "g.pkl", extra={"x": _Evil(os.system, f"touch {marker}")}
    )
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_generator(path)
    assert not marker.exists()


def test_foreign_class_is_refused(tmp_path):
    import argparse

    path = tmp_path / "foreign.pkl"
    path.write_bytes(pickle.dumps({"G_ema": argparse.Namespace(a=1)}))
    with pytest.raises(CheckpointError, match=r"foreign\.pkl.*argparse\.Namespace"):
        load_generator(path)


def test_truncated_pickle_and_non_generator_pickle(nvidia_modules, golden, tmp_path):
    path = _network_pickle(nvidia_modules, golden, tmp_path / "full.pkl")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.pkl: not a readable network pickle"):
        load_generator(cut)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"D": nvidia_modules.Persistent("Discriminator")}))
    with pytest.raises(CheckpointError, match=r"other\.pkl: network pickle has no 'G_ema'"):
        load_generator(other)


def test_resnet_architecture_is_refused(nvidia_modules, golden, tmp_path):
    G = nvidia_generator(nvidia_modules.Persistent, golden)
    G.meta["state"]["_modules"]["synthesis"].meta["state"]["_modules"]["b8"].meta["state"][
        "architecture"
    ] = "resnet"
    path = tmp_path / "resnet.pkl"
    path.write_bytes(pickle.dumps({"G_ema": G}))
    with pytest.raises(CheckpointError, match="architecture 'resnet' is not supported"):
        load_generator(path)


def test_tensorflow_pickle_is_refused_with_a_hint(monkeypatch, tmp_path):
    mod = types.ModuleType("dnnlib.tflib.network")

    class Network:
        def __reduce__(self):
            return (Network, ())

    Network.__module__, Network.__qualname__ = "dnnlib.tflib.network", "Network"
    mod.Network = Network
    for name in ("dnnlib", "dnnlib.tflib"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "dnnlib.tflib.network", mod)
    path = tmp_path / "karras2019.pkl"
    path.write_bytes(pickle.dumps((Network(), Network(), Network())))
    with pytest.raises(CheckpointError, match="TensorFlow StyleGAN pickle.*legacy.py"):
        load_generator(path)
