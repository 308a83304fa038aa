"""Encoder passes: throughput of the stages against baselines measured in the same run.

encode-clip, end to end (read + decode + preprocess + model + store write, one block
at a time, decoding prefetched in threads), over a folder of 256 px JPEGs, against
  (a) the pure model forward on already-decoded, preprocessed tensors (target >= 0.85x)
  (b) a plain loop: torch DataLoader (decode + preprocess) + model + np.save (target >= 1.0x)
for the tiny CLIP and ViT-B-32 (random weights, same architecture as OpenAI's).

sample, end to end (z -> S -> render -> CLIP -> three stores), against
  (a) the same model calls on pre-drawn z with no store (target >= 0.85x)
  (b) a plain loop of the same calls + np.save (target >= 1.0x)
for the tiny generator and a 256 px generator.

Prints images/s (median of repeats) and the ratios. `--quick` = fewer images.
    .venv/bin/python bench/bench_encode.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.clip import get_config, register_config
from model.stylegan2 import GeneratorConfig, create_generator, save_generator
from stages.common import ClipRef, ExecutionConfig, GeneratorRef, resolve_device
from stages.encode_clip import EncodeClipConfig, run_encode_clip
from stages.execution import load_clip_ref, load_generator_ref
from stages.ingest import IngestConfig, run_ingest
from stages.sample import SampleConfig, run_sample, sample_z

VIT = "bench-vit-b-32"  # ViT-B-32-quickgelu architecture, random weights (no download)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], n: int, repeats: int, device: str = "cpu"
) -> dict[str, float]:
    """images/s of each fn, median of `repeats` rounds; each round runs every fn once, so a
    slow spell of a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: n / statistics.median(v) for k, v in times.items()}


def make_jpegs(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth color fields plus fine noise, quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        img = np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], prepare: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.prepare = paths, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.prepare(im.convert("RGB"))


def bench_encode_clip(
    label: str, ref: ClipRef, n: int, batch: int, repeats: int, tmp: Path, device: str = "cpu"
) -> dict[str, float]:
    paths = make_jpegs(tmp / f"jpegs-{n}", n)
    ds = tmp / f"ds-{label}"
    run_ingest(
        IngestConfig(source=str(paths[0].parent), out=str(ds)), ExecutionConfig(), progress=False
    )
    execution = ExecutionConfig(device=device, workers=1, batch_size=batch)
    cfg = EncodeClipConfig(dataset=str(ds))  # decode threads auto: sized from the cores
    clip = load_clip_ref(ref, device)

    def e2e() -> None:
        run_encode_clip(cfg, ref, execution, overwrite=True, progress=False)

    def prepare(im: Image.Image) -> torch.Tensor:
        return clip.preprocess_pil([im], ref.preprocessing)[0]

    tensors = [prepare(Image.open(p).convert("RGB")) for p in paths]
    batches = [torch.stack(tensors[i : i + batch]).to(device) for i in range(0, n, batch)]

    def model_only() -> None:
        with torch.no_grad():
            for x in batches:
                clip.model.encode_image(x)

    def plain_loop() -> None:
        loader = torch.utils.data.DataLoader(_Files(paths, prepare), batch_size=batch)
        out = []
        with torch.no_grad():
            for x in loader:
                out.append(clip.model.encode_image(x.to(device)).cpu().numpy())
        np.save(tmp / "plain.npy", np.concatenate(out))

    e2e()  # warm-up: model in cache, kernels initialized
    model_only()
    fns = {"e2e": e2e, "model": model_only, "plain": plain_loop}
    return interleaved(fns, n, repeats, device)


def bench_sample(
    label: str, gref: GeneratorRef, n: int, batch: int, repeats: int, tmp: Path, device: str = "cpu"
) -> dict[str, float]:
    cref = ClipRef()
    G = load_generator_ref(gref, device)
    clip = load_clip_ref(cref, device)
    execution = ExecutionConfig(device=device, workers=1, batch_size=batch)
    cfg = SampleConfig(n=n, out=str(tmp / f"sample-{label}"))  # default rows_per_shard
    z_all = torch.from_numpy(sample_z(0, range(n), G.config.in_dim)).to(device)

    def models(z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            s = G.w_to_s(G.wplus(G.mapping(z)))
            c = clip.encode_images(G.synthesize(s).clamp(-1, 1), cref.preprocessing)
        return s.cpu().numpy(), c.cpu().numpy()

    def e2e() -> None:
        run_sample(cfg, gref, cref, execution, overwrite=True, progress=False)

    def model_only() -> None:
        for i in range(0, n, batch):
            models(z_all[i : i + batch])

    def plain_loop() -> None:
        ss, cs = [], []
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), G.config.in_dim, device=device)
            s, c = models(z)
            ss.append(s)
            cs.append(c)
        np.save(tmp / "s.npy", np.concatenate(ss))
        np.save(tmp / "c.npy", np.concatenate(cs))

    e2e()
    fns = {"e2e": e2e, "model": model_only, "plain": plain_loop}
    return interleaved(fns, n, repeats, device)


def report(name: str, r: dict[str, float]) -> None:
    a, b = r["e2e"] / r["model"], r["e2e"] / r["plain"]
    print(
        f"{name:<34} stage {r['e2e']:8.1f} img/s | model-only {r['model']:8.1f} img/s -> "
        f"{a:.2f}x (target >= 0.85) | plain loop {r['plain']:8.1f} img/s -> {b:.2f}x "
        f"(target >= 1.0)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--only", choices=["clip", "sample"], help="run one half")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    register_config(VIT, get_config("ViT-B-32-quickgelu"), overwrite=True)
    repeats = 3
    n_tiny, n_vit, n_s_tiny, n_s_256 = (256, 24, 512, 24) if args.quick else (512, 512, 2048, 128)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, repeats {repeats} (median)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only != "sample":
            r = bench_encode_clip("tiny", ClipRef(), n_tiny, 64, repeats, tmp, device)
            report(f"encode-clip tiny ({n_tiny} jpeg 256px)", r)
            r = bench_encode_clip("vit", ClipRef(name=VIT), n_vit, 16, repeats, tmp, device)
            report(f"encode-clip ViT-B-32 ({n_vit} jpeg)", r)
        if args.only == "clip":
            return
        r = bench_sample("tiny", GeneratorRef(), n_s_tiny, 64, repeats, tmp, device)
        report(f"sample tiny-64 ({n_s_tiny} rows)", r)
        g256 = GeneratorConfig(
            256, 128, 2, {4: 128, 8: 128, 16: 128, 32: 64, 64: 64, 128: 32, 256: 16}
        )
        save_generator(create_generator(g256, seed=0), tmp / "g256.safetensors")
        ref256 = GeneratorRef(path=str(tmp / "g256.safetensors"))
        r = bench_sample("g256", ref256, n_s_256, 8, repeats, tmp, device)
        report(f"sample 256px ({n_s_256} rows)", r)


if __name__ == "__main__":
    main()
