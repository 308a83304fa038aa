"""S codes and edits stored as float16 / bfloat16: recorded, followed by every reader, never
mixed with float32 rows, and close enough to render (the PSNR bounds from BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.common import E4ERef, ExecutionConfig, GeneratorRef
from stages.config import ConfigError
from stages.encode_s import EncodeSConfig, run_encode_s
from store import ArraySpec, FingerprintMismatch, RowStore, StoreError
from store.inspect import describe, verify_store
from store.rowstore import decode_values, encode_values
from store.sampler import PairSampler, SamplerSource
from store.update import ReuseRefused

EXEC = ExecutionConfig(workers=1, batch_size=4, device="cpu")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two images in [-1, 1]."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials():
    x = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, -np.inf, np.nan, 3.4e38, 1e-40],
        dtype=np.float32,
    )
    y = decode_values(encode_values(x, "bfloat16"), "bfloat16")
    assert y.dtype == np.float32
    # 1 + 2^-8 is half-way between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    assert y[:4].tolist() == [1.0, 1.0, 1 + 2**-6, -2.5]
    assert y[4] == np.inf and y[5] == -np.inf and np.isnan(y[6])
    assert y[7] == np.inf  # above the largest bfloat16: overflows as float32 -> bf16 does
    assert abs(y[8] - 1e-40) < 1e-41


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_store_records_the_dtype_and_every_reader_gets_float32(tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 24)).astype(np.float32)
    c = rng.standard_normal((10, 8)).astype(np.float32)
    s = RowStore.create(str(tmp_path / "s.zarr"), 10, 4, {"s": ArraySpec((24,), dtype)}, {})
    cs = RowStore.create(str(tmp_path / "c.zarr"), 10, 4, {"e": ArraySpec((8,), "float32")}, {})
    for b in range(s.n_blocks):
        sl = s.block_rows(b)
        s.write_block(b, {"s": x[sl]}, np.ones(sl.stop - sl.start, np.uint8))
        cs.write_block(b, {"e": c[sl]}, np.ones(sl.stop - sl.start, np.uint8))
    s = RowStore.open(str(tmp_path / "s.zarr"))
    assert s.specs["s"].dtype == dtype and describe(s)["arrays"]["s"]["dtype"] == dtype
    assert s.array("s").dtype.itemsize == 2  # half the bytes on disk
    got = s.read("s")
    assert got.dtype == np.float32 and 0 < np.abs(got - x).max() <= tol * np.abs(x).max()
    np.testing.assert_array_equal(s.read("s", rows=np.array([7, 1])), got[[7, 1]])
    block = np.empty((4, 24), np.float32)
    s.read_block_into("s", 1, block)
    np.testing.assert_array_equal(block, got[4:8])
    assert verify_store(s) == []
    for mode in ("memory", "sharded"):  # the train sampler sees the same float32 values
        sampler = PairSampler(
            [SamplerSource(s, "s", cs, "e")], 6, seed=0, memory_budget=1 << 30, force_mode=mode
        )
        batch = sampler.next_batch(return_index=True)
        _, rows = sampler.global_row(batch["i"])
        np.testing.assert_array_equal(batch["s_i"], got[rows])
        sampler.close()


def test_a_dtype_the_store_cannot_hold_is_one_line(tmp_path):
    with pytest.raises(StoreError, match="float8.*float32, float16, bfloat16") as exc:
        RowStore.create(str(tmp_path / "x.zarr"), 4, 4, {"s": ArraySpec((3,), "float8")}, {})
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(ConfigError, match="dtype: got 'half'.*float32 | float16 | bfloat16"):
        EncodeSConfig(dtype="half").validate()


def test_encode_s_half_stores_are_close_recorded_and_never_mixed(tmp_path):
    from test_encode import make_dataset

    ds = make_dataset(tmp_path, n_good=5)
    full = RowStore.open(run_encode_s(EncodeSConfig(dataset=str(ds)), *_models(), EXEC, False).out)
    s32, ok = full.read("s"), full.ok_rows()
    fp32 = full.fingerprint
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1.6e-2)):
        half_ds = tmp_path / dtype
        import shutil

        shutil.copytree(ds / "manifest.zarr", half_ds / "manifest.zarr")
        cfg = EncodeSConfig(dataset=str(half_ds), dtype=dtype)
        out = RowStore.open(run_encode_s(cfg, *_models(), EXEC, progress=False).out)
        assert out.specs["s"].dtype == dtype and out.fingerprint != fp32
        err = np.abs(out.read("s")[ok] - s32[ok]).max()
        assert 0 < err <= tol * np.abs(s32[ok]).max()
        # a later pass with another dtype refuses to mix rows into the store...
        with pytest.raises(FingerprintMismatch):
            run_encode_s(EncodeSConfig(dataset=str(half_ds)), *_models(), EXEC, progress=False)
        # ...and so does --reuse of a store of another dtype
        with pytest.raises(ReuseRefused, match="float32"):
            run_encode_s(cfg, *_models(), EXEC, progress=False, reuse=[str(ds)], overwrite=True)


def _models() -> tuple[GeneratorRef, E4ERef]:
    return GeneratorRef(), E4ERef()


def test_half_edits_render_within_the_measured_psnr(tmp_path_factory, tmp_path):
    from test_edit import edit_config, shared_dataset

    from stages.edit import EditSpec, Selection
    from stages.edit import run as run_edit

    ds = shared_dataset(tmp_path_factory)
    spec = EditSpec("smile", "smiling face", alpha=2.0, beta=0.0)
    rows = np.array([0, 1, 3, 4])
    renders, stores = {}, {}
    for dtype in ("float32", "float16", "bfloat16"):
        cfg = edit_config(ds, tmp_path / dtype, edits=(spec,), select=Selection(range=(0, 5)))
        cfg = type(cfg)(**{**cfg.__dict__, "dtype": dtype})
        run_edit(cfg, EXEC, clip=ds["clip"], progress=False, log=lambda _: None)
        st = RowStore.open(str(tmp_path / dtype / "edits" / "smile.zarr"))
        stores[dtype] = st
        with torch.no_grad():
            renders[dtype] = ds["G"].synthesize(torch.as_tensor(st.read("s", rows=rows))).numpy()
    assert stores["bfloat16"].attrs["dtype"] == "bfloat16"
    assert len({st.fingerprint for st in stores.values()}) == 3
    # measured (BENCHMARKS.md): float16 75.6 dB, bfloat16 56.9 dB on these renders
    p16 = psnr(renders["float16"], renders["float32"])
    pbf = psnr(renders["bfloat16"], renders["float32"])
    assert 70 < p16 < float("inf") and 50 < pbf < p16
    # the render stage reads the bfloat16 edit as float32 and renders exactly that
    from PIL import Image
    from test_render import render_config

    from stages.render import run as run_render
    from stages.render import to_uint8

    out = tmp_path / "render"
    cfg = render_config(ds, tmp_path / "bfloat16" / "edits", out, originals=False)
    run_render(cfg, execution=EXEC, generator=ds["G"], progress=False, log=lambda _: None)
    got = np.asarray(Image.open(out / "smile" / "00000001.png"))
    assert np.array_equal(got, to_uint8(renders["bfloat16"][1:2])[0])
    # rerunning the edit with another dtype starts that edit over: no rows of two dtypes
    cfg = edit_config(ds, tmp_path / "float16", edits=(spec,), select=Selection(range=(0, 5)))
    run_edit(cfg, EXEC, clip=ds["clip"], progress=False, log=lambda _: None)
    redone = RowStore.open(str(tmp_path / "float16" / "edits" / "smile.zarr"))
    assert redone.specs["s"].dtype == "float32"
    np.testing.assert_array_equal(redone.read("s"), stores["float32"].read("s"))


# --- stores at scale: bad input refused before any work ----------------------------------


def test_rows_the_disk_cannot_hold_are_refused_naming_the_size(tmp_path):
    from store import StorageError
    from store.fs import require_free_space
    from store.rowstore import store_nbytes

    specs = {"s": ArraySpec((9088,), "float16")}
    assert store_nbytes(1000, specs) == 1000 * (9088 * 2 + 1)
    need = store_nbytes(10**12, specs)  # a trillion rows: 18 PB
    with pytest.raises(StorageError, match=r"needs 18\d{6}\.\d GB.*GB free; nothing was written"):
        require_free_space(str(tmp_path / "not-yet" / "s.zarr"), need, "a 10^12-row store")
    require_free_space(str(tmp_path / "s.zarr"), store_nbytes(1000, specs), "a small store")
    assert list(tmp_path.iterdir()) == []


def test_a_budget_below_one_shard_names_the_minimum(tmp_path):
    from store.sampler import load_overhead, min_sharded_budget

    rng = np.random.default_rng(0)
    s = RowStore.create(str(tmp_path / "s.zarr"), 64, 16, {"s": ArraySpec((40,), "float16")}, {})
    c = RowStore.create(str(tmp_path / "c.zarr"), 64, 16, {"e": ArraySpec((8,), "float32")}, {})
    for b in range(4):
        s.write_block(b, {"s": rng.standard_normal((16, 40))}, np.ones(16, np.uint8))
        c.write_block(b, {"e": rng.standard_normal((16, 8))}, np.ones(16, np.uint8))
    need = min_sharded_budget(16, 40, 8, load_overhead(16, 40, 8))
    src = [SamplerSource(s, "s", c, "e")]
    with pytest.raises(StoreError, match=f"at least {need} B") as exc:
        PairSampler(src, 4, seed=0, memory_budget=need - 1, force_mode="sharded")
    assert "\n" not in str(exc.value)
    PairSampler(src, 4, seed=0, memory_budget=need, force_mode="sharded").close()


def test_sample_stores_its_s_as_configured_and_the_cli_refuses_a_bad_dtype(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main
    from stages.common import ClipRef
    from stages.sample import SampleConfig, run_sample

    rows = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SampleConfig(n=4, out=str(tmp_path / dtype), rows_per_shard=4, dtype=dtype)
        run_sample(cfg, GeneratorRef(), ClipRef(), EXEC, progress=False)
        rows[dtype] = RowStore.open(str(tmp_path / dtype / "s.zarr"))
    assert rows["bfloat16"].specs["s"].dtype == "bfloat16"
    assert rows["bfloat16"].fingerprint != rows["float32"].fingerprint
    s32, sbf = rows["float32"].read("s"), rows["bfloat16"].read("s")
    assert 0 < np.abs(sbf - s32).max() <= 4e-3 * np.abs(s32).max()
    res = CliRunner().invoke(main, ["sample", "--set", "sample.dtype=float8"])
    assert res.exit_code != 0 and "sample.dtype" in res.output and "bfloat16" in res.output
    assert "Traceback" not in res.output
