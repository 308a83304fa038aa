"""Bench: a new prompt over cached latents.

A. Edit stage throughput (latents/s) over N cached rows (s.zarr + clip.zarr on disk,
   written to edits/<name>.zarr) against the pure batched mapper forward on tensors
   already in memory (same mapper, batch size, prompt). Target: >= 0.8x.
B. Wall time of "new prompt over cached latents" (edit stage only) against
   "encode + edit from images" (ingest + encode-clip + encode-s + edit) on M image
   files. Models are loaded before timing in both (per-process caches).

Prints medians over repeats and the ratios.

    .venv/bin/python bench/bench_edit.py            # N = 100k, M = 1k
    .venv/bin/python bench/bench_edit.py --quick    # N = 20k, M = 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.layout import SLayout
from model.mapper import DeltaMapper, save_mapper
from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef, resolve_device
from stages.edit import EditConfig, EditSpec, mapper_condition, text_delta
from stages.edit import run as run_edit
from stages.execution import load_clip_ref, load_e4e_ref, load_generator_ref
from store import ArraySpec, RowStore, Status, store_url


def write_latents(root: Path, n: int, layout: SLayout, clip, gen_fp: str, rps: int) -> None:
    """Random cached latents (s, c) for n rows: what encode-s / encode-clip would leave."""
    rng = np.random.default_rng(0)
    s_st = RowStore.create(
        store_url(str(root), "s"),
        n,
        rps,
        {"s": ArraySpec((layout.dim,), "float32")},
        {"stage": "bench", "fingerprint": gen_fp, "generator": gen_fp, "layout": layout.to_dict()},
    )
    c_st = RowStore.create(
        store_url(str(root), "clip"),
        n,
        rps,
        {"embed": ArraySpec((clip.embed_dim,), "float32")},
        {"stage": "bench", "fingerprint": clip.fingerprint, "model": clip.name},
    )
    for b in range(s_st.n_blocks):
        sl = s_st.block_rows(b)
        k = sl.stop - sl.start
        ok = np.full(k, int(Status.OK), np.uint8)
        s_st.write_block(b, {"s": rng.standard_normal((k, layout.dim), np.float32)}, ok)
        c_st.write_block(b, {"embed": rng.standard_normal((k, clip.embed_dim), np.float32)}, ok)


def pure_forward(mapper, s_conv: torch.Tensor, c: torch.Tensor, dt: torch.Tensor, bs: int):
    with torch.no_grad():
        for i in range(0, len(s_conv), bs):
            mapper(s_conv[i : i + bs], mapper_condition(c[i : i + bs], dt))
    if s_conv.is_cuda:
        torch.cuda.synchronize()


def bench_a(
    tmp: Path, n: int, repeats: int, bs: int, clip, G, device: str = "cpu"
) -> tuple[float, float]:
    layout = G.layout
    root = tmp / "cached"
    t0 = time.perf_counter()
    write_latents(root, n, layout, clip, G.fingerprint, rps=4096)
    print(f"A: wrote {n} cached rows in {time.perf_counter() - t0:.1f} s (setup, not timed)")
    torch.manual_seed(0)
    mapper = DeltaMapper(layout, clip.embed_dim).eval()
    save_mapper(mapper, root / "mapper.safetensors", extra={"clip_fingerprint": clip.fingerprint})
    mapper = mapper.to(device)
    ex = ExecutionConfig(device=device, batch_size=bs)

    # baseline: the same rows already in memory as tensors (on the device)
    s_all = RowStore.open(store_url(str(root), "s")).read("s")
    c_all = torch.as_tensor(RowStore.open(store_url(str(root), "clip")).read("embed")).to(device)
    s_conv = torch.as_tensor(s_all[:, layout.conv_index()]).to(device)
    dt = text_delta(clip.encode_text(["a smiling face"])[0], clip.encode_text(["face"])[0])
    dt = dt.to(device)
    base, stage, base_cpu, stage_cpu = [], [], [], []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        pure_forward(mapper, s_conv, c_all, dt, bs)
        base.append(n / (time.perf_counter() - t0))
        base_cpu.append(n / (time.process_time() - c0))
        cfg = EditConfig(
            edits=(EditSpec(f"bench{r}", "a smiling face", beta=0.0),),
            store=str(root),
            mapper=str(root / "mapper.safetensors"),
            out_dir=str(tmp / "edits"),
            dataset_kind="faces",
        )
        t0, c0 = time.perf_counter(), time.process_time()
        run_edit(cfg, ex, clip=clip, progress=False, log=lambda _: None)
        stage.append(n / (time.perf_counter() - t0))
        stage_cpu.append(n / (time.process_time() - c0))
        shutil.rmtree(tmp / "edits")
    b, s = statistics.median(base), statistics.median(stage)
    bc, sc = statistics.median(base_cpu), statistics.median(stage_cpu)
    print(f"A: pure mapper forward (in memory): {b:,.0f} latents/s wall, {bc:,.0f} per CPU-s")
    print(f"A: edit stage (zarr in -> zarr out): {s:,.0f} latents/s wall, {sc:,.0f} per CPU-s")
    print(
        f"A: ratio edit stage / pure forward = {s / b:.2f}x wall, {sc / bc:.2f}x CPU time "
        f"(median of {repeats}, interleaved; target >= 0.8x)"
    )
    shutil.rmtree(root)
    return b, s


def bench_b(
    tmp: Path, m: int, repeats: int, bs: int, G, clip, device: str = "cpu"
) -> tuple[float, float]:
    from PIL import Image

    from stages.encode_clip import EncodeClipConfig, run_encode_clip
    from stages.encode_s import EncodeSConfig, run_encode_s
    from stages.ingest import IngestConfig, run_ingest
    from stages.render import render_s

    raw = tmp / "raw"
    raw.mkdir()
    with torch.no_grad():
        w = G.mapping(torch.randn(m, G.w_dim, generator=torch.Generator().manual_seed(0)))
        s = G.w_to_s(w[:, None].expand(m, G.n_latent, G.w_dim)).numpy()
    for i, img in enumerate(render_s(G, s, 64)):
        Image.fromarray(img).save(raw / f"{i:05d}.png")
    ex = ExecutionConfig(device=device, batch_size=bs, workers=1)
    gref, cref, eref = GeneratorRef(), ClipRef(), E4ERef()
    load_e4e_ref(eref, device)  # models loaded once, before any timing
    load_generator_ref(gref, device)
    load_clip_ref(cref, device)
    torch.manual_seed(0)
    save_mapper(
        DeltaMapper(G.layout, clip.embed_dim),
        tmp / "mapper.safetensors",
        extra={"clip_fingerprint": clip.fingerprint},
    )
    full, cached = [], []
    for r in range(repeats):
        ds = tmp / f"ds{r}"
        cfg = EditConfig(
            edits=(EditSpec("new", "a smiling face", beta=0.0),),
            store=str(ds),
            mapper=str(tmp / "mapper.safetensors"),
            out_dir=str(ds / "edits"),
        )
        t0 = time.perf_counter()
        run_ingest(
            IngestConfig(source=str(raw), out=str(ds), rows_per_shard=256), ex, progress=False
        )
        run_encode_clip(EncodeClipConfig(dataset=str(ds)), cref, ex, progress=False)
        run_encode_s(EncodeSConfig(dataset=str(ds)), gref, eref, ex, progress=False)
        run_edit(cfg, ex, clip=clip, progress=False, log=lambda _: None)
        full.append(time.perf_counter() - t0)
        cfg2 = EditConfig(
            edits=(EditSpec("newer", "a face with glasses", beta=0.0),),
            store=str(ds),
            mapper=cfg.mapper,
            out_dir=cfg.out_dir,
            prune=False,  # a second prompt beside the first, as by hand: "new" stays
        )
        t0 = time.perf_counter()
        run_edit(cfg2, ex, clip=clip, progress=False, log=lambda _: None)
        cached.append(time.perf_counter() - t0)
    f, c = statistics.median(full), statistics.median(cached)
    print(f"B: encode + edit from {m} images: {f:.2f} s (median of {repeats})")
    print(f"B: new prompt over the {m} cached latents: {c:.2f} s (median of {repeats})")
    print(f"B: ratio (encode + edit) / (edit from cache) = {f / c:.1f}x")
    return f, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k cached rows, 128 images")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (stage and baseline)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    n = args.rows or (20_000 if args.quick else 100_000)
    m = args.images or (128 if args.quick else 1000)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    G = load_generator_ref(GeneratorRef(), "cpu")
    clip = load_clip_ref(ClipRef(), "cpu")
    print(
        f"tiny-64 generator (D {G.layout.dim}, Dconv {G.layout.conv_dim}), CLIP E "
        f"{clip.embed_dim}, device {device}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_edit_") as d:
        bench_a(Path(d), n, args.repeats, args.batch_size, clip, G, device)
        bench_b(Path(d), m, args.repeats, 64, G, clip, device)


if __name__ == "__main__":
    main()
