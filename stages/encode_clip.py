"""Stage `encode-clip`: manifest OK rows -> `<dataset>/clip.zarr` embed [N, E].

Per block: the manifest's sources are read and decoded (bounded, see stages.images)
and preprocessed in a thread pool running ahead of the model, then encoded in
batches of `execution.batch_size`. Rows not OK in the manifest are SKIPPED; a file
that no longer decodes is UNREADABLE; a row whose model output holds NaN or Inf is
NON_FINITE (zeros stored). Embeddings are stored unnormalized.
attrs: fingerprint (the CLIP model's), model, preprocessing, normalized=false,
manifest (the manifest's fingerprint).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from model.checkpoint import sha256_file
from stages import images
from stages.common import (
    ClipRef,
    DecodeThreads,
    ExecutionConfig,
    check_decode_threads,
    decode_setting,
    decode_threads_for,
    resolve_device,
    to_device,
)
from stages.config import require
from stages.execution import (
    BlockReport,
    PassSummary,
    Staged,
    counts_of,
    for_workers,
    leased,
    load_clip_ref,
    non_finite_rows,
    prefetch_map,
    run_blocks,
)
from stages.incremental import UpdateCounts, store_summary, update_output
from store import ArraySpec, RowStore, Status, StoreError, store_url
from store import update as up
from store.fs import absolute
from store.update import as_str

if TYPE_CHECKING:  # torch and open_clip load only when a pass has rows to encode
    import torch


@dataclass(frozen=True)
class EncodeClipConfig:
    """`encode_clip:` in params."""

    dataset: str = "data/images"  # holds manifest.zarr; clip.zarr is written beside it
    decode_threads: DecodeThreads = "auto"  # decoding threads per block task; auto/0: cores/workers

    def validate(self) -> None:
        require(bool(self.dataset), "dataset", self.dataset, "a dataset folder or URL")
        check_decode_threads(self.decode_threads)


@dataclass
class EncodeResult:
    out: str
    summary: PassSummary
    counts: UpdateCounts | None = None  # rows reused / computed / dropped


def encode_image_block(
    sources: Sequence[str],
    root: str,
    max_pixels: int,
    prepare: Callable[[Image.Image], np.ndarray],
    forward: Callable[[list[np.ndarray]], dict[str, np.ndarray]],
    batch_size: int,
    threads: int,
) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray, list[str]]:
    """Decode `sources` (one block of rows to compute) and run the model over them.

    prepare(PIL RGB image) -> uint8 array [H, W, 3]: runs in the decode threads and uses
    Pillow/numpy only (torch ops there would fight the model's OpenMP threads for cores);
    forward(list of those arrays) -> {name: [B, ...]}: runs in the calling thread, always
    on exactly `batch_size` arrays (the last batch padded with copies of its last row), so
    a row's result does not depend on how many rows share its batch.
    Returns ({row offset: {name: row}}, status [n] OK / UNREADABLE, problem lines).
    """
    n = len(sources)
    status = np.full(n, Status.UNREADABLE, dtype=np.uint8)
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
            arrays = [a for _, a in batch]
            arrays += [arrays[-1]] * (batch_size - len(arrays))
            out = forward(arrays)
            bad = non_finite_rows(list(out.values()))
            for j, (k, _) in enumerate(batch):
                if bad[j]:
                    status[k] = Status.NON_FINITE
                    lines.append(f"NON_FINITE: {sources[k]} (the model output holds NaN or Inf)")
                    continue
                results[k] = {name: v[j] for name, v in out.items()}
                status[k] = Status.OK
            batch.clear()

        for k, x, why in prefetch_map(load, range(n), threads, ahead=2 * batch_size):
            if x is None:
                lines.append(f"UNREADABLE: {sources[k]} ({why})")
                continue
            batch.append((k, x))
            if len(batch) >= batch_size:
                flush()
        flush()
    return results, status, lines


@dataclass(frozen=True)
class ImageRows:
    """The manifest rows an image encoder reads: where the files are and their keys."""

    root: str
    max_pixels: int
    sources: np.ndarray  # [N] str
    keys: np.ndarray  # [N] str, sha256 of each source's bytes
    wanted: np.ndarray  # [N] bool, OK in the manifest

    @classmethod
    def of(cls, manifest: RowStore) -> ImageRows:
        return cls(
            str(manifest.attrs.get("root", "")),
            int(manifest.attrs.get("max_pixels") or images.MAX_FILE_BYTES),
            as_str(manifest.read("source")),
            as_str(manifest.read("sha256")),
            manifest.status() == Status.OK,
        )


# make_task(compute store url, sources of its rows, root, max_pixels) -> the block task
# writing that store
MakeTask = Callable[[str, tuple[str, ...], str, int], Callable[[int], BlockReport]]


def run_image_pass(
    dataset: str,
    name: str,
    arrays: dict[str, ArraySpec],
    attrs: dict,
    make_task: MakeTask,
    execution: ExecutionConfig,
    reuse: Sequence[str],
    overwrite: bool,
    restart_on_change: bool,
    progress: bool,
) -> EncodeResult:
    """`<dataset>/<name>.zarr` from the manifest's OK rows: rows of earlier stores reused by
    key, the rest encoded by make_task's blocks (stages.incremental.update_output)."""
    so = execution.storage()
    manifest = RowStore.open(
        store_url(dataset, "manifest"), require_complete=True, storage_options=so
    )
    rows = ImageRows.of(manifest)
    attrs = {**attrs, "manifest": manifest.fingerprint}
    stage = str(attrs["stage"])

    def compute(c_url: str, todo: np.ndarray) -> PassSummary:
        sources = tuple(rows.sources[todo].tolist())
        task = make_task(absolute(c_url), sources, rows.root, rows.max_pixels)
        c = RowStore.open(c_url, storage_options=so)
        return run_blocks(
            task,
            c.pending_blocks(),
            execution,
            stage,
            c.n_blocks,
            progress,
            resources=execution.model_resources(),
        )

    out_url = store_url(dataset, name)
    _, summary, counts = update_output(
        out_url,
        manifest.rows_per_shard,
        arrays,
        attrs,
        rows.keys,
        rows.wanted,
        compute,
        execution,
        stage,
        reuse,
        overwrite,
        restart_on_change,
        progress,
    )
    return EncodeResult(out_url, summary, counts)


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
def pool_weights(n: int, size: int, upsample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest upsampling by `upsample` then adaptive average pooling n -> size, as a
    sparse map: out[i] = sum_t w[i, t] * x[idx[i, t]]. Returns (idx [size, k], w [size, k])."""
    if upsample is None:
        from model.clip import UPSAMPLE

        upsample = UPSAMPLE
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
    x = to_device(np.stack(arrays), str(clip.device)).permute(0, 3, 1, 2)
    if preprocessing == "deltaedit":
        return x.float().contiguous()
    return clip.preprocess_images(x.float() / 127.5 - 1.0, "clip")


def write_encoded(url: str, storage_options: dict, block: int, result: tuple) -> BlockReport:
    """The write step of an image encoder's block: (start time, row results, status,
    problem lines, {name: row shape}) into the compute store at `url`."""
    start, results, status, lines, shapes = result
    out = RowStore.open(url, storage_options=storage_options)
    out.write_block(block, assemble(results, len(status), shapes), status)
    return BlockReport(
        block, len(status), counts_of(status), tuple(lines), time.perf_counter() - start
    )


def assemble(
    results: dict[int, dict[str, np.ndarray]], n: int, shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Row results -> full block arrays (zeros for rows without a result)."""
    out = {name: np.zeros((n, *tail), dtype=np.float32) for name, tail in shapes.items()}
    for k, row in results.items():
        for name, v in row.items():
            out[name][k] = v
    return out


def model_inputs(refs: dict, paths: Sequence[str | None], **extra) -> dict | None:
    """What the models of a pass are made from, known without loading them: the params
    references and the sha256 of their weight files. None when a model is built from a
    registered config (no file: it must be built to be known)."""
    if any(not p or not os.path.isfile(str(p)) for p in paths):
        return None  # a missing file: the model loader says which, in one line
    return {
        "refs": {k: asdict(v) for k, v in refs.items()},
        "weights_sha256": [sha256_file(str(p)) for p in paths],
        **extra,
    }


def up_to_date(
    dataset: str, name: str, inputs: dict | None, stage: str, storage_options: dict
) -> EncodeResult | None:
    """The output `<dataset>/<name>.zarr` when it is complete and was made from the present
    manifest by the same model files: nothing to do, no model imported or loaded."""
    so = storage_options
    url = store_url(dataset, name)
    if inputs is None or not up.exists(url, so) or up.exists(f"{url}.prev", so):
        return None
    manifest = RowStore.open(
        store_url(dataset, "manifest"), require_complete=True, storage_options=so
    )
    try:
        out = RowStore.open(url, storage_options=so)
    except StoreError:
        return None
    same = (
        out.attrs.get("inputs") == up.jsonable(inputs)
        and out.attrs.get("manifest") == manifest.fingerprint
        and up.KEY in out.specs
        and out.n_rows == manifest.n_rows
        and out.is_complete()
    )
    if not same:
        return None
    summary = store_summary(stage, out, PassSummary(stage, 0), 0, time.perf_counter(), [])
    return EncodeResult(url, summary, UpdateCounts(int(out.ok_rows().size), 0, 0))


@dataclass(frozen=True)
class _ClipTask(Staged):
    """Embed one block of images (read / compute / write steps: stages.execution.Staged)."""

    out_url: str  # the compute store: row i = sources[i]
    sources: tuple[str, ...]
    root: str
    max_pixels: int
    clip: ClipRef
    device: str
    batch_size: int
    decode_threads: DecodeThreads
    storage_options: dict = field(default_factory=dict)

    def read(self, block: int) -> float:  # the images are read by the decode threads
        return time.perf_counter()

    def compute(self, block: int, start: float) -> tuple:
        import torch

        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        clip = load_clip_ref(self.clip, device)
        prep = self.clip.preprocessing
        rows = RowStore.open(self.out_url, storage_options=self.storage_options).block_rows(block)

        def prepare(img: Image.Image) -> np.ndarray:
            return clip_pixels(img, prep, clip.image_size)

        def forward(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                x = clip_inputs(clip, arrays, prep)
                return {"embed": clip.model.encode_image(x).float().cpu().numpy()}

        results, status, lines = encode_image_block(
            self.sources[rows],
            self.root,
            self.max_pixels,
            prepare,
            forward,
            self.batch_size,
            decode_threads_for(self.decode_threads),
        )
        return start, results, status, lines, {"embed": (clip.embed_dim,)}

    def write(self, block: int, result: tuple) -> BlockReport:
        return write_encoded(self.out_url, self.storage_options, block, result)


def run_encode_clip(
    cfg: EncodeClipConfig,
    clip_ref: ClipRef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
    reuse: Sequence[str] = (),
) -> EncodeResult:
    """Embed every OK manifest row of `cfg.dataset` into `<dataset>/clip.zarr`, reusing the
    rows of the previous clip.zarr and of `reuse` stores by key; resumable (see
    stages.incremental.update_output for overwrite / restart_on_change)."""
    return leased(
        [store_url(cfg.dataset, "clip")],
        "encode-clip",
        execution,
        lambda: _encode_clip(
            cfg, clip_ref, execution, overwrite, progress, restart_on_change, reuse
        ),
    )


def _encode_clip(
    cfg: EncodeClipConfig,
    clip_ref: ClipRef,
    execution: ExecutionConfig,
    overwrite: bool,
    progress: bool,
    restart_on_change: bool,
    reuse: Sequence[str],
) -> EncodeResult:
    so = execution.storage()
    RowStore.open(store_url(cfg.dataset, "manifest"), require_complete=True, storage_options=so)
    inputs = model_inputs({"clip": clip_ref}, [clip_ref.weights])
    fresh = overwrite or reuse
    done = None if fresh else up_to_date(cfg.dataset, "clip", inputs, "encode-clip", so)
    if done is not None:
        return done
    device = resolve_device(execution.device)
    clip = load_clip_ref(clip_ref, device)
    attrs = {
        "stage": "encode-clip",
        "inputs": inputs,
        "fingerprint": clip.fingerprint,
        "model": clip.name,
        "weights": clip_ref.weights or "",
        "preprocessing": clip_ref.preprocessing,
        "normalized": False,
    }

    def make_task(*head) -> _ClipTask:  # (compute url, sources, root, max_pixels)
        return _ClipTask(
            *head,
            for_workers(clip_ref),
            execution.device,
            execution.batch_size,
            decode_setting(cfg.decode_threads, execution),
            dict(so),
        )

    arrays = {"embed": ArraySpec((clip.embed_dim,), "float32")}
    return run_image_pass(
        cfg.dataset,
        "clip",
        arrays,
        attrs,
        make_task,
        execution,
        reuse,
        overwrite,
        restart_on_change,
        progress,
    )
