"""The data path of the stages on its own: stage throughput vs model-only vs data-only.

For encode-clip, encode-s, sample and render on the tiny configs (where the model is
cheap, so the data path shows), in the same run, median of interleaved repeats:

- stage: the stage end to end (`run_encode_clip`, `run_encode_s`, `run_sample`,
  `stages.render.run`), block tasks in one worker (the staged runner overlaps a block's
  store reads and writes with the neighbouring block's compute);
- model-only: the same model calls on inputs already decoded and in memory, no store;
- data-only: the same stage with a null model (outputs of the right shape, no work):
  listing, reading, decoding, preprocessing, store/file writes;
- ratio stage / min(model-only, data-only) (target >= 0.85), and the serial bound
  1 / (1/model + 1/data) a pass without overlap would reach.

On a 2-core CPU the data path and the model share the cores, so overlap can only hide
the part of either that waits (I/O, GIL-free decode while the model waits on memory).

    .venv/bin/python bench/bench_datapath.py --quick
    .venv/bin/python bench/bench_datapath.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_encode import interleaved, make_jpegs  # noqa: E402

from stages.common import (  # noqa: E402
    ClipRef,
    E4ERef,
    ExecutionConfig,
    GeneratorRef,
    cores,
    resolve_device,
)
from stages.encode_clip import EncodeClipConfig, clip_inputs, clip_pixels, run_encode_clip  # noqa: E402
from stages.encode_s import EncodeSConfig, e4e_pixels, run_encode_s  # noqa: E402
from stages.execution import (  # noqa: E402
    cached,
    for_workers,
    load_clip_ref,
    load_e4e_ref,
    load_generator_ref,
)
from stages.ingest import IngestConfig, run_ingest  # noqa: E402
from stages.sample import SampleConfig, run_sample, sample_z  # noqa: E402

NULL_SEED = 987654  # the refs of the null models (their own cache entries)


class _NullImageTower(torch.nn.Module):
    """CLIP's image tower with no work: zeros [B, E] (the real weights stay for the
    fingerprint)."""

    def __init__(self, real: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.real, self.dim = real, dim

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.dim, device=x.device)


def null_clip(clip):
    stub = copy.copy(clip)
    stub.model = _NullImageTower(clip.model, clip.embed_dim)
    stub.encode_images = lambda x, preprocessing="clip": torch.zeros(len(x), clip.embed_dim)
    return stub


def null_e4e(enc):
    stub = copy.copy(enc)
    stub.forward = lambda x: torch.zeros(len(x), enc.n_latent, enc.w_dim, device=x.device)
    return stub


def null_generator(G, images: torch.Tensor):
    """G whose synthesis returns `images` (real renders: file encoding costs what it does)."""
    stub = copy.copy(G)
    stub.synthesize = lambda s, noise_mode="const": images[: len(s)].to(s.device)
    return stub


def inject(kind: str, ref, device: str, obj) -> None:
    """Put `obj` in the per-process model cache under `ref`: the stage loads it."""
    cached((kind, for_workers(ref), device), lambda: obj)


def ratios(name: str, r: dict[str, float]) -> None:
    slower = min(r["model"], r["data"])
    serial = 1 / (1 / r["model"] + 1 / r["data"])
    print(
        f"{name:<28} stage {r['stage']:8.1f} rows/s | model-only {r['model']:8.1f} | "
        f"data-only {r['data']:8.1f} | stage / slower {r['stage'] / slower:.2f} "
        f"(target >= 0.85; no overlap would give {serial / slower:.2f})",
        flush=True,
    )


def bench_encoders(tmp: Path, n: int, batch: int, repeats: int, device: str) -> None:
    raw = tmp / "raw"
    make_jpegs(raw, n, size=256)
    ex = ExecutionConfig(device=device, workers=1, batch_size=batch)
    ds = tmp / "ds"
    run_ingest(IngestConfig(source=str(raw), out=str(ds), rows_per_shard=128), ex, progress=False)
    from PIL import Image

    pils = [Image.open(p).convert("RGB") for p in sorted(raw.glob("*.jpg"))]

    # encode-clip
    cref, null_ref = ClipRef(), ClipRef(seed=NULL_SEED)
    clip = load_clip_ref(cref, device)
    inject("clip", null_ref, device, null_clip(clip))
    decoded = [clip_pixels(im, cref.preprocessing, clip.image_size) for im in pils]

    def clip_model() -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                x = clip_inputs(clip, decoded[i : i + batch], cref.preprocessing)
                clip.model.encode_image(x).float().cpu()

    def clip_stage(ref: ClipRef) -> Callable[[], None]:
        cfg = EncodeClipConfig(dataset=str(ds))
        return lambda: run_encode_clip(cfg, ref, ex, overwrite=True, progress=False)

    fns = {"stage": clip_stage(cref), "model": clip_model, "data": clip_stage(null_ref)}
    ratios(f"encode-clip tiny ({n} jpeg)", interleaved(fns, n, repeats, device))

    # encode-s
    gref, eref, null_e = GeneratorRef(), E4ERef(), E4ERef(seed=NULL_SEED)
    G, enc = load_generator_ref(gref, device), load_e4e_ref(eref, device)
    inject("e4e", null_e, device, null_e4e(enc))
    pixels = [e4e_pixels(im, enc.input_size) for im in pils]

    def s_model() -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                x = torch.from_numpy(np.stack(pixels[i : i + batch])).to(device)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                G.w_to_s(enc(x)).cpu()

    def s_stage(ref: E4ERef) -> Callable[[], None]:
        cfg = EncodeSConfig(dataset=str(ds))
        return lambda: run_encode_s(cfg, gref, ref, ex, overwrite=True, progress=False)

    fns = {"stage": s_stage(eref), "model": s_model, "data": s_stage(null_e)}
    ratios(f"encode-s tiny ({n} jpeg)", interleaved(fns, n, repeats, device))


def bench_sample(tmp: Path, n: int, batch: int, repeats: int, device: str) -> None:
    gref, cref = GeneratorRef(), ClipRef()
    null_g, null_c = GeneratorRef(seed=NULL_SEED), ClipRef(seed=NULL_SEED)
    G, clip = load_generator_ref(gref, device), load_clip_ref(cref, device)
    blank = torch.zeros(batch, 3, G.resolution, G.resolution)
    inject("generator", null_g, device, null_generator(G, blank))
    inject("clip", null_c, device, null_clip(clip))
    ex = ExecutionConfig(device=device, workers=1, batch_size=batch)
    z_all = torch.from_numpy(sample_z(0, range(n), G.config.in_dim)).to(device)

    def model() -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                s = G.w_to_s(G.wplus(G.mapping(z_all[i : i + batch])))
                c = clip.encode_images(G.synthesize(s).clamp(-1, 1), cref.preprocessing)
                s.cpu(), c.cpu()

    def stage(g: GeneratorRef, c: ClipRef, out: str) -> Callable[[], None]:
        cfg = SampleConfig(n=n, out=str(tmp / out), rows_per_shard=256)
        return lambda: run_sample(cfg, g, c, ex, overwrite=True, progress=False)

    fns = {"stage": stage(gref, cref, "smp"), "model": model, "data": stage(null_g, null_c, "nul")}
    ratios(f"sample tiny-64 ({n} rows)", interleaved(fns, n, repeats, device))


def bench_render(tmp: Path, n: int, batch: int, repeats: int, device: str) -> None:
    from stages.render import RenderConfig, render_s
    from stages.render import run as run_render
    from store import RowStore, store_url

    gref, cref = GeneratorRef(), ClipRef()
    ex = ExecutionConfig(device=device, workers=1, batch_size=batch)
    ds = tmp / "render-src"
    run_sample(SampleConfig(n=n, out=str(ds), rows_per_shard=256), gref, cref, ex, progress=False)
    G = load_generator_ref(gref, device)
    s = RowStore.open(store_url(str(ds), "s")).read("s")
    with torch.no_grad():
        real = G.synthesize(torch.from_numpy(s[:batch]).to(device)).cpu()
    stub = null_generator(G, real)

    (tmp / "no-edits").mkdir()
    calls = itertools.count()

    def stage(generator) -> Callable[[], None]:
        def call() -> None:
            # a fresh out_dir each call: render is incremental, and a folder it already
            # filled would be kept, not rendered again
            out = tmp / f"renders-{next(calls)}"
            cfg = RenderConfig(
                store=str(ds),
                edits_dir=str(tmp / "no-edits"),
                out_dir=str(out),
                sheet_rows=1,
                gallery_rows=1,
            )
            run_render(cfg, gref, ex, generator=generator, progress=False, log=print0)

        return call

    fns = {
        "stage": stage(G),
        "model": lambda: render_s(G, s, batch, device),
        "data": stage(stub),
    }
    ratios(f"render tiny-64 ({n} png)", interleaved(fns, n, repeats, device))


def print0(_: str) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["encode", "sample", "render"])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n_img, n_rows = (256, 1024) if args.quick else (1024, 4096)
    batch = 256 if device.startswith("cuda") else 64
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {cores()} cores, batch "
        f"{batch}, decode threads auto, median of {args.repeats}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "encode"):
            bench_encoders(tmp, n_img, batch, args.repeats, device)
        if args.only in (None, "sample"):
            bench_sample(tmp, n_rows, batch, args.repeats, device)
        if args.only in (None, "render"):
            bench_render(tmp, n_img, batch, args.repeats, device)


if __name__ == "__main__":
    main()
