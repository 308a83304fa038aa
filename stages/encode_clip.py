"""Stage `encode-clip`: manifest OK rows -> `<dataset>/clip.zarr` embed [N, E].

Per block: the manifest's sources are read and decoded (bounded, see stages.images)
and preprocessed in a thread pool running ahead of the model, then encoded in
batches of `execution.batch_size`. Rows not OK in the manifest are SKIPPED; a file
that no longer decodes is UNREADABLE. Embeddings are stored unnormalized.
attrs: fingerprint (the CLIP model's), model, preprocessing, normalized=false,
manifest (the manifest's fingerprint).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.clip import UPSAMPLE
from stages import images
from stages.common import ClipRef, ExecutionConfig, resolve_device
from stages.config import require
from stages.execution import (
    BlockReport,
    PassSummary,
    create_output,
    for_workers,
    load_clip_ref,
    prefetch_map,
    run_blocks,
)
from store import ArraySpec, RowStore, Status, store_url
from store.fs import absolute


@dataclass(frozen=True)
class EncodeClipConfig:
    """`encode_clip:` in params."""

    dataset: str = "data/images"  # holds manifest.zarr; clip.zarr is written beside it
    decode_threads: int = 2  # threads decoding images ahead of the model, per block task

    def validate(self) -> None:
        require(bool(self.dataset), "dataset", self.dataset, "a dataset folder or URL")
        require(self.decode_threads >= 0, "decode_threads", self.decode_threads, "an integer >= 0")


@dataclass
class EncodeResult:
    out: str
    summary: PassSummary


def encode_image_block(
    manifest: RowStore,
    rows: slice,
    prepare: Callable[[Image.Image], np.ndarray],
    forward: Callable[[list[np.ndarray]], dict[str, np.ndarray]],
    batch_size: int,
    threads: int,
) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray, list[str]]:
    """Decode the manifest's OK rows of one block and run the model over them in batches.

    prepare(PIL RGB image) -> uint8 array [H, W, 3]: runs in the decode threads and uses
    Pillow/numpy only (torch ops there would fight the model's OpenMP threads for cores);
    forward(list of those arrays) -> {name: [B, ...]}: runs in the calling thread.
    Returns ({row offset: {name: row}}, status [n], problem lines).
    """
    n = rows.stop - rows.start
    upstream = np.asarray(manifest.array("status")[rows], dtype=np.uint8)
    sources = manifest.read("source", rows)
    root = manifest.attrs.get("root", "")
    max_pixels = int(manifest.attrs.get("max_pixels") or images.MAX_FILE_BYTES)
    status = np.full(n, Status.SKIPPED, dtype=np.uint8)
    todo = np.flatnonzero(upstream == Status.OK).tolist()
    lines: list[str] = []
    results: dict[int, dict[str, np.ndarray]] = {}

    with images.SourceReader(root) as reader:

        def load(k: int) -> tuple[int, np.ndarray | None, str]:
            try:
                img = images.decode_rgb(reader.read(str(sources[k])), max_pixels)
                return k, prepare(img), ""
            except Exception as exc:  # noqa: BLE001 - a bad file is a row status
                return k, None, str(exc) or type(exc).__name__

        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if not batch:
                return
            out = forward([a for _, a in batch])
            for j, (k, _) in enumerate(batch):
                results[k] = {name: v[j] for name, v in out.items()}
                status[k] = Status.OK
            batch.clear()

        for k, x, why in prefetch_map(load, todo, threads, ahead=2 * batch_size):
            if x is None:
                status[k] = Status.UNREADABLE
                lines.append(f"UNREADABLE: {sources[k]} ({why})")
                continue
            batch.append((k, x))
            if len(batch) >= batch_size:
                flush()
        flush()
    return results, status, lines


def clip_pixels(img: Image.Image, preprocessing: str, size: int) -> np.ndarray:
    """Decode-thread half of the CLIP preprocessing (Pillow + numpy only).

    'clip': resize the shortest side to `size` (bicubic) and center-crop size x size, as
    open_clip's eval transform -> uint8 [size, size, 3] (normalized in the model thread);
    'deltaedit': nearest x7 upsampling + adaptive average pooling to size x size, done
    as the equivalent sparse weighted sum -> float32 [size, size, 3] in [-1, 1].
    """
    img = img.convert("RGB")
    if preprocessing == "deltaedit":
        return deltaedit_pool(np.asarray(img, dtype=np.uint8), size)
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            new = (size, int(size * h / w))
        else:
            new = (int(size * w / h), size)
        if new != (w, h):
            img = img.resize(new, Image.BICUBIC)
        w, h = img.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def pool_weights(n: int, size: int, upsample: int = UPSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Nearest upsampling by `upsample` then adaptive average pooling n -> size, as a
    sparse map: out[i] = sum_t w[i, t] * x[idx[i, t]]. Returns (idx [size, k], w [size, k])."""
    length = n * upsample
    rows: list[dict[int, float]] = []
    for i in range(size):
        start, end = (i * length) // size, -((-(i + 1) * length) // size)  # floor, ceil
        weights: dict[int, float] = {}
        for u in range(start, end):
            weights[u // upsample] = weights.get(u // upsample, 0.0) + 1.0 / (end - start)
        rows.append(weights)
    k = max(len(r) for r in rows)
    idx = np.zeros((size, k), dtype=np.int64)
    w = np.zeros((size, k), dtype=np.float32)
    for i, r in enumerate(rows):
        for t, (j, v) in enumerate(sorted(r.items())):
            idx[i, t], w[i, t] = j, v
    return idx, w


def deltaedit_pool(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [-1, 1]: DeltaEdit's preprocessing
    (pixels to [-1, 1], nearest x7 upsampling, adaptive average pooling to size)."""
    x = pixels.astype(np.float32) / 127.5 - 1.0
    idx_h, w_h = pool_weights(x.shape[0], size)
    idx_w, w_w = pool_weights(x.shape[1], size)
    rows = sum(w_h[:, t, None, None] * x[idx_h[:, t]] for t in range(idx_h.shape[1]))
    return sum(w_w[None, :, t, None] * rows[:, idx_w[:, t]] for t in range(idx_w.shape[1]))


def clip_inputs(clip, arrays: list[np.ndarray], preprocessing: str) -> torch.Tensor:
    """Model-thread half: the arrays of clip_pixels -> model input [B, 3, S, S]."""
    x = torch.from_numpy(np.stack(arrays)).to(clip.device).permute(0, 3, 1, 2)
    if preprocessing == "deltaedit":
        return x.float().contiguous()
    return clip.preprocess_images(x.float() / 127.5 - 1.0, "clip")


def assemble(
    results: dict[int, dict[str, np.ndarray]], n: int, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Row results -> full block arrays (zeros for rows without a result)."""
    out = {name: np.zeros((n, *tail), dtype=np.float32) for name, tail in shapes.items()}
    for k, row in results.items():
        for name, v in row.items():
            out[name][k] = v
    return out


def counts_of(status: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(status, return_counts=True)
    return {Status(int(v)).name: int(c) for v, c in zip(names, counts, strict=True)}


@dataclass(frozen=True)
class _ClipTask:
    manifest_url: str
    out_url: str
    clip: ClipRef
    device: str
    batch_size: int
    decode_threads: int
    storage_options: dict = field(default_factory=dict)

    def __call__(self, block: int) -> BlockReport:
        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        start = time.perf_counter()
        manifest = RowStore.open(self.manifest_url, storage_options=self.storage_options)
        out = RowStore.open(self.out_url, storage_options=self.storage_options)
        clip = load_clip_ref(self.clip, device)
        prep = self.clip.preprocessing
        rows = out.block_rows(block)

        def prepare(img: Image.Image) -> np.ndarray:
            return clip_pixels(img, prep, clip.image_size)

        def forward(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                x = clip_inputs(clip, arrays, prep)
                return {"embed": clip.model.encode_image(x).float().cpu().numpy()}

        results, status, lines = encode_image_block(
            manifest, rows, prepare, forward, self.batch_size, self.decode_threads
        )
        data = assemble(results, len(status), {"embed": (clip.embed_dim,)})
        out.write_block(block, data, status)
        return BlockReport(
            block, len(status), counts_of(status), tuple(lines), time.perf_counter() - start
        )


def run_encode_clip(
    cfg: EncodeClipConfig,
    clip_ref: ClipRef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
) -> EncodeResult:
    """Encode every OK manifest row of `cfg.dataset` into `<dataset>/clip.zarr`; resumable
    (see execution.create_output for overwrite / restart_on_change)."""
    device = resolve_device(execution.device)
    so = execution.storage_options
    manifest_url = store_url(cfg.dataset, "manifest")
    manifest = RowStore.open(manifest_url, require_complete=True, storage_options=so)
    clip = load_clip_ref(clip_ref, device)
    attrs = {
        "stage": "encode-clip",
        "fingerprint": clip.fingerprint,
        "model": clip.name,
        "weights": clip_ref.weights or "",
        "preprocessing": clip_ref.preprocessing,
        "normalized": False,
        "manifest": manifest.fingerprint,
    }
    out_url = store_url(cfg.dataset, "clip")
    notes: list[str] = []
    out = create_output(
        out_url,
        manifest.n_rows,
        manifest.rows_per_shard,
        {"embed": ArraySpec((clip.embed_dim,), "float32")},
        attrs,
        overwrite,
        restart_on_change,
        notes,
        so,
    )
    task = _ClipTask(
        absolute(manifest_url),
        absolute(out_url),
        for_workers(clip_ref),
        execution.device,
        execution.batch_size,
        cfg.decode_threads,
        dict(so),
    )
    summary = run_blocks(
        task, out.pending_blocks(), execution, "encode-clip", out.n_blocks, progress
    )
    summary.notes.extend(notes)
    return EncodeResult(out_url, summary)
