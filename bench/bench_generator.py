"""Generator synthesis speed: images/s, peak memory, convolution FLOPs and roofline.

For a 256 px and a 1024 px config-f generator (random weights, batch 4) it prints,
all measured in the same run (median of repeats, wall clock):

- `synthesize(s)` images/s and peak memory (CUDA: max allocated; CPU: peak RSS growth
  of a fresh child process during the first call);
- the modulated/transposed/1x1 convolution FLOPs per image and the achieved GFLOP/s
  (on CPU per process-CPU-second: the 2-core machine is shared, CPU time is what our
  threads actually got; all ratios use the same clock);
- the roofline: the same convolutions as bare `F.conv2d` / `F.conv_transpose2d` calls
  on the same shapes (no modulation, blur, noise or activation), the faster memory
  format per layer, and the ratio achieved / roofline (target >= 0.5 at 256 px on CPU);
- a straightforward per-sample grouped-weight implementation (weights modulated per
  sample, `groups=B`, contiguous NCHW) as a baseline: its time and speedup, and the
  max |difference| of its images from `synthesize`;
- S path vs W+ path: time(synthesize_w) / time(synthesize) (target >= 0.98).

    .venv/bin/python bench/bench_generator.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.stylegan2 import Generator, config_f, create_generator  # noqa: E402
from stages.common import autocast  # noqa: E402
from stages.execution import CompiledGenerator  # noqa: E402

SQRT2 = math.sqrt(2.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rounds(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Interleaved timing: each round runs every fn once, so load from other processes
    hits all of them alike. Returns name -> (median wall s, median process CPU s).
    A fn may return its own (wall, cpu) to count only part of its work."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            w0, c0 = clock()
            own = fn()
            sync(device)
            w1, c1 = clock()
            out[name].append(own if isinstance(own, tuple) else (w1 - w0, c1 - c0))
    med = {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
        for k, v in out.items()
    }
    med["_raw"] = out  # type: ignore[assignment]
    return med


def conv_shapes(G: Generator) -> list[tuple[str, int, int, int, int]]:
    """(op, C_in, C_out, k, H_in) of every convolution in synthesis order."""
    out = []
    res = 4
    for la, m in zip(G.layout.layers, G.styled, strict=True):
        w = m.conv.weight  # [1, C_out, C_in, k, k]
        c_out, c_in, k = w.shape[1], w.shape[2], w.shape[-1]
        if getattr(m.conv, "upsample", False):
            out.append(("conv_transpose2d", c_in, c_out, k, la.resolution // 2))
        else:
            out.append(("conv2d", c_in, c_out, k, la.resolution))
        res = la.resolution
    del res
    return out


def flops_per_image(shapes) -> float:
    # transposed conv: every input pixel meets the full k x k x C_out kernel
    return float(sum(2 * ci * co * k * k * h * h for _, ci, co, k, h in shapes))


def bare_convs(shapes, batch: int, device: torch.device, memory_format) -> tuple[float, float]:
    """Time (wall, CPU) of the bare convolutions of `shapes`, inputs made outside the clock."""
    wall = cpu = 0.0
    for op, ci, co, k, h in shapes:
        x = torch.randn(batch, ci, h, h, device=device).contiguous(memory_format=memory_format)
        w = torch.randn(co, ci, k, k, device=device) if op == "conv2d" else None
        wt = torch.randn(ci, co, k, k, device=device) if op != "conv2d" else None
        sync(device)
        w0, c0 = clock()
        if op == "conv2d":
            F.conv2d(x, w, padding=k // 2)
        else:
            F.conv_transpose2d(x, wt, stride=2)
        sync(device)
        w1, c1 = clock()
        wall, cpu = wall + w1 - w0, cpu + c1 - c0
    return wall, cpu


def grouped_synthesize(G: Generator, s: torch.Tensor) -> torch.Tensor:
    """Baseline: per-sample modulated weights, grouped conv (rosinality's fused path)."""
    B = s.shape[0]
    styles = G.split_s(s)
    fir = G.fir
    x = G.input.input.expand(B, -1, -1, -1)
    img = None
    noises = [getattr(G.noises, f"noise_{j}") for j in range(2 * len(G.to_rgbs) + 1)]
    j = 0
    for m, st in zip(G.styled, styles, strict=True):
        conv = m.conv
        w = conv.weight * conv.scale * st[:, None, :, None, None]  # [B, O, I, k, k]
        o, i, k = w.shape[1], w.shape[2], w.shape[-1]
        if conv.demodulate:
            w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4)) + 1e-8)[:, :, None, None, None]
        h = x.shape[-1]
        if conv.demodulate:
            if conv.upsample:
                wt = w.transpose(1, 2).reshape(B * i, o, k, k)
                y = F.conv_transpose2d(x.reshape(1, B * i, h, h), wt, stride=2, groups=B)
                y = y.view(B, o, *y.shape[2:])
                kf = torch.flip(fir, (0, 1))[None, None].expand(o, 1, 4, 4)
                y = F.conv2d(F.pad(y, (1, 1, 1, 1)), kf, groups=o)
            else:
                y = F.conv2d(
                    x.reshape(1, B * i, h, h), w.reshape(B * o, i, k, k), padding=1, groups=B
                )
                y = y.view(B, o, h, h)
            y = y + m.noise.weight * noises[j]
            j += 1
            x = F.leaky_relu(y + m.activate.bias[None, :, None, None], 0.2) * SQRT2
        else:
            rgb = F.conv2d(x.reshape(1, B * i, h, h), w.reshape(B * o, i, 1, 1), groups=B)
            rgb = rgb.view(B, o, h, h) + m.bias
            if img is not None:
                up = F.conv_transpose2d(
                    img, fir[None, None].expand(3, 1, 4, 4), stride=2, padding=1, groups=3
                )
                rgb = rgb + up
            img = rgb
    return img


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two renders in [-1, 1] as uint8 images (what render writes)."""

    def u8(x: torch.Tensor) -> torch.Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round()

    mse = float(((u8(a) - u8(b)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def bench_one(
    name: str,
    resolution: int,
    batch: int,
    quick: bool,
    device: torch.device,
    compile_: bool = False,
    bf16: bool = False,
) -> dict:
    torch.manual_seed(0)
    G = create_generator(config_f(resolution), seed=0).to(device).eval()
    wplus = torch.randn(batch, G.n_latent, G.w_dim, device=device)
    big = resolution >= 1024
    reps = 1 if (quick and big) else (3 if quick else 5)
    shapes = conv_shapes(G)
    fl = flops_per_image(shapes) * batch
    with torch.no_grad():
        s = G.w_to_s(wplus)
        # peak memory of the first call (fresh process on CPU)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = rss_kib()
        img = G.synthesize(s)
        if device.type == "cuda":
            peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        fns = {
            "S": lambda: G.synthesize(s),
            "W+": lambda: G.synthesize_w(wplus),
            "bare NCHW": lambda: bare_convs(shapes, batch, device, torch.contiguous_format),
            "bare NHWC": lambda: bare_convs(shapes, batch, device, torch.channels_last),
        }
        with_baseline = not (quick and big)
        if with_baseline:
            base_img = grouped_synthesize(G, s)
            fns["grouped"] = lambda: grouped_synthesize(G, s)
        if compile_:  # execution.compile: torch.compile (CUDA graphs on a GPU), guarded
            Gc = CompiledGenerator(G, str(device))
            for _ in range(3):  # compile, then (reduce-overhead) record the graph
                compiled_img = Gc.synthesize(s)
            fns["S compiled"] = lambda: Gc.synthesize(s)
        if bf16:  # execution.precision: bf16
            with autocast(str(device), "bf16"):
                bf16_img = G.synthesize(s).float()

            def synth_bf16() -> None:
                with autocast(str(device), "bf16"):
                    G.synthesize(s)

            fns["S bf16"] = synth_bf16
        for fn in fns.values():  # warm-up
            fn()
        t = rounds(fns, reps, device)
        # S vs W+: paired per round (both ran back to back), plus more pairs: robust to load
        extra = rounds({"S": fns["S"], "W+": fns["W+"]}, 2 if (quick and big) else 4, device)
        k = 0 if device.type == "cuda" else 1
        pairs = [
            w[k] / s_[k]
            for raw in (t["_raw"], extra["_raw"])
            for s_, w in zip(raw["S"], raw["W+"], strict=True)
        ]
        t_w2s = rounds({"w_to_s": lambda: G.w_to_s(wplus)}, 5, device)["w_to_s"]
    # k: 0 = wall (CUDA), 1 = process CPU seconds (CPU: robust to other processes' load)
    t_s, t_roof = t["S"][k], min(t["bare NCHW"][k], t["bare NHWC"][k])
    result = {
        "config": name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "repeats": reps,
        "clock": "wall" if k == 0 else "process CPU time",
        "wall_synthesize_s": t["S"][0],
        "images_per_s": batch / t["S"][0],
        "peak_mib": peak_mib,
        "t_synthesize": t_s,
        "t_synthesize_w": t["W+"][k],
        "s_vs_wplus": statistics.median(pairs),
        "s_vs_wplus_pairs": len(pairs),
        "w_to_s_share": t_w2s[k] / t_s,
        "gflop_per_image": fl / batch / 1e9,
        "achieved_gflops": fl / t_s / 1e9,
        "roofline_gflops": fl / t_roof / 1e9,
        "roofline_nchw_gflops": fl / t["bare NCHW"][k] / 1e9,
        "roofline_nhwc_gflops": fl / t["bare NHWC"][k] / 1e9,
        "fraction_of_roofline": t_roof / t_s,
    }
    if compile_:
        result.update(
            compiled_eager=bool(Gc._eager),
            compiled_fraction_of_roofline=t_roof / t["S compiled"][k],
            compiled_speedup=t_s / t["S compiled"][k],
            compiled_max_abs_diff=float((compiled_img - img).abs().max()),
        )
    if bf16:
        result.update(
            bf16_speedup=t_s / t["S bf16"][k],
            bf16_psnr_db=psnr_db(img, bf16_img),
        )
    if with_baseline:
        result.update(
            t_grouped_baseline=t["grouped"][k],
            speedup_vs_grouped=t["grouped"][k] / t_s,
            grouped_fraction_of_roofline=t_roof / t["grouped"][k],
            max_abs_diff_vs_grouped=float((base_img - img).abs().max()),
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="few repeats; 1024 px: 1 repeat, no baseline"
    )
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolutions", default="256,1024")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--compile", action="store_true", help="also time execution.compile")
    ap.add_argument("--bf16", action="store_true", help="also time execution.precision bf16")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: one resolution, JSON out
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if dev == "auto" else dev)

    if args.one:
        res = int(args.one)
        row = bench_one(
            f"config-f-{res}", res, args.batch, args.quick, device, args.compile, args.bf16
        )
        print(json.dumps(row))
        return

    rows = []
    for res in [int(r) for r in args.resolutions.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(res), "--batch", str(args.batch)]
        cmd += ["--device", str(device)] + (["--quick"] if args.quick else [])
        cmd += (["--compile"] if args.compile else []) + (["--bf16"] if args.bf16 else [])
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        unit = "GFLOP/s" if row["clock"] == "wall" else "GFLOP per CPU-second"
        print(
            f"{row['config']} batch {row['batch']} on {row['device']} ({row['threads']} threads, "
            f"median of {row['repeats']} interleaved rounds; ratios in {row['clock']}):\n"
            f"  synthesize(s): {row['wall_synthesize_s']:.3f} s wall = "
            f"{row['images_per_s']:.2f} img/s, peak memory +{row['peak_mib']:.0f} MiB\n"
            f"  conv FLOPs {row['gflop_per_image']:.1f} GFLOP/img, achieved "
            f"{row['achieved_gflops']:.1f} {unit}; bare-conv roofline "
            f"{row['roofline_gflops']:.1f} {unit} (NCHW {row['roofline_nchw_gflops']:.1f}, "
            f"NHWC {row['roofline_nhwc_gflops']:.1f}) -> {row['fraction_of_roofline']:.2f} "
            f"of roofline\n"
            f"  S path vs W+ path: t(W+)/t(S) = {row['s_vs_wplus']:.3f} (median of "
            f"{row['s_vs_wplus_pairs']} back-to-back pairs); w_to_s alone = "
            f"{row['w_to_s_share']:.4f} of synthesize"
        )
        if "t_grouped_baseline" in row:
            print(
                f"  grouped per-sample baseline: {row['t_grouped_baseline']:.3f} s "
                f"({row['grouped_fraction_of_roofline']:.2f} of roofline); speedup "
                f"{row['speedup_vs_grouped']:.2f}x; max |diff| {row['max_abs_diff_vs_grouped']:.2e}"
            )
        if "compiled_speedup" in row:
            fell = " (compile failed: eager)" if row["compiled_eager"] else ""
            print(
                f"  execution.compile{fell}: {row['compiled_speedup']:.2f}x eager, "
                f"{row['compiled_fraction_of_roofline']:.2f} of roofline; max |diff| "
                f"{row['compiled_max_abs_diff']:.2e}"
            )
        if "bf16_speedup" in row:
            print(
                f"  execution.precision bf16: {row['bf16_speedup']:.2f}x fp32; PSNR vs fp32 "
                f"{row['bf16_psnr_db']:.1f} dB"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
