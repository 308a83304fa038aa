"""model/clip.py: tiny open_clip models, offline, fixed seeds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from model.checkpoint import CheckpointError
from model.clip import (
    TINY_CONFIG,
    get_config,
    load_clip,
    register_config,
    save_clip,
)


@pytest.fixture(scope="module")
def clip():
    return load_clip("deltaedit-tiny", seed=0)


def _images(seed: int, b: int = 2, h: int = 40, w: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_same_seed_same_fingerprint_and_outputs(clip):
    again = load_clip("deltaedit-tiny", seed=0)
    other = load_clip("deltaedit-tiny", seed=1)
    assert again.fingerprint == clip.fingerprint
    assert other.fingerprint != clip.fingerprint
    x = _images(0)
    torch.testing.assert_close(again.encode_images(x), clip.encode_images(x), rtol=0, atol=0)
    assert clip.embed_dim == 64 and clip.image_size == 32
    assert clip.encode_images(x).shape == (2, 64)


def test_deltaedit_preprocessing_keeps_a_constant_image(clip):
    x = torch.full((2, 3, 20, 28), 0.3)
    y = clip.preprocess_images(x, "deltaedit")
    assert y.shape == (2, 3, 32, 32)
    torch.testing.assert_close(y, torch.full_like(y, 0.3))


@pytest.mark.parametrize("size", [(13, 17), (64, 64), (32, 32)])
def test_deltaedit_preprocessing_is_upsample7_then_avgpool(clip, size):
    x = _images(1, 2, *size)
    literal = F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), 32)
    torch.testing.assert_close(clip.preprocess_images(x, "deltaedit"), literal)


def test_deltaedit_preprocessing_matches_official_pool_for_1024():
    # official: Upsample(x7) then AvgPool2d(1024 // 32) -> 224 for ViT-B/32
    register_config(
        "test-224",
        {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 224}},
    )
    m = load_clip("test-224")
    x = _images(2, 1, 256, 256)  # 256 * 7 / 224 = 8 px windows
    official = F.avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), 8)
    torch.testing.assert_close(m.preprocess_images(x, "deltaedit"), official)


def test_clip_preprocessing_normalizes_with_openai_mean_std(clip):
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = torch.full((1, 3, 48, 64), 0.2)  # [-1,1] -> 0.6 in [0,1]
    y = clip.preprocess_images(x, "clip")
    assert y.shape == (1, 3, 32, 32)
    torch.testing.assert_close(y, ((0.6 - mean) / std).expand_as(y))
    pil = Image.new("RGB", (50, 40), (255, 0, 128))
    y = clip.preprocess_pil([pil], "clip")
    v = torch.tensor([1.0, 0.0, 128 / 255]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ((v - mean) / std).expand_as(y), atol=1e-5, rtol=0)


def test_pil_and_tensor_paths_agree(clip):
    x = _images(3, 1, 32, 32)
    arr = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    q = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    pil = Image.fromarray(arr)
    for p in ("clip", "deltaedit"):
        torch.testing.assert_close(
            clip.encode_pil([pil], p), clip.encode_images(q, p), atol=1e-5, rtol=1e-5
        )


def test_encode_images_is_differentiable(clip):
    for p in ("clip", "deltaedit"):
        x = _images(4).requires_grad_(True)
        clip.encode_images(x, p).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_encode_images_rejects_bad_shape(clip):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip.encode_images(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="preprocessing"):
        clip.encode_images(torch.zeros(1, 3, 8, 8), "imagenet")


def test_text_is_normalized_average_of_normalized_templates(clip):
    templates = ("a photo of {}.", "a picture of {}", "{}")
    got = clip.encode_text(["a smiling face", "a face"], templates)
    assert got.shape == (2, 64)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    tokens = clip.tokenize([t.format("a smiling face") for t in templates])
    with torch.no_grad():
        e = F.normalize(clip.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(got[0], F.normalize(e.mean(0), dim=-1))
    assert not torch.allclose(got[0], got[1])


def test_text_cache_hit(clip, monkeypatch):
    clip.encode_text(["blond hair"], ("{}", "a photo of {}"))
    calls = []
    original = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda t: calls.append(1) or original(t))
    size = clip.text_cache_size
    clip.encode_text(["blond hair"], ("{}", "a photo of {}"))
    assert calls == [] and clip.text_cache_size == size
    clip.encode_text(["blond hair"], ("{}",))  # other templates: a miss
    assert calls == [1] and clip.text_cache_size == size + 1


def test_long_prompt_is_truncated_with_a_warning(clip):
    long = " ".join(["smile"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        e = clip.encode_text([long])
    assert e.shape == (1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.encode_text(["a short prompt"])


def test_empty_prompt_raises(clip):
    with pytest.raises(ValueError, match="empty prompt"):
        clip.encode_text(["  "])
    with pytest.raises(ValueError, match="template"):
        clip.encode_text(["x"], ("no placeholder",))


def test_save_load_round_trip(clip, tmp_path):
    path = tmp_path / "clip.safetensors"
    save_clip(clip, path)
    assert path.exists() and path.with_suffix(".json").exists()
    for back in (load_clip(str(path)), load_clip("deltaedit-tiny", weights=path)):
        assert back.fingerprint == clip.fingerprint and back.name == "deltaedit-tiny"
        x = _images(5)
        torch.testing.assert_close(
            back.encode_images(x, "deltaedit"), clip.encode_images(x, "deltaedit")
        )
        torch.testing.assert_close(back.encode_text(["a cat"]), clip.encode_text(["a cat"]))


def test_plain_state_dict_file_loads_with_weights_only(clip, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.model.state_dict().items()}}, path)
    loaded = load_clip("deltaedit-tiny", weights=path, seed=123)  # seed is irrelevant
    assert loaded.fingerprint == clip.fingerprint
    register_config(
        "test-wide", {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "width": 32}}
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_clip("test-wide", weights=path)


def test_torchscript_refused_without_trust(clip, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(clip.model).save(str(path))
        with pytest.raises(CheckpointError, match="trust_checkpoint"):
            load_clip("deltaedit-tiny", weights=path)
        trusted = load_clip("deltaedit-tiny", weights=path, trust_checkpoint=True)
    assert trusted.fingerprint == clip.fingerprint


def test_named_architecture_needs_weights():
    with pytest.raises(ValueError, match="weights"):
        load_clip("ViT-B-32-quickgelu")
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("no-such-model")
    assert get_config("ViT-B-32-quickgelu")["vision_cfg"]["patch_size"] == 32


def test_register_config():
    cfg = {**TINY_CONFIG, "embed_dim": 16}
    register_config("test-e16", cfg)
    m = load_clip("test-e16", seed=0)
    assert m.embed_dim == 16 and m.encode_images(_images(6), "clip").shape == (2, 16)
    with pytest.raises(ValueError, match="already registered"):
        register_config("test-e16", TINY_CONFIG)


def test_changed_weights_change_fingerprint_and_miss_the_text_cache():
    m = load_clip("deltaedit-tiny", seed=0)
    before, fp = m.encode_text(["a red square"]), m.fingerprint
    with torch.no_grad():
        m.model.text_projection.add_(
            torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        )
    assert m.fingerprint != fp
    assert not torch.allclose(m.encode_text(["a red square"]), before)
