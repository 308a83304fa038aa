"""bf16 compute (`execution.precision: bf16`) against fp32: error and speed.

Measured in the same run, median of interleaved repeats (wall clock and process CPU
time; the 2-core machine is shared, CPU time is what our threads got):

A. Mapper inference, official-size Delta Mapper (1024 config-f layout, E = 512, random
   weights), batch --batch rows, one prompt (`stages.edit.mapper_delta`):
   - fp32 latents/s, and against the bare-matmul roofline: the matrix products the
     mapper's forward runs (recorded at dispatch) as plain matmuls on the same shapes (no
     PixelNorm, bias or activation), the faster of `F.linear` (MKL) and oneDNN's
     `mkldnn._linear_pointwise` (what the fp32 CPU mapper calls); target fp32 >= 0.85 of it;
   - bf16 autocast latents/s: speedup over fp32, and over the official code in fp32
     (EqualLinear scaled at every forward, bench_train.straightforward); target >= 2x
     the official code where the CPU/GPU has bf16 matmul (AMX, AVX512-BF16, tensor cores);
   - relative error of the mapped delta, ||d_bf16 - d_fp32|| / ||d_fp32|| (median, max
     over rows).
B. Mapper train step (batch 64, forward under autocast, loss and Adam in fp32): steps/s.
C. Generator synthesis (`stages.render.render_s`): the world generator (weights/world)
   and a 256 px config-f (random weights): images/s fp32 vs bf16 and the PSNR of the
   bf16 renders against the fp32 ones (uint8 images, as render writes them).

    .venv/bin/python bench/bench_precision.py --quick
    .venv/bin/python bench/bench_precision.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_train import straightforward  # noqa: E402

from model.mapper import official_layout  # noqa: E402
from stages.common import autocast, resolve_device  # noqa: E402
from stages.edit import TargetDelta, mapper_delta  # noqa: E402
from stages.render import render_s  # noqa: E402
from stages.train import make_cond, make_optimizer, mapper_loss  # noqa: E402

CLIP_DIM = 512


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], None]], repeats: int, device: str) -> dict:
    """name -> (median wall s, median CPU s), each round running every fn once."""
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: allocations, oneDNN kernel choice
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            got[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in got.items()
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class _MatmulShapes(TorchDispatchMode):
    """Records (M, K, N) of every matrix product run under it: linear (x [..., K] by
    W [N, K]: M = rows of x), addmm, addmm_ and mm (what a mode sees; the products inside
    a linear are not dispatched to it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        aten = torch.ops.aten
        if func in (aten.linear.default, torch.ops.mkldnn._linear_pointwise.default):
            x, w = args[0], args[1]
            self.shapes.append((x.numel() // x.shape[-1], x.shape[-1], w.shape[0]))
        elif func in (aten.addmm.default, aten.addmm_.default, aten.mm.default):
            a, b = args[-2:] if func is aten.mm.default else args[1:3]
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


def matmul_shapes(fn: Callable[[], object]) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matrix product `fn()` runs."""
    with _MatmulShapes() as rec:
        fn()
    return rec.shapes


def bench_mapper(batch: int, repeats: int, device: str) -> dict:
    from model.mapper import DeltaMapper

    torch.manual_seed(0)
    layout = official_layout()
    mapper = DeltaMapper(layout, CLIP_DIM).to(device).eval().requires_grad_(False)
    official = straightforward(mapper).to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(batch, layout.conv_dim, generator=g).to(device)
    c = torch.randn(batch, CLIP_DIM, generator=g).to(device)
    dt = torch.randn(CLIP_DIM, generator=g)
    target = [TargetDelta("t", dt / dt.norm(), 1.0, torch.ones(layout.conv_dim, dtype=bool))]
    # the bare matmuls of one forward: the (M, K, N) of every matmul the mapper runs,
    # recorded at dispatch (the official forward's too, for its FLOPs)
    with torch.inference_mode():
        shapes = matmul_shapes(lambda: mapper_delta(mapper, s, c, target))
        official_shapes = matmul_shapes(lambda: mapper_delta(official, s, c, target))
    weights = [
        (torch.randn(m, k, device=device), torch.randn(n, k, device=device)) for m, k, n in shapes
    ]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    official_flops = sum(2 * m * k * n for m, k, n in official_shapes)

    def run(model: Callable, precision: str) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode(), autocast(device, precision):
                mapper_delta(model, s, c, target)

        return go

    def bare(dtype: torch.dtype, onednn: bool = False) -> Callable[[], None]:
        cast = [(x.to(dtype), w.to(dtype)) for x, w in weights]
        linear = F.linear
        if onednn:  # the kernel the fp32 CPU mapper calls, without bias or activation

            def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

        def go() -> None:
            with torch.inference_mode():
                for x, w in cast:
                    linear(x, w)

        return go

    onednn = device == "cpu" and torch.backends.mkldnn.is_available()
    t = timed(
        {
            "fp32": run(mapper, "fp32"),
            "bf16": run(mapper, "bf16"),
            "official fp32": run(official, "fp32"),
            "bare fp32": bare(torch.float32),
            **({"bare fp32 onednn": bare(torch.float32, True)} if onednn else {}),
            "bare bf16": bare(torch.bfloat16),
        },
        repeats,
        device,
    )
    with torch.inference_mode():
        d32 = mapper_delta(mapper, s, c, target).float()
        with autocast(device, "bf16"):
            d16 = mapper_delta(mapper, s, c, target).float()
    rel = ((d16 - d32).norm(dim=1) / d32.norm(dim=1).clamp_min(1e-12)).cpu().numpy()
    k = 0 if device.startswith("cuda") else 1  # CPU: per process-CPU-second
    return {
        "t": t,
        "k": k,
        "batch": batch,
        "flops": flops,
        "official_flops": official_flops,
        "rel_median": float(np.median(rel)),
        "rel_max": float(rel.max()),
    }


def bench_train_step(repeats: int, steps: int, device: str) -> dict:
    from model.mapper import DeltaMapper

    torch.manual_seed(0)
    layout = official_layout()
    mapper = DeltaMapper(layout, CLIP_DIM).to(device)
    opt = make_optimizer(mapper, 0.5, device)
    g = torch.Generator().manual_seed(2)
    s = torch.randn(64, layout.conv_dim, generator=g).to(device)
    cond = make_cond(*(torch.randn(64, CLIP_DIM, generator=g).to(device) for _ in range(2)))
    target = torch.randn(64, layout.conv_dim, generator=g).to(device)

    def run(precision: str) -> Callable[[], None]:
        def go() -> None:
            for _ in range(steps):
                with autocast(device, precision):
                    pred = mapper(s, cond)
                loss, _, _ = mapper_loss(pred.float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return go

    return {"t": timed({"fp32": run("fp32"), "bf16": run("bf16")}, repeats, device), "n": steps}


def bench_generator(name: str, G, batch: int, n: int, repeats: int, device: str) -> dict:
    G = G.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.randn(n, G.config.in_dim, generator=torch.Generator().manual_seed(3))
        s = G.w_to_s(G.wplus(G.mapping(z.to(device)))).cpu().numpy()
    imgs: dict[str, np.ndarray] = {}

    def run(precision: str) -> Callable[[], None]:
        def go() -> None:
            imgs[precision] = render_s(G, s, batch, device, "const", precision)

        return go

    t = timed({"fp32": run("fp32"), "bf16": run("bf16")}, repeats, device)
    return {"name": name, "t": t, "n": n, "psnr": psnr(imgs["fp32"], imgs["bf16"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 4 images at 256 px")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--batch", type=int, default=1024, help="mapper inference batch")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", choices=["mapper"], help="part A alone")
    args = ap.parse_args()
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    if device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        print(f"device: cpu, {torch.get_num_threads()} torch threads")

    m = bench_mapper(args.batch, repeats, device)
    t, k, b = m["t"], m["k"], m["batch"]
    clock = "CPU-s" if k else "wall"

    def rate(name: str) -> float:
        return b / t[name][k]

    print(f"A. mapper inference, official size, batch {b} ({clock}):")
    for name in ("fp32", "bf16", "official fp32"):
        print(f"   {name:14s} {rate(name):10,.0f} latents/s (wall {b / t[name][0]:,.0f})")
    # the fp32 roofline: the faster bare matmul (MKL's F.linear or oneDNN's, on the CPU)
    bare32 = min(t[name][k] for name in ("bare fp32", "bare fp32 onednn") if name in t)
    if "bare fp32 onednn" in t:
        mkl, dnn = (m["flops"] / t[name][k] / 1e9 for name in ("bare fp32", "bare fp32 onednn"))
        print(f"   bare fp32 matmul: F.linear (MKL) {mkl:.1f} GFLOP/{clock}, oneDNN {dnn:.1f}")
    roof32, roof16 = m["flops"] / bare32, m["flops"] / t["bare bf16"][k]
    print(
        f"   bare-matmul roofline: fp32 {roof32 / 1e9:.1f} GFLOP/{clock}, bf16 "
        f"{roof16 / 1e9:.1f} ({roof16 / roof32:.1f}x fp32), on the matmuls the mapper runs: "
        f"{m['flops'] / b / 1e6:.1f} MFLOP per latent (the official forward "
        f"{m['official_flops'] / b / 1e6:.1f})"
    )
    print(
        f"   fp32 path = {bare32 / t['fp32'][k]:.2f} of the fp32 roofline "
        f"(target >= 0.85); bf16 path = {t['bare bf16'][k] / t['bf16'][k]:.2f} of the bf16 one"
    )
    print(
        f"   bf16 / fp32 = {rate('bf16') / rate('fp32'):.2f}x; bf16 / official fp32 = "
        f"{rate('bf16') / rate('official fp32'):.2f}x (target >= 2x); fp32 / official = "
        f"{rate('fp32') / rate('official fp32'):.2f}x"
    )
    print(
        f"   relative error of the mapped delta, bf16 vs fp32: median {m['rel_median']:.2e}, "
        f"max {m['rel_max']:.2e}"
    )

    if args.only == "mapper":
        return
    tr = bench_train_step(repeats, 2 if args.quick else 5, device)
    tt, n = tr["t"], tr["n"]
    print(
        f"B. train step, batch 64: fp32 {n / tt['fp32'][k]:.2f} steps/{clock}, bf16 "
        f"{n / tt['bf16'][k]:.2f} ({tt['fp32'][k] / tt['bf16'][k]:.2f}x)"
    )

    from model.stylegan2 import config_f, create_generator, load_generator

    world = ROOT / "weights/world/generator.safetensors"
    gens = [("world", load_generator(world), 32, 64, repeats)]
    if args.quick:
        gens.append(("256 px config-f", create_generator(config_f(256)), 4, 4, 1))
    else:
        gens.append(("256 px config-f", create_generator(config_f(256)), 8, 16, repeats))
    print("C. generator synthesis:")
    for name, G, batch, n_img, rep in gens:
        r = bench_generator(name, G, batch, n_img, rep, device)
        tg = r["t"]
        print(
            f"   {name} (batch {batch}): fp32 {n_img / tg['fp32'][k]:.2f} img/{clock}, bf16 "
            f"{n_img / tg['bf16'][k]:.2f} ({tg['fp32'][k] / tg['bf16'][k]:.2f}x); PSNR of "
            f"bf16 renders vs fp32 {r['psnr']:.1f} dB"
        )


if __name__ == "__main__":
    main()
