"""Store benchmarks, each a ratio against a baseline measured in the same run.

(a) PairSampler pairs/s in shard-blocked mode, reading a [N, 6048] float32 s store and a
    [N, 512] clip store on disk, vs numpy fancy indexing of the same arrays in memory
    (target >= 0.5x).
(b) RowStore.write_block MB/s vs np.save of the same block (data + status), same disk
    (target >= 0.7x).

    .venv/bin/python bench/bench_store.py --quick          # 20k rows (~0.5 GB in /tmp)
    .venv/bin/python bench/bench_store.py                  # 200k rows (~5.2 GB in /tmp)

Notes: files are read back from the page cache when RAM allows (both sides of (a) then
work from memory; the sampler still decodes shards through zarr). Float latents are
stored uncompressed: random-like float32 does not compress (zstd saves a few %), and a
codec costs write and read speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import ArraySpec, PairSampler, RowStore, SamplerSource, Status  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the store")
    p.add_argument("--quick", action="store_true", help="20k rows, fewer repeats")
    p.add_argument("--dim", type=int, default=6048, help="s width (DeltaEdit conv channels)")
    p.add_argument("--clip-dim", type=int, default=512, help="c width")
    p.add_argument("--rows-per-shard", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=400, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        help="sampler memory budget as a fraction of the data size (forces sharded)",
    )
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the store is written")
    p.add_argument("--keep", action="store_true", help="keep the store after the run")
    args = p.parse_args()
    if args.quick:
        args.rows = min(args.rows, 20_000)
        args.repeats = min(args.repeats, 5)
        args.batches = min(args.batches, 200)
    return args


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_stores(root: Path, args: argparse.Namespace) -> tuple[RowStore, RowStore, float, float]:
    """Write s and c stores block by block; time each s block against np.save of it."""
    n, rps = args.rows, args.rows_per_shard
    s = RowStore.create(
        str(root / "s.zarr"),
        n,
        rps,
        {"s": ArraySpec((args.dim,), "float32")},
        {"fingerprint": "bench"},
        mode="overwrite",
    )
    c = RowStore.create(
        str(root / "clip.zarr"),
        n,
        rps,
        {"embed": ArraySpec((args.clip_dim,), "float32")},
        {"fingerprint": "bench"},
        mode="overwrite",
    )
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rps, args.dim), dtype=np.float32)
    base_c = rng.standard_normal((rps, args.clip_dim), dtype=np.float32)
    store_s, save_s = [], []
    npy = root / "npy"
    npy.mkdir(exist_ok=True)
    for b in range(s.n_blocks):
        sl = s.block_rows(b)
        k = sl.stop - sl.start
        data = base[:k] + np.float32(b)  # distinct data per block
        status = np.full(k, Status.OK, np.uint8)
        order = ("store", "save") if b % 2 == 0 else ("save", "store")  # against drift
        for name in order:
            t = time.perf_counter()
            if name == "store":
                s.write_block(b, {"s": data}, status)
            else:
                np.save(npy / f"s{b}.npy", data)
                np.save(npy / f"st{b}.npy", status)
            (store_s if name == "store" else save_s).append((time.perf_counter() - t, data.nbytes))
        c.write_block(b, {"embed": base_c[:k] - np.float32(b)}, status)
    shutil.rmtree(npy)
    full = [i for i, (_, nbytes) in enumerate(store_s) if nbytes == store_s[0][1]]
    mbps_store = statistics.median(store_s[i][1] / store_s[i][0] / 1e6 for i in full)
    mbps_save = statistics.median(save_s[i][1] / save_s[i][0] / 1e6 for i in full)
    return s, c, mbps_store, mbps_save


def main() -> None:
    args = parse_args()
    data_bytes = args.rows * (args.dim + args.clip_dim) * 4
    free = shutil.disk_usage(args.dir).free
    if free < 1.5 * data_bytes:
        sys.exit(
            f"bench_store: needs ~{1.5 * data_bytes / 1e9:.1f} GB free in {args.dir}, "
            f"has {free / 1e9:.1f} GB; use --rows or --quick or --dir"
        )
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    print(
        f"bench_store: {args.rows} rows x (s {args.dim} + c {args.clip_dim}) float32 = "
        f"{data_bytes / 1e9:.2f} GB, {args.rows_per_shard} rows/shard, in {root}"
    )
    try:
        t = time.perf_counter()
        s, c, mbps_store, mbps_save = write_stores(root, args)
        print(
            f"  wrote {s.n_blocks} blocks in {time.perf_counter() - t:.1f} s; "
            f"files: {sum(len(f) for _, _, f in os.walk(root))}"
        )
        print(
            f"(b) block write: RowStore.write_block {mbps_store:.0f} MB/s, np.save "
            f"{mbps_save:.0f} MB/s, ratio {mbps_store / mbps_save:.2f}x (target >= 0.7x)"
        )

        budget = int(data_bytes * args.budget_fraction)
        t = time.perf_counter()
        sampler = PairSampler(
            [SamplerSource(s, "s", c, "embed")], args.batch, seed=0, memory_budget=budget
        )
        init = time.perf_counter() - t
        assert sampler.mode == "sharded", sampler.mode

        def draw_sharded() -> None:
            for _ in range(args.batches):
                sampler.next_batch()

        draw_sharded()  # warm-up
        t_sharded = median_time(draw_sharded, args.repeats)

        s_mem, c_mem = s.read("s"), c.read("embed")
        rng = np.random.default_rng(0)

        def draw_memory() -> None:
            for _ in range(args.batches):
                i = rng.integers(args.rows, size=args.batch)
                j = rng.integers(args.rows, size=args.batch)
                _ = (s_mem[i], c_mem[i], s_mem[j], c_mem[j])

        draw_memory()
        t_memory = median_time(draw_memory, args.repeats)
        pairs = args.batches * args.batch
        rate_s, rate_m = pairs / t_sharded, pairs / t_memory
        print(
            f"(a) pair sampler: sharded {rate_s:,.0f} pairs/s ({sampler.shards_resident} of "
            f"{s.n_blocks} shards resident, budget {budget / 1e6:.0f} MB, init {init:.1f} s), "
            f"numpy in memory {rate_m:,.0f} pairs/s, ratio {rate_s / rate_m:.2f}x "
            f"(target >= 0.5x)"
        )
    finally:
        if args.keep:
            print(f"  kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
