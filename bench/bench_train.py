"""Bench: Delta Mapper training speed and the data path, against baselines in the same run.

1. Step speed, official-size mapper (1024 config-f layout, E = 512), batch 64, fp32:
   this project's mapper (folded equalized-lr weights: addmm + in-place leaky ReLU;
   fused Adam with per-parameter lr/eps = the official update) against a
   straightforward implementation (EqualLinear scaling W * lr_mul / sqrt(in) at every
   forward, leaky_relu(...) * sqrt(2), unfused torch.optim.Adam). Same math: the two
   outputs are compared first. Median of repeats; target >= 1.3x.
2. Data path, store on disk (official widths, --rows rows), shard-blocked PairSampler
   with a small memory budget: share of step time spent waiting for batches with the
   background prefetch thread (target <= 5%), against a loop that reads each pair
   row by row from the store. Peak RSS of this part (in a fresh subprocess) against
   memory_budget + model + gradients + Adam state.
3. Optional: bf16 autocast steps/s (reported separately, not a target).

    .venv/bin/python bench/bench_train.py --quick            # this machine (2 shared cores)
    .venv/bin/python bench/bench_train.py --rows 200000      # the real run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.mapper import LR_MUL, DeltaMapper, EqualLinear, Mapper, official_layout  # noqa: E402
from stages.common import release_freed_memory, resolve_device  # noqa: E402
from stages.train import (  # noqa: E402
    Prefetcher,
    TrainConfig,
    make_optimizer,
    mapper_loss,
    prepare_batch,
    sampler_budget,
)

BATCH = 64
CLIP_DIM = 512


class StraightEqualLinear(nn.Module):
    """The official-style layer: raw W (init randn / lr_mul), scaled at every forward."""

    def __init__(self, layer: EqualLinear) -> None:
        super().__init__()
        state = layer.state_dict()  # official values
        self.weight = nn.Parameter(state["weight"].clone())
        self.bias = nn.Parameter(state["bias"].clone())
        self.scale = LR_MUL / math.sqrt(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)
        return F.leaky_relu(out + self.bias * LR_MUL, 0.2) * math.sqrt(2)


class StraightDeltaMapper(DeltaMapper):
    """The official forward: every level's Mapper modules as they are (each condition module
    normalizing cond itself) and the fusion module on the concatenation [sm(s) || cm(cond)],
    cm(cond) repeated on every layer of a per-layer level."""

    def forward(self, s_conv: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, out = s_conv.shape[0], []
        for p in self.plans:
            sm, cm, fm = (getattr(self, f"{k}_{p.level}") for k in ("sm", "cm", "fm"))
            s, c = s_conv[:, p.span], cm(cond)
            if p.n_layers > 1:
                s = s.reshape(b, p.n_layers, p.width)
                c = c.unsqueeze(1).expand(b, p.n_layers, p.width)
            out.append(fm(torch.cat([sm(s), c], dim=-1)).reshape(b, -1))
        return torch.cat(out, dim=1)


def straightforward(mapper: DeltaMapper) -> DeltaMapper:
    """A copy of `mapper` computing the official code's way: the official forward
    (StraightDeltaMapper) and every EqualLinear the straightforward layer."""
    base = copy.deepcopy(mapper)
    base.__class__ = StraightDeltaMapper
    for module in base.modules():
        if isinstance(module, Mapper):
            for k, layer in enumerate(module.mapping):
                if isinstance(layer, EqualLinear):
                    module.mapping[k] = StraightEqualLinear(layer)
    return base


def random_batch(layout, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, e = layout.conv_dim, CLIP_DIM
    return {
        "s_i": rng.standard_normal((BATCH, d), np.float32),
        "s_j": rng.standard_normal((BATCH, d), np.float32),
        "c_i": rng.standard_normal((BATCH, e), np.float32),
        "c_j": rng.standard_normal((BATCH, e), np.float32),
    }


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steps_per_s(
    model, opt, batch, steps: int, repeats: int, autocast: bool = False, device: str = "cpu"
) -> float:
    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            pred = model(batch.s, batch.cond)
        loss, _, _ = mapper_loss(pred.float(), batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, optimizer state)
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_speed(steps: int, repeats: int, bf16: bool, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    layout = official_layout()
    fast = DeltaMapper(layout, CLIP_DIM).to(device)
    base = straightforward(fast)
    batch = prepare_batch(random_batch(layout), device)
    with torch.no_grad():
        diff = (fast(batch.s, batch.cond) - base(batch.s, batch.cond)).abs().max().item()
    n_params = sum(p.numel() for p in fast.parameters())
    print(
        f"official-size mapper: {n_params / 1e6:.1f} M parameters; max |fast - straight| "
        f"output {diff:.2e}; device {device}; torch threads {torch.get_num_threads()}"
    )
    base_opt = torch.optim.Adam(base.parameters(), lr=0.5, foreach=False, fused=False)
    fast_opt = make_optimizer(fast, 0.5, device)
    out = {"params": n_params, "output_max_diff": diff}
    # Interleave so both see the same machine load; median of the medians.
    base_rates, fast_rates = [], []
    for _ in range(2):
        base_rates.append(steps_per_s(base, base_opt, batch, steps, repeats, device=device))
        fast_rates.append(steps_per_s(fast, fast_opt, batch, steps, repeats, device=device))
    out["baseline_steps_per_s"] = statistics.median(base_rates)
    out["fast_steps_per_s"] = statistics.median(fast_rates)
    out["speedup"] = out["fast_steps_per_s"] / out["baseline_steps_per_s"]
    print(
        f"step speed, batch {BATCH}, fp32: straightforward {out['baseline_steps_per_s']:.3f} "
        f"steps/s, this mapper {out['fast_steps_per_s']:.3f} steps/s -> "
        f"{out['speedup']:.2f}x (target >= 1.3x)"
    )
    if bf16:
        out["bf16_steps_per_s"] = steps_per_s(
            fast, fast_opt, batch, steps, repeats, autocast=True, device=device
        )
        print(
            f"bf16 autocast (forward): {out['bf16_steps_per_s']:.3f} steps/s "
            f"({out['bf16_steps_per_s'] / out['fast_steps_per_s']:.2f}x fp32)"
        )
    return out


def write_store(root: Path, rows: int, rows_per_shard: int) -> None:
    """s.zarr (official D = 9088) + clip.zarr (E = 512) of random rows."""
    from store import ArraySpec, RowStore, Status, store_url

    layout = official_layout()
    s_store = RowStore.create(
        store_url(str(root), "s"),
        rows,
        rows_per_shard,
        {"s": ArraySpec((layout.dim,), "float32")},
        {"fingerprint": "bench", "layout": layout.to_dict()},
        mode="overwrite",
    )
    c_store = RowStore.create(
        store_url(str(root), "clip"),
        rows,
        rows_per_shard,
        {"embed": ArraySpec((CLIP_DIM,), "float32")},
        {"fingerprint": "bench"},
        mode="overwrite",
    )
    rng = np.random.default_rng(0)
    for b in range(s_store.n_blocks):
        sl = s_store.block_rows(b)
        n = sl.stop - sl.start
        ok = np.full(n, Status.OK, np.uint8)
        s_store.write_block(b, {"s": rng.standard_normal((n, layout.dim), np.float32)}, ok)
        c_store.write_block(b, {"embed": rng.standard_normal((n, CLIP_DIM), np.float32)}, ok)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak RSS of this process image (VmHWM; ru_maxrss would inherit the parent's peak)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def data_part(
    root: Path, steps: int, budget_mb: float, prefetch: int, device: str, no_malloc_tuning: bool
) -> dict:
    """Run in a fresh process: data path alone, then training on the store; wait share, RSS."""
    from store import PairSampler, RowStore, SamplerSource, store_url

    torch.manual_seed(0)
    layout = official_layout()
    conv = layout.conv_index()
    tuned = False if no_malloc_tuning else release_freed_memory()  # as the train stage does
    s_store = RowStore.open(store_url(str(root), "s"))
    c_store = RowStore.open(store_url(str(root), "clip"))
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()  # torch runtime and the optimizer code loaded before the
    torch.optim.Adam([x], fused=True).step()  # first RSS reading: code, not data
    rss0 = rss_bytes()
    cfg = TrainConfig(batch_size=BATCH, memory_budget_mb=budget_mb, prefetch=prefetch)
    sampler = PairSampler(
        [SamplerSource(s_store, "s", c_store, "embed")],
        BATCH,
        0,
        sampler_budget(cfg, conv.size, CLIP_DIM),
        s_columns=conv,
    )

    def make(step: int):
        return prepare_batch(sampler.next_batch(), device)

    # 1. The data path alone (sampler + prefetch queue), before any model exists;
    #    also its speed: batches/s of the shard-blocked sampler.
    n_batches = 40
    fetch = Prefetcher(make, 0, n_batches, prefetch)
    t1 = time.perf_counter()
    for _ in range(n_batches):
        fetch.get()
    sampler_batch_s = (time.perf_counter() - t1) / n_batches
    fetch.close()
    peak_data = peak_rss()

    # 2. Training on the store with the official-size mapper.
    mapper = DeltaMapper(layout, CLIP_DIM).to(device)
    opt = make_optimizer(mapper, 0.5, device)
    model_bytes = sum(p.numel() * 4 for p in mapper.parameters())

    def train_step(batch) -> None:
        loss, _, _ = mapper_loss(mapper(batch.s, batch.cond), batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for k in range(2):  # steady state: gradients and Adam state exist from here on
        train_step(prepare_batch(random_batch(layout, k), device))
    sync(device)
    fetch = Prefetcher(make, 0, steps, prefetch)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = fetch.get()
        wait += time.perf_counter() - tw
        train_step(batch)
    sync(device)
    total = time.perf_counter() - t0
    fetch.close()
    sampler.close()
    peak_train = peak_rss()

    # 3. Baseline loader: each pair's rows read one by one from the store.
    rng = np.random.default_rng(1)
    ok = s_store.ok_rows()
    n_rows_batches = 3
    t2 = time.perf_counter()
    for _ in range(n_rows_batches):
        i, j = rng.choice(ok, BATCH), rng.choice(ok, BATCH)
        raw = {
            "s_i": np.stack([s_store.read("s", np.array([r]))[0, conv] for r in i]),
            "s_j": np.stack([s_store.read("s", np.array([r]))[0, conv] for r in j]),
            "c_i": np.stack([c_store.read("embed", np.array([r]))[0] for r in i]),
            "c_j": np.stack([c_store.read("embed", np.array([r]))[0] for r in j]),
        }
        prepare_batch(raw, device)
    row_by_row = (time.perf_counter() - t2) / n_rows_batches
    compute = (total - wait) / steps
    return {
        "mode": sampler.mode,
        "shards_resident": getattr(sampler, "shards_resident", None),
        "steps": steps,
        "step_s": total / steps,
        "wait_fraction": wait / total,
        "sampler_batch_s": sampler_batch_s,
        "row_by_row_batch_s": row_by_row,
        "row_by_row_wait_fraction": row_by_row / (row_by_row + compute),
        "rss_start": rss0,
        "peak_data": peak_data,
        "peak_train": peak_train,
        "sampler_bytes": sampler.resident_bytes,
        "budget_bytes": int(budget_mb * 2**20),
        "model_bytes": model_bytes,
        "malloc_tuned": tuned,
    }


def bench_data(
    rows: int, rows_per_shard: int, steps: int, budget_mb: float, prefetch: int, device: str
):
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp) / "store"
        t0 = time.perf_counter()
        write_store(root, rows, rows_per_shard)
        print(
            f"store: {rows} rows x (9088 s + 512 c) float32 written in "
            f"{time.perf_counter() - t0:.1f} s ({rows_per_shard} rows per shard)"
        )
        cmd = [
            sys.executable,
            __file__,
            "--_data-part",
            str(root),
            "--steps",
            str(steps),
            "--budget-mb",
            str(budget_mb),
            "--prefetch",
            str(prefetch),
            "--device",
            device,
        ]
        # the user's environment without any malloc setting of theirs: the program sets it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"data part failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        # The same run without the train stage's malloc setting (stages.common.
        # release_freed_memory): glibc's dynamic mmap threshold keeps freed 10-25 MB
        # weight-sized buffers in the heap (peak RSS only).
        cmd[cmd.index("--steps") + 1] = "2"
        done = subprocess.run(
            [*cmd, "--_no-malloc-tuning"], capture_output=True, text=True, check=False, env=env
        )
        untuned = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    mb = 2**20
    data_growth = r["peak_data"] - r["rss_start"]
    total = r["peak_train"] - r["rss_start"]
    allowed = r["budget_bytes"] + 4 * r["model_bytes"]
    print(
        f"data path ({r['mode']} sampler, {r['shards_resident']} shards resident, prefetch "
        f"{prefetch}): step {r['step_s']:.3f} s, waiting for data {r['wait_fraction']:.1%} "
        f"(target <= 5%)"
    )
    print(
        f"data alone: shard-blocked sampler {1e3 * r['sampler_batch_s']:.1f} ms per batch, "
        f"row-by-row reads {1e3 * r['row_by_row_batch_s']:.1f} ms per batch "
        f"({r['row_by_row_batch_s'] / r['sampler_batch_s']:.0f}x); a row-by-row loop without "
        f"prefetch would wait {r['row_by_row_wait_fraction']:.1%} of this machine's steps"
    )
    print(
        f"peak RSS growth, data path alone (sampler + prefetch queue): {data_growth / mb:.0f} MiB "
        f"(sampler buffers {r['sampler_bytes'] / mb:.0f} MiB) vs memory_budget "
        f"{r['budget_bytes'] / mb:.0f} MiB: "
        f"{'within' if data_growth <= r['budget_bytes'] else 'OVER'}"
    )
    print(
        f"peak RSS growth, training on the store: {total / mb:.0f} MiB vs memory_budget + model "
        f"+ gradients + Adam (budget + 4 x {r['model_bytes'] / mb:.0f} MiB) = {allowed / mb:.0f} "
        f"MiB: {'within' if total <= allowed else 'OVER'} (default environment; the "
        f"program sets glibc's mmap threshold itself: {r['malloc_tuned']})"
    )
    if untuned is not None:
        total_untuned = untuned["peak_train"] - untuned["rss_start"]
        print(
            f"  without that setting (glibc's dynamic mmap threshold): {total_untuned / mb:.0f} "
            f"MiB: {'within' if total_untuned <= allowed else 'OVER'}"
        )
    return r | {"data_growth": data_growth, "total_growth": total, "allowed": allowed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (this machine)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the on-disk store")
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget-mb", type=float, default=None)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--_data-part", dest="data_part", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--_no-malloc-tuning", dest="no_malloc", action="store_true", help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.data_part:
        r = data_part(
            Path(args.data_part), args.steps, args.budget_mb, args.prefetch, device, args.no_malloc
        )
        print(json.dumps(r))
        return
    rows = args.rows or (2048 if args.quick else 200_000)
    steps = args.steps or (2 if args.quick else 20)
    budget = args.budget_mb or (128.0 if args.quick else 1024.0)
    if not args.skip_data:  # first: its subprocess forks from a still small parent
        bench_data(
            rows, args.rows_per_shard, 6 if args.quick else 50, budget, args.prefetch, device
        )
    if not args.skip_speed:
        bench_speed(steps, 1 if args.quick else 5, args.bf16, device)


if __name__ == "__main__":
    main()
