"""train.channels: a mapper of conv channels (DeltaEdit) or of all S channels (conv + toRGB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_edit import make_dataset, make_relevance

from model.layout import SLayout
from model.mapper import DeltaMapper, load_mapper, official_layout
from stages.common import ExecutionConfig
from stages.edit import EditConfig, EditSpec
from stages.edit import run as run_edit
from stages.train import TrainConfig
from stages.train import run as run_train
from store import RowStore, Status, store_url

TINY = SLayout.from_channels(32, {4: 8, 8: 8, 16: 6, 32: 4})


def test_mapper_layout_all_covers_every_channel_in_s_order():
    assert TINY.mapper_layout("conv") is TINY
    every = TINY.mapper_layout("all")
    assert np.array_equal(every.conv_index(), np.arange(TINY.dim))
    assert every.conv_dim == TINY.dim and every.dim == TINY.dim
    # levels stay contiguous and take the toRGB layer of their resolutions
    sl = every.level_slices()
    assert sl["coarse"] == slice(0, 8 + 8 + 8 + 8 + 8)
    assert sl["medium"].start == sl["coarse"].stop and sl["medium"].stop == TINY.dim
    with pytest.raises(ValueError):
        TINY.mapper_layout("rgb")


def test_official_mapper_config_unchanged_and_all_is_recorded(tmp_path):
    with torch.device("meta"):
        official = DeltaMapper(official_layout())
    assert "channels" not in official.config() and official.conv_dim == 6048
    m = DeltaMapper(TINY, 16, channels="all")
    assert m.conv_dim == TINY.dim and m.config()["channels"] == "all"
    from model.mapper import save_mapper

    save_mapper(m, tmp_path / "m.safetensors")
    back = load_mapper(tmp_path / "m.safetensors", layout=TINY, clip_dim=16)
    assert back.channels == "all" and back.fingerprint == m.fingerprint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("channels")
    G, clip = make_dataset(root, n=24, bad=())
    make_relevance(root, root / "relevance.zarr", G.layout, clip.embed_dim)
    mappers = {}
    for channels in ("conv", "all"):
        cfg = TrainConfig(
            stores=(str(root),),
            out=str(root / f"mapper-{channels}.safetensors"),
            metrics_dir=str(root / f"metrics-{channels}"),
            iterations=3,
            batch_size=8,
            val_every=3,
            val_pairs=8,
            checkpoint_every=3,
            holdout_fraction=0.0,
            channels=channels,
        )
        run_train(cfg, ExecutionConfig(device="cpu"), progress=False, log=lambda _: None)
        mappers[channels] = cfg.out
    return {"root": root, "G": G, "clip": clip, "mappers": mappers}


@pytest.mark.parametrize("beta", [0.0, 0.03])
@pytest.mark.parametrize("channels", ["conv", "all"])
def test_edit_moves_torgb_only_with_a_mapper_of_all_channels(world, tmp_path, channels, beta):
    root, layout = world["root"], world["G"].layout
    path = world["mappers"][channels]
    assert (
        json.loads(open(path.replace(".safetensors", ".json")).read()).get("channels", "conv")
        == channels
    )
    spec = EditSpec("smile", "smiling face", alpha=1.0, beta=beta)
    cfg = EditConfig(
        store=str(root),
        mapper=path,
        relevance=str(root / "relevance.zarr"),
        out_dir=str(tmp_path / "edits"),
        dataset_kind="faces",
        edits=(spec,),
    )
    cfg.validate()
    (res,) = run_edit(
        cfg, ExecutionConfig(device="cpu"), clip=world["clip"], progress=False, log=lambda _: None
    )
    out = RowStore.open(res.url)
    ok = np.flatnonzero(out.status() == Status.OK)
    s = RowStore.open(store_url(str(root), "s")).read("s")[ok]
    s2 = out.read("s")[ok]
    conv = layout.conv_index()
    torgb = np.setdiff1d(np.arange(layout.dim), conv)
    assert np.abs(s2[:, conv] - s[:, conv]).max() > 0
    moved = np.abs(s2[:, torgb] - s[:, torgb]).max(axis=0)
    if channels == "conv":
        assert moved.max() == 0
    else:
        # every toRGB channel moves: the beta mask (conv relevance) never drops them
        assert (moved > 0).all()
        mapper = load_mapper(path, layout=layout, clip_dim=world["clip"].embed_dim)
        from stages.edit import mapper_condition, text_delta

        clip = world["clip"]
        dt = text_delta(clip.encode_text(["smiling face"])[0], clip.encode_text(["face"])[0])
        c = RowStore.open(store_url(str(root), "clip")).read("embed")[ok]
        with torch.no_grad():
            d = mapper(torch.as_tensor(s), mapper_condition(torch.as_tensor(c), dt)).numpy()
        np.testing.assert_allclose(s2[:, torgb], s[:, torgb] + d[:, torgb], atol=1e-5)
