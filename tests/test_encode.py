"""encode-clip and encode-s over an ingested folder; the block runner; distributed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from model.clip import load_clip
from model.e4e import create_e4e
from model.stylegan2 import create_generator
from pipeline.cli import main
from stages import execution
from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef
from stages.encode_clip import EncodeClipConfig, run_encode_clip
from stages.encode_s import EncodeSConfig, EncodeSError, run_encode_s, to_input
from stages.execution import BlockReport, cached, prefetch_map, run_blocks
from stages.ingest import IngestConfig, run_ingest
from store import FingerprintMismatch, RowStore, Status

EXEC = ExecutionConfig(workers=2, batch_size=4)


def make_dataset(tmp_path: Path, n_good: int = 9, rows_per_shard: int = 4) -> Path:
    """A small ingested folder: good images of several modes/sizes plus broken files."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_good):
        arr = rng.integers(0, 255, (24 + 4 * i, 32, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if i % 3 == 1:
            img = img.convert("L")
        img.save(src / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(
        src / "cmyk.jpg"
    )
    (src / "broken.png").write_bytes(b"nope")
    ds = tmp_path / "ds"
    cfg = IngestConfig(source=str(src), out=str(ds), rows_per_shard=rows_per_shard)
    run_ingest(cfg, EXEC, progress=False)
    return ds


def test_encode_clip_embeds_ok_rows_and_skips_the_rest(tmp_path):
    ds = make_dataset(tmp_path)
    ref = ClipRef()
    result = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ref, EXEC, progress=False)
    manifest = RowStore.open(str(ds / "manifest.zarr"))
    out = RowStore.open(result.out, require_complete=True)
    up = manifest.status()
    st = out.status()
    assert ((up == Status.OK) == (st == Status.OK)).all()
    assert (st[up != Status.OK] == Status.SKIPPED).all()
    assert "SKIPPED 1" in result.summary.line()
    clip = load_clip(ref.name, seed=ref.seed)
    assert out.attrs["fingerprint"] == clip.fingerprint
    assert out.attrs["preprocessing"] == "deltaedit" and out.attrs["normalized"] is False
    embed = out.read("embed")
    sources = manifest.read("source").tolist()
    for row in (sources.index("cmyk.jpg"), sources.index("img01.png")):
        img = Image.open(ds.parent / "src" / sources[row])
        expect = clip.encode_pil([img.convert("RGB")], "deltaedit")[0].numpy()
        np.testing.assert_allclose(embed[row], expect, rtol=1e-4, atol=1e-5)
    assert np.abs(embed[up == Status.OK]).sum(1).min() > 0


def test_a_file_broken_after_ingest_is_unreadable_at_encode_time(tmp_path):
    ds = make_dataset(tmp_path)
    (ds.parent / "src" / "img03.png").write_bytes(b"garbage now")
    result = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False)
    out = RowStore.open(result.out)
    row = RowStore.open(str(ds / "manifest.zarr")).read("source").tolist().index("img03.png")
    assert out.status()[row] == Status.UNREADABLE
    assert any("img03.png" in ln for ln in result.summary.details())


def test_encode_clip_resume_refuses_another_model(tmp_path):
    ds = make_dataset(tmp_path)
    run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False)
    again = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False)
    assert again.summary.blocks_run == 0
    with pytest.raises(FingerprintMismatch):
        run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(seed=1), EXEC, progress=False)


def test_encode_s_inverts_with_e4e_and_maps_to_s(tmp_path):
    ds = make_dataset(tmp_path)
    cfg = EncodeSConfig(dataset=str(ds), keep_wplus=True)
    result = run_encode_s(cfg, GeneratorRef(), E4ERef(), EXEC, progress=False)
    out = RowStore.open(result.out, require_complete=True)
    G = create_generator("tiny-64", seed=0)
    enc = create_e4e("tiny", seed=0)
    assert out.attrs["layout"] == G.layout.to_dict()
    assert out.attrs["generator"] == G.fingerprint and out.attrs["e4e"] == enc.fingerprint
    sources = RowStore.open(str(ds / "manifest.zarr")).read("source").tolist()
    row = sources.index("img02.jpg")
    img = Image.open(ds.parent / "src" / "img02.jpg").convert("RGB")
    with torch.no_grad():
        wplus = enc(to_input(img, enc.input_size)[None])
        s = G.w_to_s(wplus)
    np.testing.assert_allclose(out.read("wplus")[row], wplus[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.read("s")[row], s[0].numpy(), rtol=1e-4, atol=1e-5)
    assert out.read("s").shape == (len(sources), G.layout.dim)
    assert out.status()[sources.index("broken.png")] == Status.SKIPPED


def test_encode_s_refined_inversion_reconstructs_closer_and_rows_are_batch_independent(tmp_path):
    """encode_s.refine_steps: e4e's W+ refined on the image loss (model/inversion.py). The
    stored S reconstructs its image better than e4e alone; a row's result does not depend
    on the other images in its batch; the refinement is part of the store's fingerprint."""
    from model.inversion import refine_wplus

    ds = make_dataset(tmp_path)
    plain = run_encode_s(
        EncodeSConfig(dataset=str(ds)), GeneratorRef(), E4ERef(), EXEC, progress=False
    )
    s_plain = RowStore.open(plain.out).read("s")
    fp_plain = RowStore.open(plain.out).attrs["fingerprint"]
    cfg = EncodeSConfig(dataset=str(ds), refine_steps=8, refine_lr=0.05)
    refined = run_encode_s(cfg, GeneratorRef(), E4ERef(), EXEC, overwrite=True, progress=False)
    out = RowStore.open(refined.out, require_complete=True)
    assert out.attrs["fingerprint"] != fp_plain
    G = create_generator("tiny-64", seed=0)
    enc = create_e4e("tiny", seed=0)
    sources = RowStore.open(str(ds / "manifest.zarr")).read("source").tolist()
    ok = [i for i, st in enumerate(out.status()) if st == Status.OK]
    x = torch.stack([to_input(Image.open(ds.parent / "src" / sources[i]), enc.input_size)
                     for i in ok])  # fmt: skip

    def err(s: np.ndarray) -> float:
        with torch.no_grad():
            img = G.synthesize(torch.from_numpy(s[ok]))
            img = torch.nn.functional.interpolate(img, size=x.shape[-2:], mode="area")
        return float((img - x).square().mean())

    assert err(out.read("s")) < 0.9 * err(s_plain)
    # row 0 alone in a batch of 4 copies of itself gives what the pass stored for it
    with torch.no_grad():
        w0 = enc(x[:1].expand(EXEC.batch_size, -1, -1, -1))
    alone = G.w_to_s(refine_wplus(G, x[:1].expand(EXEC.batch_size, -1, -1, -1), w0, 8, 0.05))
    np.testing.assert_allclose(out.read("s")[ok[0]], alone[0].detach().numpy(), atol=1e-4)
    with pytest.raises(FingerprintMismatch):  # a resume with other refine settings is refused
        run_encode_s(EncodeSConfig(dataset=str(ds)), GeneratorRef(), E4ERef(), EXEC, progress=False)


def test_encode_s_refuses_an_e4e_of_another_generator(tmp_path):
    ds = make_dataset(tmp_path)
    with pytest.raises(EncodeSError, match="W\\+"):
        run_encode_s(
            EncodeSConfig(dataset=str(ds)), GeneratorRef(), E4ERef(config="world-32"), EXEC, False
        )


def test_encode_cli_commands(tmp_path):
    ds = make_dataset(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["encode-clip", "--dataset", str(ds), "-q", "--params", os.devnull])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("encode-clip: 11 rows") and "SKIPPED 1" in res.output
    res = runner.invoke(
        main, ["encode-s", "--dataset", str(ds), "-q", "--set", "encode_s.keep_wplus=true"]
    )
    assert res.exit_code == 0, res.output
    assert "wplus" in RowStore.open(str(ds / "s.zarr")).array_names
    res = runner.invoke(main, ["encode-clip", "--dataset", str(tmp_path / "none")])
    assert res.exit_code != 0 and "no store there" in res.output
    res = runner.invoke(main, ["encode-s", "--dataset", str(ds), "--set", "execution.workers=0"])
    assert res.exit_code != 0 and "execution.workers" in res.output


# --- the block runner -------------------------------------------------------------------------


class _Task:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, block: int) -> BlockReport:
        with self.lock:
            self.seen.append(block)
        return BlockReport(block, 3, {"OK": 2, "SKIPPED": 1}, (f"row of {block}",))


def test_run_blocks_runs_each_pending_block_once_and_sums():
    task = _Task()
    summary = run_blocks(task, [0, 2, 5], ExecutionConfig(workers=3), "t", 7, progress=False)
    assert sorted(task.seen) == [0, 2, 5]
    assert summary.rows == 9 and summary.ok == 6 and summary.counts["SKIPPED"] == 3
    assert "4 blocks already done" in summary.line() and "SKIPPED 3" in summary.line()
    assert len(summary.details()) == 3


def test_run_blocks_on_a_distributed_cluster_matches_local(tmp_path):
    distributed = pytest.importorskip("distributed")
    ds = make_dataset(tmp_path, n_good=6, rows_per_shard=3)
    local = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False)
    expect = RowStore.open(local.out).read("embed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        ex = ExecutionConfig(scheduler_address=cluster.scheduler_address, batch_size=4)
        dist = run_encode_clip(
            EncodeClipConfig(dataset=str(ds)), ClipRef(), ex, overwrite=True, progress=False
        )
    assert dist.summary.blocks_run == RowStore.open(dist.out).n_blocks
    assert np.array_equal(RowStore.open(dist.out).read("embed"), expect)


def test_models_load_once_per_process():
    calls = []
    key = ("test-model", object())
    for _ in range(3):
        assert cached(key, lambda: calls.append(1) or "model") == "model"
    assert calls == [1]
    g1 = execution.load_generator_ref(GeneratorRef(), "cpu")
    assert execution.load_generator_ref(GeneratorRef(), "cpu") is g1


def test_prefetch_map_keeps_order_and_bounds_lookahead():
    started: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    out = []
    for k, v in enumerate(prefetch_map(load, list(range(20)), threads=2, ahead=3)):
        with lock:
            assert max(started) <= k + 3  # never more than `ahead` items in front
        out.append(v)
    assert out == [i * i for i in range(20)]
    assert list(prefetch_map(load, [1, 2], threads=0, ahead=1)) == [1, 4]


def test_encode_clip_with_standard_clip_preprocessing_matches_the_model(tmp_path):
    ds = make_dataset(tmp_path)
    ref = ClipRef(preprocessing="clip")
    result = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ref, EXEC, progress=False)
    out = RowStore.open(result.out)
    assert out.attrs["preprocessing"] == "clip"
    clip = load_clip(ref.name, seed=ref.seed)
    sources = RowStore.open(str(ds / "manifest.zarr")).read("source").tolist()
    for name in ("img05.png", "img06.jpg", "cmyk.jpg"):  # non-square, gray, CMYK
        img = Image.open(ds.parent / "src" / name).convert("RGB")
        expect = clip.encode_pil([img], "clip")[0].numpy()
        got = out.read("embed")[sources.index(name)]
        np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (300, 177), (50, 400)])
def test_deltaedit_pool_matches_upsample_then_average_pool(shape):
    import torch.nn.functional as F

    from stages.encode_clip import deltaedit_pool

    a = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), 48)
    np.testing.assert_allclose(deltaedit_pool(a, 48), ref[0].permute(1, 2, 0).numpy(), atol=1e-5)
