"""The shapes world: renderer, captions, counterfactuals, the `world render` CLI, the judge."""

import dataclasses
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.params import ParamError, section
from stages.config import ConfigError
from stages.world.judge import (
    UNSCORABLE,
    JudgeCheckConfig,
    judge_check,
    judge_images,
    read_image,
    score_target,
)
from stages.world.render import (
    ATTRIBUTES,
    HELD_OUT_SYNONYMS,
    SYNONYMS,
    WorldConfig,
    attribute_values,
    counterfactual,
    load_labels,
    region_phrase,
    render,
    render_many,
    sample_caption,
    sample_scene,
    scenes,
    zero_shot_prompts,
)


def test_render_is_deterministic_and_rows_are_independent():
    cfg = WorldConfig(seed=3, n_images=8)
    a = render_many(scenes(cfg), cfg)
    b = render_many(scenes(cfg), cfg)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    # row 5 of a 20-row world is row 5 of an 8-row world
    assert sample_scene(WorldConfig(seed=3, n_images=20), 5) == scenes(cfg)[5]
    assert not np.array_equal(a, render_many(scenes(WorldConfig(seed=4, n_images=8)), cfg))


def test_render_is_antialiased_and_uses_the_palette():
    cfg = WorldConfig(seed=1)
    s = sample_scene(cfg, 0)
    img = render(s, cfg).reshape(-1, 3)
    colours = {tuple(p) for p in img}
    assert len(colours) > 2  # edge pixels blend shape and background
    corner = render(s, cfg)[0, 0].astype(int)
    from stages.world.render import BACKGROUNDS

    assert np.abs(corner - np.add(BACKGROUNDS[s.background], s.background_offset)).max() <= 1


def test_counterfactual_changes_only_one_attribute():
    cfg = WorldConfig(seed=2)
    s = sample_scene(cfg, 7)
    for attribute in ATTRIBUTES:
        for value in attribute_values(attribute):
            cf = counterfactual(s, attribute, value)
            assert getattr(cf, attribute) == value
            for other in ("cx", "cy", "scale", "rotation", "color_offset", "background_offset"):
                assert getattr(cf, other) == getattr(s, other)
            for a in ATTRIBUTES:
                if a != attribute:
                    assert getattr(cf, a) == getattr(s, a)
    # a colour change keeps every background pixel and the shape's footprint
    value = "blue" if s.color != "blue" else "red"
    a, b = render(s, cfg), render(counterfactual(s, "color", value), cfg)
    far = np.abs(a.astype(int) - b.astype(int)).sum(-1) > 0
    ra = read_image(a, cfg)
    assert far.sum() == pytest.approx((ra.mask > 0).sum(), abs=3)
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        counterfactual(s, "color", "pink")
    with pytest.raises(ValueError, match="unknown attribute"):
        counterfactual(s, "texture", "striped")


def test_size_counterfactual_stays_inside_the_canvas():
    cfg = WorldConfig(seed=9, n_images=200)
    for s in scenes(cfg):
        big = render(counterfactual(s, "size", "large"), cfg)
        r = read_image(big, cfg)
        border = np.concatenate([r.mask[0], r.mask[-1], r.mask[:, 0], r.mask[:, -1]])
        assert border.max() == 0


def test_captions_are_true_and_never_use_held_out_words():
    cfg = WorldConfig(seed=0)
    rng = np.random.default_rng(0)
    held = {w for a in HELD_OUT_SYNONYMS.values() for ws in a.values() for w in ws}
    seen_partial = False
    for i in range(300):
        s = sample_scene(cfg, i)
        c = sample_caption(s, rng)
        assert c.fits(s) and c.attributes
        seen_partial |= len(c.attributes) < len(ATTRIBUTES)
        assert not set(c.text.split()) & held, c.text
        other = counterfactual(s, "color", "red" if s.color != "red" else "blue")
        assert c.fits(other) == ("color" not in c.attributes)
    assert seen_partial
    train_words = {w for a in SYNONYMS.values() for ws in a.values() for w in ws}
    assert not held & train_words
    assert zero_shot_prompts("color")["orange"] == "an orange shape"
    assert "azure" in zero_shot_prompts("color", held_out=True)["blue"]


def test_position_words_name_where_the_shape_is_and_change_nothing_when_off():
    cfg = WorldConfig(seed=0, position_words=1.0)
    rows = [sample_scene(cfg, i) for i in range(200)]
    off = [
        sample_caption(s, np.random.default_rng(i), cfg.keep_attribute) for i, s in enumerate(rows)
    ]
    on = [
        sample_caption(s, np.random.default_rng(i), cfg.keep_attribute, 1.0, cfg)
        for i, s in enumerate(rows)
    ]
    regions = set()
    for s, a, b in zip(rows, off, on, strict=True):
        assert a.region is None and b.text.startswith(a.text) and b.fits(s), b.text
        regions.add(b.region)
        moved = dataclasses.replace(s, cx=32 - s.cx, cy=32 - s.cy)  # mirrored through the centre
        assert b.fits(moved) == (b.region == ("", "")), b.text  # only "in the centre" still holds
    assert {"at the top left", "on the right", "in the centre"} <= {
        region_phrase(*r).strip() for r in regions
    }
    # the default draws nothing more: captions (and labels.json) are those of before
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [sample_caption(s, rng_a).text for s in rows[:20]] == [
        sample_caption(s, rng_b, 0.7, 0.0, cfg).text for s in rows[:20]
    ]
    with pytest.raises(ConfigError, match="position_words"):
        WorldConfig(position_words=1.5).validate()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("colors", ["red", "pink"], "world.colors: got 'pink'"),
        ("backgrounds", ["plaid"], "world.backgrounds: got 'plaid'"),
        ("radius_large", 30.0, "fits the 32 px canvas"),
    ],
)
def test_world_config_that_cannot_render_fails_clearly(key, value, message):
    with pytest.raises(ParamError, match=message):
        section({"world": {key: value}}, "world", WorldConfig)


def test_world_render_cli_writes_pngs_and_labels(tmp_path):
    out = tmp_path / "w"
    runner = CliRunner()
    args = [
        "world",
        "render",
        "--params",
        os.devnull,
        "--out",
        str(out),
        "--n-images",
        "6",
        "--seed",
        "11",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    labels = json.loads((out / "labels.json").read_text())
    row = labels["rows"][2]
    assert set(ATTRIBUTES) <= set(row) and {"cx", "cy", "caption", "color_offset"} <= set(row)
    cfg, sc, _ = load_labels(out)
    assert np.array_equal(np.asarray(Image.open(pngs[2])), render(sc[2], cfg))
    first = (out / "000002.png").read_bytes()
    assert runner.invoke(main, args).exit_code == 0
    assert (out / "000002.png").read_bytes() == first  # deterministic by seed

    bad = runner.invoke(
        main,
        [
            "world",
            "render",
            "--params",
            os.devnull,
            "--out",
            str(out),
            "--set",
            "world.colors=[red, pink]",
        ],
    )
    assert bad.exit_code != 0
    assert "world.colors: got 'pink'" in bad.output and "Traceback" not in bad.output


def test_judge_reads_clean_renders():
    report = judge_check(JudgeCheckConfig(n_images=300, seed=77))
    assert report["min_accuracy"] >= 0.99, report
    assert report["centroid_error_px"]["max"] < 0.25


def test_judge_check_cli(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "world",
            "judge-check",
            "--params",
            os.devnull,
            "--set",
            "world_judge.n_images=60",
            "--out",
            str(tmp_path / "j.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "j.json").read_text())["passes"] is True


def test_judge_sees_a_wrong_edit_and_refuses_unknown_targets():
    cfg = WorldConfig(seed=5)
    s = sample_scene(cfg, 0)
    target = "green" if s.color != "green" else "blue"
    reading = read_image(render(s, cfg), cfg)
    assert score_target(reading, "color", target) is False
    assert (
        score_target(
            read_image(render(counterfactual(s, "color", target), cfg), cfg), "color", target
        )
        is True
    )
    assert score_target(reading, "color", "pink") == UNSCORABLE
    assert score_target(reading, "texture", "striped") == UNSCORABLE
    # a blank image has no shape: every shape attribute reads unknown, never a guess
    blank = np.full((32, 32, 3), 128, np.uint8)
    r = judge_images(blank[None], cfg)[0]
    assert (r.shape, r.color, r.size, r.background) == ("unknown", "unknown", "unknown", "gray")
