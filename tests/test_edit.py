"""Edit stage: the math on tensors, config checks, and the stage over a tiny store."""

from __future__ import annotations

import math
import os

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
    mapped_delta,
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


def test_chord_condition_points_from_each_row_to_the_text_target():
    torch.manual_seed(0)
    c, dt = torch.randn(6, 5), torch.randn(5)
    assert torch.equal(mapper_condition(c, dt, 0.0), mapper_condition(c, dt))
    cond = mapper_condition(c, dt, 0.3)
    c_hat = c / c.norm(dim=1, keepdim=True)
    assert torch.allclose(cond[:, :5], c_hat)
    target = c_hat + 0.3 * unit(dt)
    chord = target / target.norm(dim=1, keepdim=True) - c_hat  # to the point on the sphere
    assert torch.allclose(cond[:, 5:], chord / chord.norm(dim=1, keepdim=True), atol=1e-6)
    # rows differ (the plain condition is one direction for all); a short chord is nearly
    # tangent at c, a long one turns inward
    assert not torch.allclose(cond[0, 5:], cond[1, 5:], atol=1e-3)
    inward = [float((mapper_condition(c, dt, k)[:, 5:] * c_hat).sum(1).mean()) for k in (0.05, 2)]
    assert abs(inward[0]) < 0.05 and inward[1] < -0.3


def test_chord_is_checked_and_only_for_the_mapper():
    spec = EditSpec(name="tri", target="triangle")
    EditConfig(edits=(spec,), chord=0.2).validate()
    for bad in (-0.1, math.inf, 20.0):
        with pytest.raises(ConfigError) as err:
            EditConfig(edits=(spec,), chord=bad).validate()
        assert err.value.key == "chord"
    with pytest.raises(ConfigError) as err:
        EditConfig(edits=(spec,), chord=0.2, method="global-direction").validate()
    assert err.value.key == "chord" and "mapper" in err.value.expected
    (r,) = EditConfig(edits=(spec,), chord=0.2).resolved()
    assert r.chord == 0.2 and r.mean_pull == 1.0


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
        EditSpec(name=name, target="smiling face").check()


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
        ({"mean_pull": 1.5}, "mean_pull"),
        ({"mean_pull": -0.1}, "mean_pull"),
    ],
)
def test_bad_edit_values_fail_naming_the_key(kwargs, key):
    spec = EditSpec(name="smile", **{"target": "smiling face", **kwargs})
    with pytest.raises(ConfigError) as err:
        spec.check()
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


# --- the stage over a tiny dataset --------------------------------------------------------

BAD_ROWS = (2, 9)


def make_dataset(root, n=20, rows_per_shard=8, bad=BAD_ROWS, seed=0):
    """A tiny dataset: manifest/s/clip stores from the tiny generator + tiny CLIP.

    Rows in `bad` are FAILED upstream. Returns (generator, clip).
    """
    import numpy as np

    from model.clip import load_clip
    from model.stylegan2 import create_generator
    from stages.ingest import MANIFEST_ARRAYS
    from store import ArraySpec, RowStore, Status, store_url

    G = create_generator("tiny-64", seed=0).eval()
    clip = load_clip("deltaedit-tiny", seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = G.mapping(torch.randn(n, G.w_dim, generator=g))
        s = G.w_to_s(w[:, None].expand(n, G.n_latent, G.w_dim))
        c = clip.encode_images(G.synthesize(s).clamp(-1, 1), preprocessing="deltaedit")
    status = np.full(n, int(Status.OK), dtype=np.uint8)
    status[list(bad)] = int(Status.FAILED)
    common = {"stage": "sample", "generator": G.fingerprint}
    stores = {
        "manifest": (MANIFEST_ARRAYS, {**common, "fingerprint": "m"}),
        "s": (
            {"s": ArraySpec((G.layout.dim,), "float32")},
            {**common, "fingerprint": G.fingerprint, "layout": G.layout.to_dict()},
        ),
        "clip": (
            {"embed": ArraySpec((clip.embed_dim,), "float32")},
            {**common, "fingerprint": clip.fingerprint, "model": clip.name},
        ),
    }
    data = {
        "manifest": {
            "ids": np.array([f"img-{i:03d}" for i in range(n)]),
            "source": np.array([f"src/{i}.png" for i in range(n)]),
            "sha256": np.array(["0" * 64] * n),
            "size": np.full((n, 2), 64, dtype=np.int32),
            "reason": np.array([""] * n),
        },
        "s": {"s": s.numpy()},
        "clip": {"embed": c.numpy()},
    }
    for name, (arrays, attrs) in stores.items():
        st = RowStore.create(store_url(str(root), name), n, rows_per_shard, arrays, attrs)
        for b in range(st.n_blocks):
            sl = st.block_rows(b)
            st.write_block(b, {k: v[sl] for k, v in data[name].items()}, status[sl])
    return G, clip


def make_mapper(path, layout, clip, seed=0):
    from model.mapper import DeltaMapper, save_mapper

    torch.manual_seed(seed)
    m = DeltaMapper(layout, clip.embed_dim)
    save_mapper(m, path, extra={"clip_fingerprint": clip.fingerprint})
    return m


def make_relevance(root, out, layout, embed_dim, seed=0):
    """relevance.zarr from a random fs3.npy [Dconv, E] (unit rows): fast, and it checks the
    fs3 import path; the computed methods are tested in test_relevance.py."""
    import numpy as np

    from stages.relevance import RelevanceConfig
    from stages.relevance import run as run_relevance

    d = np.random.default_rng(seed).standard_normal((layout.conv_dim, embed_dim))
    np.save(root / "fs3.npy", (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32))
    cfg = RelevanceConfig(store=str(root), out=str(out), fs3_path=str(root / "fs3.npy"))
    return run_relevance(cfg, progress=False, log=lambda _: None)


_SHARED: dict = {}


def shared_dataset(tmp_path_factory):
    """One tiny dataset (+ random mapper, fs3 relevance) per test session; read-only."""
    if "ds" not in _SHARED:
        root = tmp_path_factory.mktemp("ds")
        G, clip = make_dataset(root)
        mapper = make_mapper(root / "mapper.safetensors", G.layout, clip)
        rel = make_relevance(root, root / "relevance.zarr", G.layout, clip.embed_dim)
        _SHARED["ds"] = {"root": root, "G": G, "clip": clip, "mapper": mapper, "rel": rel}
    return _SHARED["ds"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shared_dataset(tmp_path_factory)


def edit_config(ds, tmp_path, **kw):
    from stages.edit import EditConfig

    base = {
        "store": str(ds["root"]),
        "mapper": str(ds["root"] / "mapper.safetensors"),
        "relevance": str(ds["root"] / "relevance.zarr"),
        "out_dir": str(tmp_path / "edits"),
        "dataset_kind": "faces",
    }
    return EditConfig(**(base | kw))


def test_antisymmetric_mapped_delta_cancels_the_part_that_ignores_the_direction():
    """A mapper = pull toward the mean (depends on s and c only) + a term odd in d:
    the antisymmetric form returns the odd term alone, for any s."""
    torch.manual_seed(0)
    dconv, e = LAYOUT.conv_dim, 5
    w = torch.randn(e, dconv)

    def mapper(s, cond):  # -(s - 0) pulls every row to the mean 0; cond[:, e:] @ w turns with d
        return -0.7 * s + cond[:, :e].sum(1, keepdim=True) + cond[:, e:] @ w

    s, c, d = torch.randn(4, dconv) * 3, torch.randn(4, e), torch.randn(e)
    cond = mapper_condition(c, d)
    got = mapped_delta(mapper, s, cond, mean_pull=0.0)  # antisymmetric
    assert torch.allclose(got, cond[:, e:] @ w, atol=1e-5)
    assert torch.equal(mapped_delta(mapper, s, cond), mapper(s, cond))  # plain = as is
    assert not torch.allclose(mapper(s, cond), got, atol=1e-2)
    # opposite prompts give exactly opposite edits; the plain mapper does not
    flipped = mapper_condition(c, -d)
    assert torch.allclose(mapped_delta(mapper, s, flipped, 0.0), -got, atol=1e-5)
    t = TargetDelta("a", d, 2.0, torch.ones(dconv, dtype=torch.bool), mean_pull=0.0)
    assert torch.allclose(mapper_delta(mapper, s, c, [t]), 2 * got, atol=1e-5)
    # mean_pull keeps that share of the pull: 1 is the plain output again
    even = -0.7 * s + cond[:, :e].sum(1, keepdim=True)
    part = mapped_delta(mapper, s, cond, mean_pull=0.25)
    assert torch.allclose(part, got + 0.25 * even, atol=1e-5)
    assert torch.allclose(mapped_delta(mapper, s, cond, 1.0), mapper(s, cond), atol=1e-5)
    t.mean_pull = 0.25
    assert torch.allclose(mapper_delta(mapper, s, c, [t]), 2 * part, atol=1e-5)


def test_mean_pull_needs_the_antisymmetric_form():
    spec = EditSpec(name="tri", target="triangle", mean_pull=0.25)
    EditConfig(edits=(spec,), antisymmetric=True).validate()
    with pytest.raises(ConfigError) as err:
        EditConfig(edits=(spec,), antisymmetric=False).validate()
    assert err.value.key == "edits[0].mean_pull" and "antisymmetric" in err.value.expected


def test_edit_stage_antisymmetric_matches_the_math_and_is_recorded(dataset, tmp_path):
    import numpy as np

    from stages.common import ExecutionConfig
    from stages.edit import run
    from store import RowStore, Status, store_url

    spec = EditSpec("smile", "smiling face", alpha=1.0, beta=0.0)
    ex = ExecutionConfig(device="cpu", batch_size=5)
    outs = {}
    for anti in (False, True):
        cfg = edit_config(dataset, tmp_path / str(anti), edits=(spec,))
        cfg = EditConfig(**{**cfg.__dict__, "antisymmetric": anti})
        (res,) = run(cfg, ex, clip=dataset["clip"], progress=False, log=lambda _: None)
        outs[anti] = RowStore.open(res.url)
    out = outs[True]
    assert out.attrs["antisymmetric"] is True and outs[False].attrs["antisymmetric"] is False
    assert out.attrs["fingerprint"] != outs[False].attrs["fingerprint"]
    ok = np.flatnonzero(out.status() == Status.OK)
    src = RowStore.open(store_url(str(dataset["root"]), "s"))
    c = RowStore.open(store_url(str(dataset["root"]), "clip")).read("embed")
    s = src.read("s")
    idx = dataset["G"].layout.conv_index()
    clip = dataset["clip"]
    dt = text_delta(clip.encode_text(["smiling face"])[0], clip.encode_text(["face"])[0])
    m = dataset["mapper"]
    with torch.no_grad():
        s_conv, cc = torch.as_tensor(s[ok][:, idx]), torch.as_tensor(c[ok])
        d = (m(s_conv, mapper_condition(cc, dt)) - m(s_conv, mapper_condition(cc, -dt))) / 2
    want = s[ok].copy()
    want[:, idx] += d.numpy()
    np.testing.assert_allclose(out.read("s")[ok], want, atol=1e-5)
    assert np.abs(outs[False].read("s")[ok] - want).max() > 1e-4


def test_edit_stage_chord_matches_the_math_and_is_recorded(dataset, tmp_path):
    import numpy as np

    from stages.common import ExecutionConfig
    from stages.edit import run
    from store import RowStore, Status, store_url

    spec = EditSpec("smile", "smiling face", alpha=1.0, beta=0.0)
    ex = ExecutionConfig(device="cpu", batch_size=5)
    outs = {}
    for chord, anti in ((0.0, False), (0.25, False), (0.25, True)):
        cfg = edit_config(dataset, tmp_path / f"{chord}{anti}", edits=(spec,))
        cfg = EditConfig(**{**cfg.__dict__, "chord": chord, "antisymmetric": anti})
        (res,) = run(cfg, ex, clip=dataset["clip"], progress=False, log=lambda _: None)
        outs[chord, anti] = RowStore.open(res.url)
    assert "chord" not in outs[0.0, False].attrs  # off: provenance (and fingerprint) as before
    assert outs[0.25, False].attrs["chord"] == 0.25
    fps = {o.attrs["fingerprint"] for o in outs.values()}
    assert len(fps) == 3
    ok = np.flatnonzero(outs[0.25, False].status() == Status.OK)
    s = RowStore.open(store_url(str(dataset["root"]), "s")).read("s")
    c = RowStore.open(store_url(str(dataset["root"]), "clip")).read("embed")
    idx = dataset["G"].layout.conv_index()
    clip, m = dataset["clip"], dataset["mapper"]
    dt = text_delta(clip.encode_text(["smiling face"])[0], clip.encode_text(["face"])[0])
    with torch.no_grad():
        s_conv, cc = torch.as_tensor(s[ok][:, idx]), torch.as_tensor(c[ok])
        plain = m(s_conv, mapper_condition(cc, dt, 0.25))
        anti = (plain - m(s_conv, mapper_condition(cc, -dt, 0.25))) / 2
    for key, d in (((0.25, False), plain), ((0.25, True), anti)):
        want = s[ok].copy()
        want[:, idx] += d.numpy()
        np.testing.assert_allclose(outs[key].read("s")[ok], want, atol=1e-5)
    assert np.abs(outs[0.0, False].read("s")[ok] - outs[0.25, False].read("s")[ok]).max() > 1e-4


def test_edit_stage_matches_the_math_and_skips_rows(dataset, tmp_path):
    import numpy as np

    from stages.common import ExecutionConfig
    from stages.edit import run
    from store import RowStore, Status, store_url

    spec = EditSpec("smile", "smiling face", alpha=1.5, beta=0.03, levels=("coarse", "medium"))
    cfg = edit_config(dataset, tmp_path, edits=(spec,))
    cfg.validate()
    ex = ExecutionConfig(device="cpu", batch_size=5)
    (res,) = run(cfg, ex, clip=dataset["clip"], progress=False, log=lambda _: None)
    assert res.n_edited == 20 - len(BAD_ROWS)
    out = RowStore.open(res.url)
    assert out.is_complete()
    st = out.status()
    assert set(np.flatnonzero(st == Status.SKIPPED)) == set(BAD_ROWS)
    src = RowStore.open(store_url(str(dataset["root"]), "s"))
    c = RowStore.open(store_url(str(dataset["root"]), "clip")).read("embed")
    s, s2 = src.read("s"), out.read("s")
    layout = dataset["G"].layout
    idx = layout.conv_index()
    ok = np.flatnonzero(st == Status.OK)
    # expected: s + alpha * (beta mask & level mask) * mapper(s_conv, [c^ || dt^])
    clip = dataset["clip"]
    dt = text_delta(clip.encode_text(["smiling face"])[0], clip.encode_text(["face"])[0])
    keep = beta_mask(dataset["rel"].directions, dt, 0.03) & level_mask(layout, spec.levels)
    assert 0 < int(keep.sum()) < layout.conv_dim
    with torch.no_grad():
        d = dataset["mapper"](
            torch.as_tensor(s[ok][:, idx]), mapper_condition(torch.as_tensor(c[ok]), dt)
        )
    want = s[ok].copy()
    want[:, idx] += (1.5 * d * keep).numpy()
    np.testing.assert_allclose(s2[ok], want, atol=1e-5)
    torgb = np.setdiff1d(np.arange(layout.dim), idx)
    assert np.array_equal(s2[ok][:, torgb], s[ok][:, torgb])
    assert np.abs(s2[ok][:, idx[~keep.numpy()]] - s[ok][:, idx[~keep.numpy()]]).max() == 0
    a = out.attrs
    assert a["targets"] == ["smiling face"] and a["neutral"] == "face"
    assert a["alphas"] == [1.5] and a["beta"] == 0.03 and a["levels"] == ["coarse", "medium"]
    assert a["mapper"] == dataset["mapper"].fingerprint and a["clip"] == clip.fingerprint
    assert a["relevance"] == dataset["rel"].attrs["fingerprint"]
    assert a["source"].endswith("s.zarr")


def test_edit_selection_sweep_and_multi_target(dataset, tmp_path):
    import numpy as np

    from stages.common import ExecutionConfig
    from stages.edit import Selection, run
    from store import RowStore, Status

    one = EditSpec("a", "red", beta=0.0, alphas=(0.5, 2.0))
    two = EditSpec("b", ("red", "round"), alpha=(1.0, -1.0), beta=0.0)
    single_round = EditSpec("c", "round", alpha=-1.0, beta=0.0)
    cfg = edit_config(
        dataset, tmp_path, edits=(one, two, single_round), select=Selection(range=(4, 12))
    )
    cfg.validate()
    res = run(
        cfg, ExecutionConfig(device="cpu"), clip=dataset["clip"], progress=False, log=lambda _: None
    )
    assert [r.name for r in res] == ["a_a0.5", "a_a2", "b", "c"]
    stores = {r.name: RowStore.open(r.url) for r in res}
    edited = np.flatnonzero(stores["a_a2"].status() == Status.OK)
    assert edited.tolist() == [r for r in range(4, 12) if r not in BAD_ROWS]
    src = RowStore.open(f"{dataset['root']}/s.zarr").read("s")
    d05 = stores["a_a0.5"].read("s")[edited] - src[edited]
    d2 = stores["a_a2"].read("s")[edited] - src[edited]
    np.testing.assert_allclose(d2, 4 * d05, atol=1e-5)
    # two targets compose: delta(red, +1) + delta(round, -1)
    d_b = stores["b"].read("s")[edited] - src[edited]
    d_c = stores["c"].read("s")[edited] - src[edited]
    d_red = d05 * 2
    np.testing.assert_allclose(d_b, d_red + d_c, atol=1e-5)
    assert stores["a_a2"].attrs["sweep"] == 2.0


def test_global_direction_needs_no_mapper(dataset, tmp_path):
    import numpy as np

    from stages.common import ExecutionConfig
    from stages.edit import run
    from store import RowStore

    cfg = edit_config(
        dataset,
        tmp_path,
        method="global-direction",
        mapper="missing.safetensors",
        edits=(EditSpec("gd", "smiling face", alpha=3.0, beta=0.05),),
    )
    (res,) = run(
        cfg, ExecutionConfig(device="cpu"), clip=dataset["clip"], progress=False, log=lambda _: None
    )
    out = RowStore.open(res.url)
    ok = out.ok_rows()
    delta = out.read("s")[ok] - RowStore.open(f"{dataset['root']}/s.zarr").read("s")[ok]
    # one direction for every row, at most alpha std on the most relevant channel
    np.testing.assert_allclose(delta, np.broadcast_to(delta[0], delta.shape), atol=1e-5)
    std = dataset["rel"].s_std
    ratio = np.abs(delta[0]) / np.maximum(std, 1e-12)
    assert ratio.max() == pytest.approx(3.0, rel=1e-4)


def test_edit_never_builds_an_image_encoder_or_decodes_an_image(dataset, tmp_path, monkeypatch):
    import PIL.Image

    import model.clip
    import model.e4e
    from stages.common import ExecutionConfig
    from stages.edit import run

    def boom(*a, **k):
        raise AssertionError("the edit stage must not encode or decode images")

    monkeypatch.setattr(model.e4e, "load_e4e", boom)
    monkeypatch.setattr(model.e4e, "create_e4e", boom)
    monkeypatch.setattr(model.clip.ClipModel, "encode_images", boom)
    monkeypatch.setattr(model.clip.ClipModel, "encode_pil", boom)
    monkeypatch.setattr(PIL.Image, "open", boom)
    cfg = edit_config(dataset, tmp_path, edits=(EditSpec("x", "smiling face"),))
    (res,) = run(cfg, ExecutionConfig(device="cpu"), progress=False, log=lambda _: None)
    assert res.n_edited == 20 - len(BAD_ROWS)


def test_mapper_of_another_layout_or_clip_is_refused_before_work(dataset, tmp_path):
    from model.layout import SLayout
    from stages.common import ExecutionConfig
    from stages.edit import EditError, run

    other = SLayout.from_channels(32, {4: 8, 8: 8, 16: 8, 32: 8})
    clip = dataset["clip"]
    make_mapper(tmp_path / "other.safetensors", other, clip)
    cfg = edit_config(
        dataset,
        tmp_path,
        mapper=str(tmp_path / "other.safetensors"),
        edits=(EditSpec("x", "smiling face"),),
    )
    with pytest.raises(EditError, match="another S layout"):
        run(cfg, ExecutionConfig(device="cpu"), clip=clip, progress=False)
    from model.mapper import DeltaMapper, save_mapper

    layout = dataset["G"].layout
    save_mapper(
        DeltaMapper(layout, clip.embed_dim),
        tmp_path / "clipx.safetensors",
        extra={"clip_fingerprint": "f" * 64},
    )
    save_mapper(DeltaMapper(layout, 2 * clip.embed_dim), tmp_path / "e.safetensors")
    for name, message in (
        ("clipx", "trained with CLIP"),
        ("e", "CLIP embeddings of size 128"),
    ):
        cfg = edit_config(
            dataset,
            tmp_path,
            mapper=str(tmp_path / f"{name}.safetensors"),
            edits=(EditSpec("x", "smiling face"),),
        )
        with pytest.raises(EditError, match=message):
            run(cfg, ExecutionConfig(device="cpu"), clip=clip, progress=False)
    assert not (tmp_path / "edits").exists()


# --- CLI ------------------------------------------------------------------------------


def cli(*args):
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, list(args))


def cli_base(ds, tmp_path):
    return [
        "--params",
        os.devnull,
        "--set",
        f"edit.store={ds['root']}",
        "--set",
        f"edit.mapper={ds['root'] / 'mapper.safetensors'}",
        "--set",
        f"edit.relevance={ds['root'] / 'relevance.zarr'}",
        "--set",
        f"edit.out_dir={tmp_path / 'edits'}",
        "--set",
        "execution.device=cpu",
        "-q",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", ""], "a non-empty prompt"),
        (["--target", "x", "--name", "../x"], "edit.edits[0].name: got '../x'"),
        (["--target", "x", "--name", "/abs"], "no path separators"),
        (["--target", "x", "--name", "a/b"], "no path separators"),
        (["--target", "x", "--alpha", "inf"], "edit.edits[0].alpha: got inf"),
        (["--target", "x", "--alpha", "12"], "[-10, 10]"),
        (
            ["--target", "x", "--beta", "1"],
            "edit.edits[0].beta: got 1.0, expected a number in [0, 1)",
        ),
        (["--target", "x", "--alpha", "abc"], "--alpha: got 'abc'"),
        (["--target", "x", "--levels", "coarse,top"], "subset of coarse, medium, fine"),
        (["--beta", "0.1"], "give --target too"),
        (["--target", "x", "--mean-pull", "0.5"], "edit.edits[0].mean_pull: got 0.5"),
        ([], "no edits"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_work(dataset, tmp_path, args, message):
    r = cli("edit", *cli_base(dataset, tmp_path), *args)
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "edits").exists()


def test_cli_edit_from_the_command_line_and_long_prompt_warning(dataset, tmp_path):
    from store import RowStore

    long = "a smiling face " * 30
    r = cli(
        "edit",
        *cli_base(dataset, tmp_path),
        "--target",
        long,
        "--name",
        "smile",
        "--alpha",
        "0.5",
        "--beta",
        "0.03",
        "--levels",
        "coarse,fine",
        "--sample",
        "5",
        "--antisymmetric",
        "--mean-pull",
        "0.25",
    )
    assert r.exit_code == 0, r.output
    assert "truncated" in r.output and "context" in r.output
    out = RowStore.open(str(tmp_path / "edits" / "smile.zarr"))
    assert len(out.ok_rows()) == 5
    a = out.attrs
    assert a["neutral"] == "shape" and a["alphas"] == [0.5] and a["levels"] == ["coarse", "fine"]
    assert a["antisymmetric"] is True and a["mean_pull"] == 0.25
    assert "wrote" in r.output and "5 rows edited" in r.output


def test_cli_mapper_mismatch_is_one_line(dataset, tmp_path):
    from model.layout import SLayout

    make_mapper(tmp_path / "m.safetensors", SLayout.from_channels(8, {4: 4, 8: 4}), dataset["clip"])
    r = cli(
        "edit",
        *cli_base(dataset, tmp_path),
        "--set",
        f"edit.mapper={tmp_path / 'm.safetensors'}",
        "--target",
        "smiling face",
    )
    assert r.exit_code != 0 and "another S layout" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "edits").exists()


def test_select_rows_by_ids_range_and_sample():
    import numpy as np

    from stages.edit import EditError, Selection, select_rows

    ok = np.array([0, 1, 3, 4, 5, 7])
    ids = np.array([f"img-{i}" for i in range(8)])
    assert select_rows(Selection(), ok, 8, ids).tolist() == ok.tolist()
    assert select_rows(Selection(ids=("img-7", "img-2", "img-0")), ok, 8, ids).tolist() == [0, 7]
    assert select_rows(Selection(range=(2, 6)), ok, 8, ids).tolist() == [3, 4, 5]
    a = select_rows(Selection(sample=3, seed=1), ok, 8, ids)
    assert len(a) == 3 and set(a) <= set(ok)
    assert np.array_equal(a, select_rows(Selection(sample=3, seed=1), ok, 8, ids))
    with pytest.raises(EditError, match="unknown ids"):
        select_rows(Selection(ids=("nope",)), ok, 8, ids)
    with pytest.raises(ConfigError, match="at most one"):
        Selection(ids=("a",), sample=2).validate()


def test_edit_removed_from_the_list_is_pruned_and_nothing_else(dataset, tmp_path):
    """A persisted out_dir (dvc persist) ends as a from-scratch run leaves it: the store of
    an edit no longer listed goes; a user's files, another stage's store, a copy of an edit
    under another name and a one-off `--target` edit stay."""
    import shutil
    from dataclasses import replace

    from stages.common import ExecutionConfig
    from stages.edit import Selection, run

    ex = ExecutionConfig(device="cpu", batch_size=4)
    smile = EditSpec("smile", "smiling face", alpha=1.0, beta=0.0)
    frown = EditSpec("frown", "frowning face", alpha=1.0, beta=0.0)
    cfg = edit_config(dataset, tmp_path, edits=(smile, frown), select=Selection(range=(0, 8)))
    run(cfg, ex, clip=dataset["clip"], progress=False, log=lambda _: None)
    edits = tmp_path / "edits"
    (edits / "notes.txt").write_text("mine")
    shutil.copytree(dataset["root"] / "s.zarr", edits / "mine.zarr")  # stage encode-s
    shutil.copytree(edits / "frown.zarr", edits / "frown_backup.zarr")  # records name frown
    (edits / "frown.zarr.compute").mkdir()  # not a store: no attrs, not ours
    r = cli(
        "edit", *cli_base(dataset, tmp_path), "--target", "a face", "--name", "x", "--range", "0:4"
    )
    assert r.exit_code == 0, r.output
    assert (edits / "frown.zarr").exists() and (edits / "smile.zarr").exists()  # kept
    lines: list[str] = []
    run(replace(cfg, edits=(smile,)), ex, clip=dataset["clip"], progress=False, log=lines.append)
    assert f"edit: removed {edits / 'frown.zarr'} (no longer in edit.edits)" in lines
    assert f"edit: removed {edits / 'x.zarr'} (no longer in edit.edits)" in lines
    assert "edit smile: rows reused 7, computed 0, dropped 0" in lines  # untouched
    left = sorted(p.name for p in edits.iterdir())
    assert left == [
        "frown.zarr.compute",
        "frown_backup.zarr",
        "mine.zarr",
        "notes.txt",
        "smile.zarr",
    ]
