"""Bench: stores larger than RAM at a flat cost per row, bounded memory (issue 17, item 1).

For each N of --rows, makes a synthetic dataset in the FFHQ-1024 layout under --dir
(never committed): s.zarr [N, 9088] (--dtype: float32 = 36 KB a row, float16/bfloat16 =
18 KB) and clip.zarr [N, 512] float32, with synthetic values. Creation is block-wise with
done marks: an interrupted run, rerun with the same arguments, continues where it stopped.
Then, each in a fresh process (peak RSS = that process's VmHWM):

  sampler  the train sampler, shard-blocked (store/sampler.py) within --budget-mb, over the
           conv columns as train reads them: pairs/s over --batches batches of 64
  edit     `stages.edit.run` over every row: the official-size Delta Mapper (1024 layout,
           E = 512) at random weights, edits stored as --dtype, --precision compute; rows/s,
           against the mapper alone in the same process (`mapper_delta` on --baseline-rows
           rows in memory, same batch and precision: twice before the edit, twice after;
           median): edit / mapper-only in wall and CPU time (issue 17 target >= 0.8x)
  info     `store info` of both stores (describe + format)
  verify   `store verify` of both stores (streams block by block), rows/s

and prints rows/s, peak RSS, and the cost per row of every N against the smallest N
(target: the largest within 1.2x), and peak RSS against memory_budget + model (+ optimizer).

    .venv/bin/python bench/bench_rows.py --rows 10000,100000 --dtype float16
    .venv/bin/python bench/bench_rows.py --rows 1000000 --dtype float16 --dir /big/disk

Bad input: rows the disk cannot hold are refused before anything is written (the size
needed is named); a --budget-mb below one shard-blocked sampler's minimum is refused
naming the minimum.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import ArraySpec, RowStore, Status, StoreError, store_url  # noqa: E402
from store.fs import require_free_space  # noqa: E402
from store.rowstore import FLOAT_DTYPES, store_nbytes  # noqa: E402
from store.sampler import load_overhead, min_sharded_budget  # noqa: E402

S_DIM, CLIP_DIM, BATCH = 9088, 512, 64
EDIT_BATCH = 256  # execution.batch_size of the edit part
CLIP_NAME = "bench-rows-512"  # the tiny CLIP config with 512-d embeddings (text prompts only)
PARTS = ("sampler", "edit", "info", "verify")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="10000,100000", help="comma-separated row counts")
    p.add_argument("--dtype", default="float16", choices=FLOAT_DTYPES, help="s and edits")
    p.add_argument("--dir", default="/tmp/bench_rows", help="where the stores are written")
    p.add_argument("--rows-per-shard", type=int, default=512)
    p.add_argument("--budget-mb", type=float, default=512.0, help="train sampler memory budget")
    p.add_argument("--batches", type=int, default=300, help="sampler batches timed")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="edit part: execution.precision (the mapper's compute dtype)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="edit part: torch intra-op threads (0 = torch's default, the cores)",
    )
    p.add_argument(
        "--baseline-rows",
        type=int,
        default=1024,
        help="edit part: rows the mapper-only baseline maps (in memory, 4 runs)",
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    p.add_argument("--keep", action="store_true", help="keep each store after its run")
    p.add_argument(
        "--warm",
        action="store_true",
        help="leave the stores in the page cache (default: dropped before each part, so "
        "every row count reads from disk alike)",
    )
    p.add_argument("--_part", dest="part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_root", dest="root", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# feature maps per resolution of the 1024 px config-f generator (model/stylegan2.py
# CONFIGS["ffhq-1024"]; the edit part checks they agree): spelled out so that the parts
# without a model (sampler, info, verify) never import torch and their RSS is the data's
CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


def layout():
    from model.layout import SLayout

    lay = SLayout.from_channels(1024, CHANNELS)
    assert lay.dim == S_DIM, lay.dim
    return lay


def clip_model():
    from model.clip import TINY_CONFIG, load_clip, register_config

    register_config(CLIP_NAME, {**TINY_CONFIG, "embed_dim": CLIP_DIM}, overwrite=True)
    return load_clip(CLIP_NAME, seed=0)


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def used_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def drop_cache(root: Path) -> None:
    """Drop the stores' pages from the page cache (POSIX_FADV_DONTNEED: no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return
    os.sync()
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def arrays(dtype: str) -> dict[str, dict[str, ArraySpec]]:
    return {
        "s": {"s": ArraySpec((S_DIM,), dtype)},
        "clip": {"embed": ArraySpec((CLIP_DIM,), "float32")},
    }


def bytes_needed(n: int, dtype: str, parts: list[str]) -> int:
    """s + clip stores, and (edit) its compute store and the assembled next store at once."""
    specs = arrays(dtype)
    need = store_nbytes(n, specs["s"]) + store_nbytes(n, specs["clip"])
    if "edit" in parts:
        edit = {"s": ArraySpec((S_DIM,), dtype), "sha256": ArraySpec((), "str")}
        need += 2 * store_nbytes(n, edit) + 4 * 80_000_000  # + the mapper file
    return need


def check_budget(rps: int, budget_mb: float) -> None:
    conv = layout().conv_index().size
    need = min_sharded_budget(rps, conv, CLIP_DIM, load_overhead(rps, S_DIM, CLIP_DIM))
    if budget_mb * 2**20 < need:
        raise SystemExit(
            f"--budget-mb {budget_mb:g} is smaller than one shard-blocked sampler needs with "
            f"{rps} rows per shard: at least {need / 2**20:.0f} MiB (2 resident shards + 1 "
            f"prefetched + loading one); raise it or use fewer --rows-per-shard"
        )


def make_stores(root: Path, n: int, rps: int, dtype: str) -> float:
    """The synthetic dataset (resumable: blocks already done are kept). Seconds taken."""
    t0 = time.perf_counter()
    clip = clip_model()  # its fingerprint: the edit checks the clip store against it
    lay = layout()
    attrs = {
        "s": {"stage": "bench", "fingerprint": f"bench-s-{dtype}", "layout": lay.to_dict()},
        "clip": {"stage": "bench", "fingerprint": clip.fingerprint, "model": clip.name},
    }
    rng = np.random.default_rng(0)
    base_s = rng.standard_normal((rps, S_DIM), dtype=np.float32)
    base_c = rng.standard_normal((rps, CLIP_DIM), dtype=np.float32)
    for name, specs in arrays(dtype).items():
        st = RowStore.create(store_url(str(root), name), n, rps, specs, attrs[name])
        base = base_s if name == "s" else base_c
        (key,) = specs
        for b in st.pending_blocks():
            sl = st.block_rows(b)
            k = sl.stop - sl.start
            values = np.roll(base[:k], b % k, axis=0) * np.float32(1 + (b % 89) / 89) + b % 7
            st.write_block(b, {key: values}, np.full(k, int(Status.OK), np.uint8))
    return time.perf_counter() - t0


def make_mapper(root: Path, clip) -> Path:
    """The official-size Delta Mapper (1024 layout, E = 512) at random weights, once."""
    import torch

    from model.mapper import DeltaMapper, save_mapper

    path = root / "mapper.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        extra = {"clip_fingerprint": clip.fingerprint}
        save_mapper(DeltaMapper(layout(), CLIP_DIM), path, extra=extra)
    return path


# --- the parts, each in its own process -----------------------------------------------------


def part_sampler(root: Path, args: argparse.Namespace) -> dict:
    from store import PairSampler, SamplerSource

    conv = layout().conv_index()
    s, c = RowStore.open(store_url(str(root), "s")), RowStore.open(store_url(str(root), "clip"))
    t0 = time.perf_counter()
    sampler = PairSampler(
        [SamplerSource(s, "s", c, "embed")],
        BATCH,
        0,
        int(args.budget_mb * 2**20),
        s_columns=conv,
        force_mode="sharded",
    )
    t_init = time.perf_counter() - t0
    for _ in range(10):
        sampler.next_batch()
    t1 = time.perf_counter()
    for _ in range(args.batches):
        sampler.next_batch()
    dt = time.perf_counter() - t1
    out = {
        "seconds": dt,
        "units": args.batches * BATCH,
        "init_s": t_init,
        "resident": sampler.shards_resident,
        "buffers": sampler.resident_bytes,
        "allowed": int(args.budget_mb * 2**20),
    }
    sampler.close()
    return out


def mapper_only(mapper, s_conv, c, targets, batch: int, precision: str) -> tuple[float, float]:
    """The mapper alone on rows already in memory: (wall s, process CPU s) of
    `stages.edit.mapper_delta` over every row, in batches of `batch` as the edit runs it."""
    import torch

    from stages.common import autocast
    from stages.edit import mapper_delta

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast("cpu", precision):
        for i in range(0, len(s_conv), batch):
            mapper_delta(mapper, s_conv[i : i + batch], c[i : i + batch], targets).float()
    return time.perf_counter() - t0, time.process_time() - c0


def part_edit(root: Path, args: argparse.Namespace) -> dict:
    """The edit over every row, bracketed by the mapper-only baseline (same process, same
    mapper, targets, batch and precision, the store's first rows in memory): two baseline
    runs before the edit, two after, their median against the edit."""
    import gc
    import statistics

    import torch

    from model.checkpoint import load_checkpoint
    from model.mapper import load_mapper
    from model.stylegan2 import CONFIGS
    from stages.common import ExecutionConfig, release_freed_memory
    from stages.edit import EditConfig, EditSpec, prepare_targets
    from stages.edit import run as run_edit

    assert CONFIGS["ffhq-1024"].channels == CHANNELS
    release_freed_memory()  # what the edit sets: the baseline's freed mapper goes back
    if args.threads:
        torch.set_num_threads(args.threads)
    clip = clip_model()
    mapper_path = make_mapper(root, clip)
    model_bytes = 4 * sum(t.numel() for t in load_checkpoint(mapper_path)[0].values())
    shutil.rmtree(root / "edits", ignore_errors=True)
    cfg = EditConfig(
        edits=(EditSpec("smile", "smiling face", alpha=1.0, beta=0.0),),
        dataset_kind="faces",
        store=str(root),
        mapper=str(mapper_path),
        out_dir=str(root / "edits"),
        dtype=args.dtype,
    )
    cfg.validate()
    execution = ExecutionConfig(device="cpu", batch_size=EDIT_BATCH, precision=args.precision)
    # the baseline's rows: the first ones of the store, as the edit computes them (float32)
    n_base = min(args.baseline_rows, RowStore.open(store_url(str(root), "s")).n_rows)
    rows = np.arange(n_base)
    s = torch.from_numpy(RowStore.open(store_url(str(root), "s")).read("s", rows=rows))
    c = torch.from_numpy(RowStore.open(store_url(str(root), "clip")).read("embed", rows=rows))
    edit = cfg.resolved()[0]

    def baseline() -> tuple[float, float]:
        mapper = load_mapper(mapper_path).eval()
        conv = torch.from_numpy(mapper.s_index())
        targets = prepare_targets(
            edit, cfg.neutral_for(edit), clip, cfg.templates, None, layout(), mapper.s_layout
        )
        s_conv = s[:, conv].contiguous()
        mapper_only(
            mapper, s_conv[:EDIT_BATCH], c[:EDIT_BATCH], targets, EDIT_BATCH, args.precision
        )  # warm-up
        got = [
            mapper_only(mapper, s_conv, c, targets, EDIT_BATCH, args.precision) for _ in range(2)
        ]
        del mapper, s_conv
        gc.collect()
        return got

    base = baseline()
    t0, c0 = time.perf_counter(), time.process_time()
    run_edit(cfg, execution, clip=clip, progress=False, log=lambda _: None)
    dt, dcpu = time.perf_counter() - t0, time.process_time() - c0
    base += baseline()
    out = RowStore.open(str(root / "edits" / "smile.zarr"))
    n_ok = int((out.status() == Status.OK).sum())
    return {
        "seconds": dt,
        "cpu_seconds": dcpu,
        "units": n_ok,
        "allowed": model_bytes,
        "baseline_rows": n_base,
        "threads": torch.get_num_threads(),
        "baseline_rate": n_base / statistics.median(w for w, _ in base),
        "baseline_cpu_rate": n_base / statistics.median(cpu for _, cpu in base),
    }


def part_info(root: Path, args: argparse.Namespace) -> dict:
    from store.inspect import describe, format_info

    t0 = time.perf_counter()
    lines = []
    for name in ("s", "clip"):
        lines += format_info(describe(RowStore.open(store_url(str(root), name))))
    n = RowStore.open(store_url(str(root), "s")).n_rows
    return {"seconds": time.perf_counter() - t0, "units": n, "lines": len(lines), "allowed": 0}


def part_verify(root: Path, args: argparse.Namespace) -> dict:
    from store.inspect import verify_dataset, verify_store

    t0 = time.perf_counter()
    stores = [RowStore.open(store_url(str(root), name)) for name in ("clip", "s")]
    reasons = [r for rs in stores for r in verify_store(rs)] + verify_dataset(stores)
    if reasons:
        raise SystemExit(f"verify found problems: {reasons[:3]}")
    return {"seconds": time.perf_counter() - t0, "units": stores[0].n_rows, "allowed": 0}


def run_part(part: str, root: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_part", part, "--_root", str(root)]
    for key in (
        "dtype",
        "rows_per_shard",
        "budget_mb",
        "batches",
        "precision",
        "baseline_rows",
        "threads",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"part {part} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.part:
        rss0 = vm("VmRSS")
        r = {"sampler": part_sampler, "edit": part_edit, "info": part_info, "verify": part_verify}[
            args.part
        ](Path(args.root), args)
        print(json.dumps(r | {"rss_start": rss0, "peak": vm("VmHWM")}))
        return
    from stages.common import release_freed_memory  # noqa: F401  (the stages set it)

    try:
        rows = [int(x) for x in args.rows.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--rows {args.rows!r}: expected comma-separated integers") from None
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not rows or min(rows) < 1:
        raise SystemExit(f"--parts must be among {PARTS} and --rows positive; got {bad or rows}")
    rps = args.rows_per_shard
    if "sampler" in parts:
        check_budget(rps, args.budget_mb)
    base = Path(args.dir)
    results: dict[int, dict] = {}
    for n in rows:
        root = base / f"rows-{n}-{args.dtype}"
        need = bytes_needed(n, args.dtype, parts) - (used_bytes(root) if root.exists() else 0)
        try:
            require_free_space(str(base), need, f"a {n}-row {args.dtype} store (+ its edit)")
        except StoreError as exc:
            raise SystemExit(str(exc)) from None
        root.mkdir(parents=True, exist_ok=True)
        t_make = make_stores(root, n, rps, args.dtype)
        if "edit" in parts:  # made here: the edit part's RSS is the edit's
            make_mapper(root, clip_model())
        size = used_bytes(root)
        print(f"{n} rows: stores made/resumed in {t_make:.1f} s, {size / 1e9:.2f} GB on disk")
        results[n] = {}
        for part in parts:
            if not args.warm:
                drop_cache(root)
            r = run_part(part, root, args)
            results[n][part] = r
            rate = r["units"] / r["seconds"]
            allowed = r.get("allowed", 0)
            extra = f", init {r['init_s']:.2f} s" if "init_s" in r else ""
            growth = (r["peak"] - r["rss_start"]) / 2**20
            print(
                f"  {part:<8} {rate:>10.0f} {'pairs' if part == 'sampler' else 'rows'}/s  "
                f"peak RSS {r['peak'] / 2**20:.0f} MiB (growth {growth:.0f} MiB; "
                f"budget/model {allowed / 2**20:.0f} MiB){extra}"
            )
            if "baseline_rate" in r:
                cpu_rate = r["units"] / r["cpu_seconds"]
                print(
                    f"           mapper only ({r['baseline_rows']} rows in memory, "
                    f"{args.precision}, {r['threads']} torch threads): "
                    f"{r['baseline_rate']:.0f} rows/s, "
                    f"{r['baseline_cpu_rate']:.0f} rows/CPU-s; edit {cpu_rate:.0f} rows/CPU-s; "
                    f"edit / mapper only = {rate / r['baseline_rate']:.2f}x wall, "
                    f"{cpu_rate / r['baseline_cpu_rate']:.2f}x CPU (target >= 0.8x)"
                )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    small = min(rows)
    for n in rows:
        if n == small:
            continue
        for part in parts:
            a, b = results[small][part], results[n][part]
            ratio = (b["seconds"] / b["units"]) / (a["seconds"] / a["units"])
            print(
                f"cost per row {part} at {n} vs {small}: {ratio:.2f}x "
                f"({'within' if ratio <= 1.2 else 'OVER'} 1.2x); peak RSS "
                f"{b['peak'] / 2**20:.0f} vs {a['peak'] / 2**20:.0f} MiB"
            )


if __name__ == "__main__":
    main()
