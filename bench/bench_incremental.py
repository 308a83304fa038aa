"""Incremental datasets: an update after a folder changed vs a from-scratch pass on it.

For a dataset of N images (ingest + encode-clip + encode-s through the `deltaedit` CLI,
one process per stage, so process start and model load count), three changes:

    +1%        N/100 images added
    +10%       N/10 images added
    1% mix     N/300 removed, N/300 added, N/300 changed under the same name

Each is timed as an incremental update (the base store copied, the stages rerun on the
changed folder) and as a from-scratch run on the changed folder, measured in the same
run. The fixed cost (the same three stages rerun on the unchanged base store: process
start, hashing the folder; no model is imported when nothing changed) is printed, and the
fixed cost of a pass that does encode rows (imports + model loads, measured in the same
run) is taken out in the second ratio:

    end to end   = update / from scratch
    fixed out    = (update - startup) / (from scratch - startup)

and, per change, the seconds of each stage process of the update (where its time goes).
Every model call runs on exactly execution.batch_size rows (padded, for bitwise-equal
stores), so an update that computes k rows pays for ceil(k / batch_size) full batches.

Presets:
    world     the shapes world (32 px renders, the committed world models), N = 4096
    encoders  ViT-B-32-size CLIP + 256 px config-f generator + IR-SE50 e4e at random
              weights, 256 px noise images, N = 2048 (use a GPU: --device cuda)

    python bench/bench_incremental.py --preset world
    python bench/bench_incremental.py --preset encoders --n 256   # a CPU-sized run
    python bench/bench_incremental.py --preset encoders --changes +1%   # one change per sitting
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COUNTS = re.compile(r"^(ingest|encode-clip|encode-s): rows reused (\d+), computed (\d+)", re.M)


def world_images(pool: Path, n: int) -> list[Path]:
    from stages.world.render import WorldConfig
    from stages.world.render import run as render

    render(WorldConfig(n_images=n, seed=0), pool, progress=False)
    return sorted(pool.glob("*.png"))


def noise_images(pool: Path, n: int, size: int = 256) -> list[Path]:
    pool.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        # smooth noise (upsampled), so the files are image-like in size and decode cost
        small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        path = pool / f"{i:06d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def world_params(device: str) -> dict:
    w = ROOT / "weights" / "world"
    return {
        "generator": {"path": str(w / "generator.safetensors")},
        "e4e": {"path": str(w / "e4e.safetensors")},
        "clip": {"name": "world-clip", "weights": str(w / "clip.safetensors")},
        "execution": {"device": device, "workers": 2, "batch_size": 64},
    }


def encoder_params(device: str, weights: Path) -> dict:
    """Random-weight ViT-B-32 CLIP, config-f 256 px generator and its IR-SE50 e4e, saved to
    files so the CLI processes load them as they would real weights."""
    import torch

    from model.clip import get_config, load_clip, register_config, save_clip
    from model.e4e import E4E, E4EConfig, save_e4e
    from model.stylegan2 import create_generator, save_generator

    weights.mkdir(parents=True, exist_ok=True)
    register_config("bench-vit-b-32", get_config("ViT-B-32-quickgelu"), overwrite=True)
    save_clip(load_clip("bench-vit-b-32", seed=0), weights / "clip.safetensors")
    G = create_generator("config-f-256", seed=0)
    save_generator(G, weights / "generator.safetensors")
    torch.manual_seed(0)
    enc = E4E(E4EConfig(n_latent=G.n_latent, w_dim=G.w_dim)).eval()
    save_e4e(enc, weights / "e4e.safetensors")
    return {
        "generator": {"path": str(weights / "generator.safetensors")},
        "e4e": {"path": str(weights / "e4e.safetensors")},
        "clip": {"name": "bench-vit-b-32", "weights": str(weights / "clip.safetensors")},
        "execution": {"device": device, "workers": 1, "batch_size": 32},
    }


def stages(
    src: Path, ds: Path, params: Path, each: dict[str, float] | None = None
) -> tuple[float, dict[str, tuple[int, int]]]:
    """ingest + encode-clip + encode-s as three CLI processes: (seconds, per-stage counts);
    `each` (when given) gets each stage's seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "pipeline"]
    cmds = [
        [*base, "ingest", str(src), "--out", str(ds)],
        [*base, "encode-clip", "--dataset", str(ds)],
        [*base, "encode-s", "--dataset", str(ds)],
    ]
    counts: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    for cmd in cmds:
        t_stage = time.perf_counter()
        proc = subprocess.run(
            [*cmd, "-q", "--params", str(params)], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[3:5])} failed:\n{proc.stdout}\n{proc.stderr}")
        if each is not None:
            each[cmd[3]] = time.perf_counter() - t_stage
        for stage, reused, computed in COUNTS.findall(proc.stdout):
            counts[stage] = (int(reused), int(computed))
    return time.perf_counter() - start, counts


STARTUP = """
import sys, yaml
from pipeline.params import section
from stages.common import ClipRef, E4ERef, GeneratorRef
from stages.execution import load_clip_ref, load_e4e_ref, load_generator_ref
import stages.encode_clip, stages.encode_s, stages.ingest
p = yaml.safe_load(open(sys.argv[1]))
dev = p["execution"]["device"]
load_clip_ref(section(p, "clip", ClipRef), dev)
load_generator_ref(section(p, "generator", GeneratorRef), dev)
load_e4e_ref(section(p, "e4e", E4ERef), dev)
"""


def startup(params: Path) -> float:
    """Seconds to start the three stage processes' worth of imports and model loads (what
    any pass that encodes rows pays before its first row), measured as one process each."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    for _ in range(2):  # ingest has no model: two processes import torch and load models
        subprocess.run([sys.executable, "-c", STARTUP, str(params)], env=env, check=True)
    return time.perf_counter() - start


def folder(dst: Path, files: list[Path], changed: dict[str, Path] | None = None) -> Path:
    """dst holding `files` (hard links), plus `changed` names whose bytes come from others."""
    dst.mkdir(parents=True)
    for f in files:
        os.link(f, dst / f.name)
    for name, other in (changed or {}).items():
        (dst / name).unlink()
        shutil.copyfile(other, dst / name)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=["world", "encoders"], default="world")
    ap.add_argument("--n", type=int, default=None, help="base images (world 4096, encoders 2048)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows-per-shard", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="execution.batch_size")
    ap.add_argument(
        "--changes",
        default=",".join(CHANGES),
        help="which changes to time, comma-separated (each costs an update and a from-scratch "
        "pass: on CPU with the encoders preset, run them in separate sittings)",
    )
    args = ap.parse_args()
    wanted = [c.strip() for c in args.changes.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHANGES))
    if unknown:
        ap.error(f"--changes: unknown {unknown}; choose from {', '.join(CHANGES)}")
    n = args.n or (4096 if args.preset == "world" else 2048)
    extra = n // 10 + n // 100 + 2
    with tempfile.TemporaryDirectory(prefix="bench-incr-") as tmp_str:
        tmp = Path(tmp_str)
        t0 = time.perf_counter()
        if args.preset == "world":
            pool = world_images(tmp / "pool", n + extra)
            params = world_params(args.device)
        else:
            pool = noise_images(tmp / "pool", n + extra)
            params = encoder_params(args.device, tmp / "weights")
        params["ingest"] = {"rows_per_shard": args.rows_per_shard}
        if args.batch_size:
            params["execution"]["batch_size"] = args.batch_size
        params_path = tmp / "params.yaml"
        params_path.write_text(yaml.safe_dump(params))
        print(f"preset {args.preset}: {n} base images, made in {time.perf_counter() - t0:.1f} s")

        base_files, spare = pool[:n], pool[n:]
        base_src = folder(tmp / "src-base", base_files)
        base_ds = tmp / "ds-base"
        t_base, _ = stages(base_src, base_ds, params_path)
        t_fixed, counts = stages(base_src, base_ds, params_path)  # unchanged: the fixed cost
        t_start = startup(params_path)
        print(f"from scratch on the base folder: {t_base:.1f} s", flush=True)
        print(f"rerun on the unchanged store: {t_fixed:.1f} s  {counts}")
        print(
            f"fixed cost of a pass that encodes rows (imports + model load): {t_start:.1f} s",
            flush=True,
        )

        k = max(1, n // 300)
        scenarios = {
            "+1%": folder(tmp / "src-1", base_files + spare[: max(1, n // 100)]),
            "+10%": folder(tmp / "src-10", base_files + spare[: max(1, n // 10)]),
            "1% mix": folder(
                tmp / "src-mix",
                base_files[k:] + spare[:k],
                {base_files[k + i].name: spare[k + i] for i in range(k)},
            ),
        }
        print(
            f"{'change':<8} {'update s':>9} {'scratch s':>10} {'end to end':>11} "
            f"{'fixed out':>10}  rows computed (ingest / clip / s)"
        )
        per_stage: dict[str, dict[str, float]] = {}
        for name, src in scenarios.items():
            if name not in wanted:
                continue
            ds = tmp / f"ds-{name}"
            shutil.copytree(base_ds, ds)
            per_stage[name] = {}
            t_update, counts = stages(src, ds, params_path, per_stage[name])
            t_scratch, _ = stages(src, tmp / f"fresh-{name}", params_path)
            ratio = t_update / t_scratch
            net = (t_update - t_start) / max(t_scratch - t_start, 1e-9)
            done = " / ".join(str(counts.get(s, ("?", "?"))[1]) for s in COUNTS_ORDER)
            cells = f"{t_update:>9.1f} {t_scratch:>10.1f} {ratio:>11.3f} {net:>10.3f}"
            print(f"{name:<8} {cells}  {done}", flush=True)
        print("where an update's time goes (seconds per stage process):")
        for name, each in per_stage.items():
            print(f"  {name:<8} " + ", ".join(f"{k} {v:.1f}" for k, v in each.items()))


COUNTS_ORDER = ("ingest", "encode-clip", "encode-s")
CHANGES = ("+1%", "+10%", "1% mix")  # the scenarios main() builds, in this order

if __name__ == "__main__":
    main()
