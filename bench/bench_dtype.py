"""Bench: what storing S codes and edits as float16 / bfloat16 costs against float32.

(a) Error: S = w_to_s(W+) of random z through each generator (the tiny-64 config at seed
    0, the committed world generator weights/world/generator.safetensors, and optionally
    the 1024 px config-f layout at random weights), stored and read back as the store does
    (store.rowstore encode_values / decode_values): max abs error of S, max relative error,
    and the PSNR of the render of the read-back S against the render of the float32 S
    (images in [-1, 1], peak-to-peak 2; median and worst image).
(b) Speed: RowStore.write_block and RowStore.read_block_into of [rows, 9088] (the FFHQ-1024
    S width) on disk, per dtype: bytes a row on disk, MB/s of float32 values handed in and
    out, and the ratio to float32 (median of --repeats, interleaved). Reads come from the
    page cache when RAM allows: they measure decode cost, not the disk.

    .venv/bin/python bench/bench_dtype.py --quick
    .venv/bin/python bench/bench_dtype.py --with-1024        # + config-f 1024 renders (slow)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import ArraySpec, RowStore, Status  # noqa: E402
from store.rowstore import FLOAT_DTYPES, decode_values, encode_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HALF = [d for d in FLOAT_DTYPES if d != "float32"]


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of [N, 3, H, W] images in [-1, 1]."""
    a, b = np.clip(a, -1, 1), np.clip(b, -1, 1)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(4.0 / np.maximum(mse, 1e-20))


def error_part(name: str, G, n: int, batch: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.randn(n, G.config.z_dim or G.w_dim, generator=g)
        s = G.w_to_s(G.wplus(G.mapping(z))).numpy()
        ref = np.concatenate(
            [G.synthesize(torch.from_numpy(s[i : i + batch])).numpy() for i in range(0, n, batch)]
        )
    for dtype in HALF:
        back = decode_values(encode_values(s, dtype), dtype)
        err = np.abs(back - s)
        rel = (err / np.maximum(np.abs(s), 1e-30))[np.abs(s) > 1e-3].max()
        with torch.no_grad():
            img = np.concatenate(
                [
                    G.synthesize(torch.from_numpy(back[i : i + batch])).numpy()
                    for i in range(0, n, batch)
                ]
            )
        p = psnr(img, ref)
        print(
            f"(a) {name:<22} {dtype:<9} |S| max {np.abs(s).max():6.2f}  max abs err "
            f"{err.max():.2e}  max rel err {rel:.2e}  render PSNR median {np.median(p):5.1f} dB, "
            f"worst {p.min():5.1f} dB ({n} images)"
        )


def speed_part(rows: int, dim: int, rps: int, repeats: int, tmp: Path) -> None:
    values = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    status = np.full(rps, int(Status.OK), np.uint8)
    times: dict[str, dict[str, list[float]]] = {d: {"write": [], "read": []} for d in FLOAT_DTYPES}
    sizes: dict[str, int] = {}
    out = np.empty((rps, dim), np.float32)
    for rep in range(repeats):
        for dtype in FLOAT_DTYPES:  # interleaved: load on the machine hits every dtype alike
            url = str(tmp / f"{dtype}-{rep}.zarr")
            st = RowStore.create(url, rows, rps, {"s": ArraySpec((dim,), dtype)}, {})
            t0 = time.perf_counter()
            for b in range(st.n_blocks):
                sl = st.block_rows(b)
                st.write_block(b, {"s": values[sl]}, status[: sl.stop - sl.start])
            times[dtype]["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b in range(st.n_blocks):
                st.read_block_into("s", b, out)
            times[dtype]["read"].append(time.perf_counter() - t0)
            sizes[dtype] = sum(f.stat().st_size for f in Path(url, "s").rglob("*") if f.is_file())
            shutil.rmtree(url)
    mb = values.nbytes / 1e6
    base = {k: statistics.median(v) for k, v in times["float32"].items()}
    for dtype in FLOAT_DTYPES:
        med = {k: statistics.median(v) for k, v in times[dtype].items()}
        print(
            f"(b) {dtype:<9} {sizes[dtype] / rows:8.0f} B a row on disk "
            f"({sizes[dtype] / sizes['float32']:.2f}x)  write {mb / med['write']:6.0f} MB/s "
            f"({base['write'] / med['write']:.2f}x float32)  read {mb / med['read']:6.0f} MB/s "
            f"({base['read'] / med['read']:.2f}x float32)  [{rows} x {dim}, MB of float32 values]"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and rows")
    ap.add_argument("--with-1024", action="store_true", help="also config-f 1024 at random weights")
    ap.add_argument("--rows", type=int, default=8192, help="rows of the speed store")
    ap.add_argument("--dim", type=int, default=9088)
    ap.add_argument("--rows-per-shard", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats = min(args.rows, 4096), min(args.repeats, 3)
    import torch

    from model.stylegan2 import create_generator, load_generator

    torch.manual_seed(0)
    n = 16 if args.quick else 64
    error_part("tiny-64 (seed 0)", create_generator("tiny-64", seed=0).eval(), n, 16)
    world = ROOT / "weights" / "world" / "generator.safetensors"
    error_part("world 32 px (trained)", load_generator(world).eval(), n, 16)
    if args.with_1024:
        error_part("ffhq-1024 (random)", create_generator("ffhq-1024", seed=0).eval(), 4, 1)
    with tempfile.TemporaryDirectory(prefix="bench_dtype_", dir=args.dir) as tmp:
        speed_part(args.rows, args.dim, args.rows_per_shard, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
