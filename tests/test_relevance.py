"""Relevance stage: finite-difference and jacobian directions, the store, fs3 import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_edit import shared_dataset

from pipeline.cli import main
from stages.common import ExecutionConfig
from stages.relevance import (
    RelevanceConfig,
    RelevanceError,
    agreement,
    finite_difference_directions,
    jacobian_directions,
    read_relevance,
    run,
)
from store import RowStore, Status


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shared_dataset(tmp_path_factory)


def stats(ds):
    s = RowStore.open(f"{ds['root']}/s.zarr")
    x = s.read("s", rows=s.ok_rows())
    return x, torch.as_tensor(x.mean(0)), torch.as_tensor(x.std(0))


def test_finite_difference_and_jacobian_agree(dataset):
    G, clip = dataset["G"], dataset["clip"]
    x, mean, std = stats(dataset)
    base = torch.as_tensor(x[:1])
    conv = G.layout.conv_index()
    chans = conv[np.linspace(0, len(conv) - 1, 8).astype(int)]
    with torch.no_grad():
        fd = finite_difference_directions(G, clip, base, chans, mean, std, 5.0, 16)
    jac = jacobian_directions(G, clip, base, chans, mean, std, 8)
    assert fd.shape == jac.shape == (8, clip.embed_dim)
    assert torch.allclose(fd.norm(dim=1), torch.ones(8), atol=1e-5)
    a = agreement(fd, jac)
    assert a["median"] > 0.7, a
    # a smaller step moves the finite difference towards the derivative
    with torch.no_grad():
        fd_small = finite_difference_directions(G, clip, base, chans, mean, std, 0.05, 16)
    assert agreement(fd_small, jac)["median"] > 0.99
    # batching many channels per forward gives the same answer as one at a time
    with torch.no_grad():
        one = finite_difference_directions(G, clip, base, chans[:3], mean, std, 5.0, 2)
    assert torch.allclose(one, fd[:3], atol=1e-4)


def test_stage_writes_directions_and_statistics(dataset, tmp_path):
    out = tmp_path / "relevance.zarr"
    cfg = RelevanceConfig(
        store=str(dataset["root"]), out=str(out), n_images=1, channels_per_block=100
    )
    lines = []
    rel = run(
        cfg,
        execution=ExecutionConfig(device="cpu", batch_size=64),
        progress=False,
        log=lines.append,
    )
    layout = dataset["G"].layout
    assert rel.directions.shape == (layout.conv_dim, dataset["clip"].embed_dim)
    assert torch.allclose(rel.directions.norm(dim=1), torch.ones(layout.conv_dim), atol=1e-5)
    x, mean, std = stats(dataset)
    np.testing.assert_allclose(rel.s_mean, mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rel.s_std, x.std(0), rtol=1e-3, atol=1e-5)
    st = RowStore.open(str(out))
    status = st.status()
    conv = np.zeros(layout.dim, dtype=bool)
    conv[layout.conv_index()] = True
    assert (status[conv] == Status.OK).all() and (status[~conv] == Status.SKIPPED).all()
    assert np.abs(st.read("directions")[~conv]).max() == 0
    a = rel.attrs
    assert a["method"] == "finite-difference" and a["n_images"] == 1
    assert a["generator"] == dataset["G"].fingerprint and a["clip"] == dataset["clip"].fingerprint
    assert "rows" in lines[-1]  # summary line
    # a rerun resumes: nothing left to do, same result
    again = run(cfg, execution=ExecutionConfig(device="cpu"), progress=False, log=lines.append)
    assert "0 rows in 0 blocks" in lines[-1]
    assert torch.equal(again.directions, rel.directions)


def test_fs3_import_checks_shape_and_content(dataset, tmp_path):
    layout, e = dataset["G"].layout, dataset["clip"].embed_dim
    root = str(dataset["root"])

    def imp(arr, name="fs3.npy", **kw):
        p = tmp_path / name
        np.save(p, arr, **kw)
        cfg = RelevanceConfig(store=root, out=str(tmp_path / "r.zarr"), fs3_path=str(p))
        return run(cfg, progress=False, log=lambda _: None)

    good = np.random.default_rng(0).standard_normal((layout.conv_dim, e)).astype(np.float32)
    rel = imp(good)
    assert torch.equal(rel.directions, torch.as_tensor(good))
    assert rel.attrs["method"] == "official-fs3"
    with pytest.raises(RelevanceError, match=r"expected \[Dconv, E\] with Dconv = 240"):
        imp(np.zeros((6048, 512), np.float32), "big.npy")
    with pytest.raises(RelevanceError, match="NaN"):
        imp(np.full((layout.conv_dim, e), np.nan, np.float32), "nan.npy")
    with pytest.raises(RelevanceError, match="not a plain .npy"):
        imp(np.array([{"a": 1}], dtype=object), "obj.npy", allow_pickle=True)
    assert read_relevance(str(tmp_path / "r.zarr")).attrs["method"] == "official-fs3"


def test_cli_relevance_errors_are_one_line(dataset, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "relevance",
            "--store",
            str(dataset["root"]),
            "--out",
            str(tmp_path / "r.zarr"),
            "--fs3",
            "nope.npy",
        ],
    )
    assert r.exit_code != 0 and "nope.npy: no such file" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["relevance", "--set", "relevance.n_images=0"])
    assert r.exit_code != 0 and "relevance.n_images: got 0" in r.output
