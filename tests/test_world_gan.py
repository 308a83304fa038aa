"""The world generator trained the StyleGAN2 way, its e4e-way encoder, the honest judge
and the S-space test: resumable chunks, refusals, and what a person would notice."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import CheckpointError
from model.e4e import create_e4e, save_e4e
from model.stylegan2 import create_generator, load_generator, save_generator
from stages.world.e4e import EncoderTrainConfig
from stages.world.e4e import train_chunk as train_e4e
from stages.world.gan import GanConfig, mixed_wplus, train_chunk
from stages.world.judge import UNCLEAR, judge_images, read_image
from stages.world.render import WorldConfig, render, sample_scene

WORLD = WorldConfig(seed=0)
QUIET = dict(log=lambda s: None)
TINY_GAN = GanConfig(n_train=32, batch=4, r1_every=2, d_channels=16, chunk_minutes=0, log_every=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gan_chunks_resume_bitwise(tmp_path):
    one = dataclasses.replace(TINY_GAN, out_dir=str(tmp_path / "one"), iterations=6)
    train_chunk(one, WORLD, **QUIET)
    split = dataclasses.replace(TINY_GAN, out_dir=str(tmp_path / "split"), iterations=2)
    train_chunk(split, WORLD, **QUIET)
    summary = train_chunk(dataclasses.replace(split, iterations=6), WORLD, **QUIET)
    assert summary == {**summary, "step": 6, "chunk_steps": 4, "done": True}
    a = load_file(tmp_path / "one" / "state.safetensors")
    b = load_file(tmp_path / "split" / "state.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # the saved generator is the EMA one, a loadable generator with a trained mapping
    G = load_generator(tmp_path / "split" / "generator.safetensors")
    assert G.config.n_mlp == 4
    assert (tmp_path / "split" / "samples_000006.png").exists()


def test_gan_training_changes_the_mapping_network(tmp_path):
    cfg = dataclasses.replace(TINY_GAN, out_dir=str(tmp_path), iterations=3, ema_kimg=0.001)
    train_chunk(cfg, WORLD, **QUIET)
    G0 = create_generator(cfg.generator_config, seed=cfg.seed)
    G = load_generator(tmp_path / "generator.safetensors")
    assert not torch.equal(G.style[1].weight, G0.style[1].weight)


def test_resumed_chunk_with_another_config_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    train_chunk(dataclasses.replace(TINY_GAN, out_dir=str(out), iterations=1), WORLD, **QUIET)
    before = (out / "state.safetensors").read_bytes()
    sets = [
        "--set",
        f"world_gan.out_dir={out}",
        "--set",
        "world_gan.n_train=32",
        "--set",
        "world_gan.batch=4",
        "--set",
        "world_gan.r1_every=2",
        "--set",
        "world_gan.d_channels=16",
        "--set",
        "world_gan.lr=0.001",
        "--set",
        "world_gan.mixing=0.5",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "world", "train-gan", "--minutes", "0", *sets],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "world_gan.lr" in lines[0] and "world_gan.mixing" in lines[0]
    assert (out / "state.safetensors").read_bytes() == before  # nothing lost


def test_style_mixing_switches_rows_at_the_cut():
    G = create_generator("world-gan-32")
    z1, z2 = torch.randn(2, 64), torch.randn(2, 64)
    wp = mixed_wplus(G, z1, z2, torch.tensor([True, False]), torch.tensor([3, 3]))
    w1, w2 = G.mapping(z1), G.mapping(z2)
    assert torch.equal(wp[0, :3], w1[0].expand(3, -1))
    assert torch.equal(wp[0, 3:], w2[0].expand(G.n_latent - 3, -1))
    assert torch.equal(wp[1], w1[1].expand(G.n_latent, -1))


def test_encoder_chunks_learn_and_refuse_another_generator(tmp_path):
    gpath = tmp_path / "g.safetensors"
    save_generator(create_generator("world-gan-32", seed=3), gpath)
    cfg = EncoderTrainConfig(
        generator=str(gpath),
        out_dir=str(tmp_path / "e4e"),
        n_train=32,
        batch=8,
        chunk_minutes=0,
        log_every=1,
        iterations=12,
    )
    train_e4e(cfg, WORLD, **QUIET)
    log = [line for line in (tmp_path / "e4e" / "log.jsonl").read_text().splitlines()]
    import json

    lat = [json.loads(line)["latent"] for line in log]
    assert np.mean(lat[-3:]) < np.mean(lat[:3])  # it learns to invert generated samples
    save_generator(create_generator("world-gan-32", seed=4), gpath)  # another generator
    from model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="generator_fingerprint"):
        train_e4e(dataclasses.replace(cfg, iterations=14), WORLD, **QUIET)


def test_encoder_run_warm_started_from_an_earlier_encoder(tmp_path):
    """world_e4e.init: a run on a later generator snapshot starts from the encoder trained
    on an earlier one (its weights, this generator's mean w), not from the seed."""
    import json

    g1, g2 = tmp_path / "g1.safetensors", tmp_path / "g2.safetensors"
    save_generator(create_generator("world-gan-32", seed=3), g1)
    cfg = EncoderTrainConfig(
        generator=str(g1), out_dir=str(tmp_path / "first"), n_train=32, batch=8,
        chunk_minutes=0, log_every=1, iterations=30,
    )  # fmt: skip
    train_e4e(cfg, WORLD, **QUIET)
    first = [json.loads(x)["latent"] for x in (tmp_path / "first/log.jsonl").open()]
    save_generator(create_generator("world-gan-32", seed=3), g2)  # same weights, new file
    for name, init in (("scratch", ""), ("warm", str(tmp_path / "first/e4e.safetensors"))):
        run = dataclasses.replace(cfg, generator=str(g2), out_dir=str(tmp_path / name),
                                  init=init, iterations=3)  # fmt: skip
        train_e4e(run, WORLD, **QUIET)
    warm = [json.loads(x)["latent"] for x in (tmp_path / "warm/log.jsonl").open()]
    scratch = [json.loads(x)["latent"] for x in (tmp_path / "scratch/log.jsonl").open()]
    assert np.mean(warm) < np.mean(scratch)
    assert np.mean(warm) <= np.mean(first[-5:]) * 1.5  # it goes on from where the first ended
    with pytest.raises(CheckpointError, match="another shape"):
        bad = tmp_path / "bad.safetensors"
        save_e4e(create_e4e("tiny"), bad)
        train_e4e(dataclasses.replace(run, out_dir=str(tmp_path / "bad"), init=str(bad)),
                  WORLD, **QUIET)  # fmt: skip


def _scene(shape: str, size: str = "large"):
    return dataclasses.replace(
        sample_scene(WORLD, 0), shape=shape, size=size, color="red", background="white"
    )


def test_judge_says_unclear_for_blobs_and_specks_not_a_forced_shape():
    from PIL import Image, ImageFilter

    clean = [
        render(_scene(s, z), WORLD)
        for s in ("circle", "square", "triangle")
        for z in ("small", "large")
    ]
    assert [r.shape for r in judge_images(np.stack(clean), WORLD)] == [
        "circle",
        "circle",
        "square",
        "square",
        "triangle",
        "triangle",
    ]
    speck = np.full((32, 32, 3), 245, np.uint8)
    speck[15:17, 15:17] = (220, 40, 40)
    ellipse = np.full((32, 32, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    ellipse[((xx - 16) / 9.0) ** 2 + ((yy - 16) / 4.0) ** 2 <= 1] = (220, 40, 40)
    # a small triangle blurred into a dome
    tri = Image.fromarray(render(_scene("triangle", "small"), WORLD))
    dome = np.asarray(tri.filter(ImageFilter.GaussianBlur(1.6)))
    for img in (speck, ellipse, dome):
        assert read_image(img, WORLD).shape == UNCLEAR


def test_sspace_report_on_the_committed_world_models():
    from stages.world.sspace import FAMILIES, s_space_report
    from stages.world.train import load_world_models

    G, E, _ = load_world_models(Path(__file__).resolve().parents[1] / "weights" / "world")
    rep = s_space_report(G, E, WORLD, n_rows=12)
    assert set(rep["families"]) == {f"{a}={v}" for a, v in FAMILIES}
    size = rep["families"]["size=large"]
    assert size["oracle_conv"]["target_reached"] >= 0.8  # size lives in conv channels
    assert set(size["levels"]) == {"coarse", "medium"}  # 32 px: no fine level
    assert size["channels_for_energy"]["50%"] <= size["channels_for_energy"]["95%"]


def test_attribute_directions_are_not_confounded_by_co_occurring_attributes():
    from stages.world.sspace import attribute_directions

    rng = np.random.default_rng(0)
    n, d = 600, 5
    blue, large = rng.random(n) < 0.5, np.zeros(n, bool)
    large[blue] = rng.random(blue.sum()) < 0.9  # blue rows are nearly always large
    large[~blue] = rng.random((~blue).sum()) < 0.1
    colour_dir, size_dir = np.eye(d)[0] * 2.0, np.eye(d)[1] * 3.0
    s = blue[:, None] * colour_dir + large[:, None] * size_dir + 0.05 * rng.normal(size=(n, d))
    reads = [
        {
            "shape": "circle",
            "color": "blue" if b else "red",
            "background": "white",
            "size": "large" if g else "small",
        }
        for b, g in zip(blue, large, strict=True)
    ]
    dirs = attribute_directions(s.astype(np.float32), reads)
    fitted = dirs["color"]["blue"] - dirs["color"]["red"]
    naive = s[blue].mean(0) - s[~blue].mean(0)  # a class-mean difference carries size too
    assert np.abs(naive[1]) > 1.5
    np.testing.assert_allclose(fitted, colour_dir, atol=0.05)


def test_sample_probe_finds_colour_in_the_gan_conv_channels_not_in_torgb():
    from stages.world.sspace import FAMILIES, sample_probe

    G = load_generator(
        Path(__file__).resolve().parents[1] / "weights/world/gan/generator.safetensors"
    )
    rep = sample_probe(G.eval(), WORLD, n_fit=512, n_test=96, seed=0, alphas=(1.0,))
    assert set(rep["families"]) == {f"{a}={v}" for a, v in FAMILIES}
    colour = rep["families"]["color=blue"]
    assert set(colour) >= {"conv", "torgb", "conv coarse", "conv medium", "conv_alpha"}
    # the StyleGAN-way generator keeps colour in the conv styles DeltaEdit edits
    assert colour["conv"]["target_reached"] > colour["torgb"]["target_reached"] + 0.2
    assert colour["conv"]["energy_share"] > 0.5
