"""Stage `sample`: synthetic rows the way DeltaEdit's official data was made.

For row r: z = default_rng([seed, r]).standard_normal(Z) (seeded per row, so a row
never depends on scheduling, block size or resume), w = mapping(z, truncation),
W+ = w on every layer, s = G.w_to_s(W+), image = G.synthesize(s) (constant noise),
c = CLIP image embedding of image.clamp(-1, 1) with `clip.preprocessing`
('deltaedit' by default: what the official mapper was trained on).

Writes one dataset `<out>/` of three row-aligned stores:
manifest.zarr (ids `sample-000123`, source `sample:<seed>:<row>`), clip.zarr (embed),
s.zarr (s). Per block, s and clip are written before the manifest, and a block is
pending until all three hold it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from stages.common import (
    ClipRef,
    ExecutionConfig,
    GeneratorRef,
    autocast,
    resolve_device,
    to_device,
)
from stages.config import require
from stages.execution import (
    BlockReport,
    PassSummary,
    Staged,
    counts_of,
    create_output,
    for_workers,
    hold_outputs,
    load_clip_ref,
    load_generator_ref,
    mark_non_finite,
    run_blocks,
)
from store import FLOAT_DTYPES, ArraySpec, RowStore, Status, store_url
from store.fs import absolute
from store.rowstore import dtype_fingerprint


@dataclass(frozen=True)
class SampleConfig:
    """`sample:` in params."""

    n: int = 512  # rows to sample
    seed: int = 0
    truncation: float = 1.0  # psi; 1 = none (the official recipe)
    out: str = "data/sampled"
    rows_per_shard: int = 128
    dtype: str = "float32"  # how s is stored: float32 | float16 | bfloat16 (half the bytes)

    def validate(self) -> None:
        require(self.dtype in FLOAT_DTYPES, "dtype", self.dtype, " | ".join(FLOAT_DTYPES))
        require(self.n >= 1, "n", self.n, "an integer >= 1")
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        require(0.0 < self.truncation <= 2.0, "truncation", self.truncation, "a number in (0, 2]")
        require(bool(self.out), "out", self.out, "a dataset folder or URL")
        require(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "an integer >= 1")


def sample_z(seed: int, rows: range, z_dim: int) -> np.ndarray:
    """[len(rows), Z] float32 latents; row r always gets the same z for a given seed."""
    out = np.empty((len(rows), z_dim), dtype=np.float32)
    for k, r in enumerate(rows):
        out[k] = np.random.default_rng([seed, r]).standard_normal(z_dim, dtype=np.float32)
    return out


@dataclass(frozen=True)
class _SampleTask(Staged):
    """Sample one block: read (its z), compute (mapping, synthesis, CLIP), write the three
    stores (steps overlapped across blocks by the local runner, stages.execution.Staged)."""

    urls: tuple[str, str, str]  # manifest, clip, s
    generator: GeneratorRef
    clip: ClipRef
    seed: int
    truncation: float
    device: str
    batch_size: int
    storage_options: dict = field(default_factory=dict)
    precision: str = "fp32"  # execution.precision: generator + CLIP compute dtype

    def read(self, block: int) -> tuple[float, range, np.ndarray]:
        start = time.perf_counter()
        rows = RowStore.open(self.urls[0], storage_options=self.storage_options).block_rows(block)
        z_dim = load_generator_ref(self.generator, resolve_device(self.device)).config.in_dim
        return start, rows, sample_z(self.seed, range(rows.start, rows.stop), z_dim)

    def compute(self, block: int, data: tuple) -> tuple:
        start, rows, z_all = data
        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        G = load_generator_ref(self.generator, device)
        clip = load_clip_ref(self.clip, device)
        n = rows.stop - rows.start
        s_out = np.zeros((n, G.layout.dim), dtype=np.float32)
        c_out = np.zeros((n, clip.embed_dim), dtype=np.float32)
        with torch.no_grad(), autocast(device, self.precision):
            for lo in range(0, n, self.batch_size):
                hi = min(lo + self.batch_size, n)
                z = to_device(z_all[lo:hi], device)
                w = G.mapping(z, truncation=self.truncation)  # [B, W]
                s = G.w_to_s(G.wplus(w))  # [B, D]
                img = G.synthesize(s, noise_mode="const")  # [B, 3, H, W] raw
                c = clip.encode_images(
                    img.float().clamp(-1, 1), preprocessing=self.clip.preprocessing
                )
                s_out[lo:hi] = s.float().cpu().numpy()
                c_out[lo:hi] = c.float().cpu().numpy()
        return start, rows, s_out, c_out, G.resolution

    def write(self, block: int, result: tuple) -> BlockReport:
        start, rows, s_out, c_out, resolution = result
        so = self.storage_options
        manifest, clip_store, s_store = (RowStore.open(u, storage_options=so) for u in self.urls)
        n = rows.stop - rows.start
        status = np.full(n, Status.OK, dtype=np.uint8)
        bad = mark_non_finite(status, [s_out, c_out])
        reasons = tuple(f"NON_FINITE: sample:{self.seed}:{rows.start + k}" for k in bad)
        report = BlockReport(block, n, counts_of(status), reasons, 0.0)
        # a store that already holds this block (another store of the set restarted) keeps it
        if not s_store.done_mask()[block]:
            s_store.write_block(block, {"s": s_out}, status)
        if not clip_store.done_mask()[block]:
            clip_store.write_block(block, {"embed": c_out}, status)
        row_ids = range(rows.start, rows.stop)
        if manifest.done_mask()[block]:
            return replace(report, seconds=time.perf_counter() - start)
        manifest.write_block(
            block,
            {
                "ids": np.array([f"sample-{r:06d}" for r in row_ids]),
                "source": np.array([f"sample:{self.seed}:{r}" for r in row_ids]),
                "sha256": np.array([""] * n),
                "size": np.tile(np.array([[resolution, resolution]], np.int32), (n, 1)),
                "reason": np.array([""] * n),
            },
            status,
        )
        return replace(report, seconds=time.perf_counter() - start)


@dataclass
class SampleResult:
    out: str
    summary: PassSummary


def run_sample(
    cfg: SampleConfig,
    generator: GeneratorRef,
    clip_ref: ClipRef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
) -> SampleResult:
    """Sample `cfg.n` rows into `<cfg.out>/{manifest,clip,s}.zarr`; resumable."""
    notes: list[str] = []  # takeover notes of the leases come first
    with hold_outputs(
        [store_url(cfg.out, n) for n in ("manifest", "clip", "s")],
        "sample",
        execution,
        notes.append,
    ):
        return _sample(
            cfg, generator, clip_ref, execution, overwrite, progress, restart_on_change, notes
        )


def _sample(
    cfg: SampleConfig,
    generator: GeneratorRef,
    clip_ref: ClipRef,
    execution: ExecutionConfig,
    overwrite: bool,
    progress: bool,
    restart_on_change: bool,
    notes: list[str],
) -> SampleResult:
    from stages.ingest import MANIFEST_ARRAYS

    device = resolve_device(execution.device)
    G = load_generator_ref(generator, device)
    clip = load_clip_ref(clip_ref, device)
    sample_attrs: dict = {"seed": cfg.seed, "truncation": cfg.truncation, "noise_mode": "const"}
    if execution.precision != "fp32":  # bf16 rows differ from fp32 ones
        sample_attrs["precision"] = execution.precision
    s_attrs = {
        "stage": "sample",
        "fingerprint": dtype_fingerprint(G.fingerprint, cfg.dtype),
        "generator": G.fingerprint,
        "layout": G.layout.to_dict(),
        **sample_attrs,
    }
    c_attrs = {
        "stage": "sample",
        "fingerprint": clip.fingerprint,
        "model": clip.name,
        "preprocessing": clip_ref.preprocessing,
        "normalized": False,
        "generator": G.fingerprint,
        **sample_attrs,
    }
    m_fp = hashlib.sha256(
        json.dumps({"generator": G.fingerprint, **sample_attrs}, sort_keys=True).encode()
    ).hexdigest()
    m_attrs = {"stage": "sample", "fingerprint": m_fp, "root": "", "max_pixels": 0, **sample_attrs}
    so = execution.storage()
    how = (overwrite, restart_on_change, notes, so)
    rps = cfg.rows_per_shard
    urls = tuple(store_url(cfg.out, name) for name in ("manifest", "clip", "s"))
    manifest = create_output(urls[0], cfg.n, rps, MANIFEST_ARRAYS, m_attrs, *how)
    clip_store = create_output(
        urls[1], cfg.n, rps, {"embed": ArraySpec((clip.embed_dim,), "float32")}, c_attrs, *how
    )
    s_store = create_output(
        urls[2], cfg.n, rps, {"s": ArraySpec((G.layout.dim,), cfg.dtype)}, s_attrs, *how
    )
    pending = sorted(
        set(manifest.pending_blocks())
        | set(clip_store.pending_blocks())
        | set(s_store.pending_blocks())
    )
    task = _SampleTask(
        tuple(absolute(u) for u in urls),  # type: ignore[arg-type]
        for_workers(generator),
        for_workers(clip_ref),
        cfg.seed,
        cfg.truncation,
        execution.device,
        execution.batch_size,
        dict(so),
        execution.precision,
    )
    summary = run_blocks(
        task,
        pending,
        execution,
        "sample",
        manifest.n_blocks,
        progress,
        resources=execution.model_resources(),
    )
    summary.notes.extend(notes)
    return SampleResult(cfg.out, summary)
