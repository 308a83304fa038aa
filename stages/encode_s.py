"""Stage `encode-s`: manifest OK rows -> e4e -> W+ -> S -> `<dataset>/s.zarr`.

Each image is resized to the e4e input size (bilinear, as the official
transforms), mapped to [-1, 1], inverted by e4e to W+ [L, W] (optionally refined by
`encode_s.refine_steps` steps of optimisation on the image loss, model/inversion.py), and
turned into the generator's StyleSpace code s = G.w_to_s(W+) [D]. Stores s [N, D] and, when
`encode_s.keep_wplus`, wplus [N, L, W]. attrs: fingerprint = sha256(generator
fingerprint + e4e fingerprint [+ refine steps and lr]), generator, e4e, layout (SLayout.to_dict()).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from stages.common import (
    DecodeThreads,
    E4ERef,
    ExecutionConfig,
    GeneratorRef,
    check_decode_threads,
    decode_setting,
    decode_threads_for,
    resolve_device,
    to_device,
)
from stages.config import require
from stages.encode_clip import (
    EncodeResult,
    encode_image_block,
    model_inputs,
    run_image_pass,
    up_to_date,
    write_encoded,
)
from stages.execution import (
    BlockReport,
    Staged,
    for_workers,
    leased,
    load_e4e_ref,
    load_generator_ref,
)
from store import FLOAT_DTYPES, ArraySpec, RowStore, store_url
from store.rowstore import dtype_fingerprint

if TYPE_CHECKING:  # torch loads only when a pass has rows to encode
    import torch


@dataclass(frozen=True)
class EncodeSConfig:
    """`encode_s:` in params."""

    dataset: str = "data/images"  # holds manifest.zarr; s.zarr is written beside it
    keep_wplus: bool = False  # also store the e4e W+ [N, L, W]
    decode_threads: DecodeThreads = "auto"  # decoding threads per block task; auto/0: cores/workers
    dtype: str = "float32"  # how s is stored: float32 | float16 | bfloat16 (half the bytes)
    refine_steps: int = 0  # e4e's W+ refined by this many Adam steps on the image loss
    refine_lr: float = 0.01  # (model/inversion.py; 0 steps = e4e alone, as the paper)

    def validate(self) -> None:
        require(bool(self.dataset), "dataset", self.dataset, "a dataset folder or URL")
        require(self.refine_steps >= 0, "refine_steps", self.refine_steps, "an integer >= 0")
        require(self.refine_lr > 0, "refine_lr", self.refine_lr, "a number > 0")
        require(self.dtype in FLOAT_DTYPES, "dtype", self.dtype, " | ".join(FLOAT_DTYPES))
        check_decode_threads(self.decode_threads)


NO_REFINE: tuple[int, float] = (0, 0.01)  # (refine_steps, refine_lr): e4e's W+ as it is


class EncodeSError(ValueError):
    """The e4e encoder and the generator do not fit together; one line."""


def s_fingerprint(
    generator_fp: str, e4e_fp: str, dtype: str = "float32", refine: tuple[int, float] = NO_REFINE
) -> str:
    key = f"{generator_fp}+{e4e_fp}" + (f"+refine{refine[0]}@{refine[1]!r}" if refine[0] else "")
    return dtype_fingerprint(hashlib.sha256(key.encode()).hexdigest(), dtype)


def e4e_pixels(img: Image.Image, size: int) -> np.ndarray:
    """Decode-thread half (Pillow only): RGB, bilinear resize to size x size (no crop, as
    the official transforms) -> uint8 [size, size, 3]."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def to_input(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> e4e input [3, size, size] float in [-1, 1]."""
    import torch

    return torch.from_numpy(e4e_pixels(img, size).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass(frozen=True)
class _STask(Staged):
    """Invert one block of images (read / compute / write steps: stages.execution.Staged)."""

    out_url: str  # the compute store: row i = sources[i]
    sources: tuple[str, ...]
    root: str
    max_pixels: int
    generator: GeneratorRef
    e4e: E4ERef
    device: str
    batch_size: int
    decode_threads: DecodeThreads
    keep_wplus: bool
    refine: tuple[int, float] = NO_REFINE  # (steps, lr) of model.inversion.invert_wplus
    storage_options: dict = field(default_factory=dict)

    def read(self, block: int) -> float:  # the images are read by the decode threads
        return time.perf_counter()

    def compute(self, block: int, start: float) -> tuple:
        import torch

        from model.inversion import invert_wplus

        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        G = load_generator_ref(self.generator, device)
        enc = load_e4e_ref(self.e4e, device)
        rows = RowStore.open(self.out_url, storage_options=self.storage_options).block_rows(block)

        def prepare(img: Image.Image) -> np.ndarray:
            return e4e_pixels(img, enc.input_size)

        def forward(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
            x = to_device(np.stack(arrays), device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, S, S] in [-1, 1]
            wplus = invert_wplus(G, enc, x, *self.refine)  # [B, L, W]
            with torch.no_grad():
                s = G.w_to_s(wplus)  # [B, D]
            out = {"s": s.float().cpu().numpy()}
            if self.keep_wplus:
                out["wplus"] = wplus.float().cpu().numpy()
            return out

        results, status, lines = encode_image_block(
            self.sources[rows],
            self.root,
            self.max_pixels,
            prepare,
            forward,
            self.batch_size,
            decode_threads_for(self.decode_threads),
        )
        shapes: dict[str, tuple[int, ...]] = {"s": (G.layout.dim,)}
        if self.keep_wplus:
            shapes["wplus"] = (G.n_latent, G.w_dim)
        return start, results, status, lines, shapes

    def write(self, block: int, result: tuple) -> BlockReport:
        return write_encoded(self.out_url, self.storage_options, block, result)


def run_encode_s(
    cfg: EncodeSConfig,
    generator: GeneratorRef,
    e4e: E4ERef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
    reuse: Sequence[str] = (),
) -> EncodeResult:
    """Invert every OK manifest row of `cfg.dataset` into `<dataset>/s.zarr`, reusing the
    rows of the previous s.zarr and of `reuse` stores by key; resumable."""
    return leased(
        [store_url(cfg.dataset, "s")],
        "encode-s",
        execution,
        lambda: _encode_s(
            cfg, generator, e4e, execution, overwrite, progress, restart_on_change, reuse
        ),
    )


def _encode_s(
    cfg: EncodeSConfig,
    generator: GeneratorRef,
    e4e: E4ERef,
    execution: ExecutionConfig,
    overwrite: bool,
    progress: bool,
    restart_on_change: bool,
    reuse: Sequence[str],
) -> EncodeResult:
    so = execution.storage()
    RowStore.open(store_url(cfg.dataset, "manifest"), require_complete=True, storage_options=so)
    refs = {"generator": generator, "e4e": e4e}
    dtype = {} if cfg.dtype == "float32" else {"dtype": cfg.dtype}
    refine = (cfg.refine_steps, cfg.refine_lr)
    extra = dtype | ({"refine": list(refine)} if cfg.refine_steps else {})
    inputs = model_inputs(refs, [generator.path, e4e.path], keep_wplus=cfg.keep_wplus, **extra)
    fresh = overwrite or reuse
    done = None if fresh else up_to_date(cfg.dataset, "s", inputs, "encode-s", so)
    if done is not None:
        return done
    device = resolve_device(execution.device)
    G = load_generator_ref(generator, device)
    enc = load_e4e_ref(e4e, device)
    if (enc.n_latent, enc.w_dim) != (G.n_latent, G.w_dim):
        raise EncodeSError(
            f"e4e gives W+ [{enc.n_latent}, {enc.w_dim}] but the generator takes "
            f"[{G.n_latent}, {G.w_dim}]; use the e4e trained for this generator "
            f"(params e4e.path / e4e.config)"
        )
    arrays = {"s": ArraySpec((G.layout.dim,), cfg.dtype)}
    if cfg.keep_wplus:
        arrays["wplus"] = ArraySpec((G.n_latent, G.w_dim), "float32")
    attrs = {
        "stage": "encode-s",
        "inputs": inputs,
        "fingerprint": s_fingerprint(G.fingerprint, enc.fingerprint, cfg.dtype, refine),
        "generator": G.fingerprint,
        "e4e": enc.fingerprint,
        "layout": G.layout.to_dict(),
    }

    def make_task(*head) -> _STask:  # (compute url, sources, root, max_pixels)
        return _STask(
            *head,
            for_workers(generator),
            for_workers(e4e),
            execution.device,
            execution.batch_size,
            decode_setting(cfg.decode_threads, execution),
            cfg.keep_wplus,
            refine,
            dict(so),
        )

    return run_image_pass(
        cfg.dataset,
        "s",
        arrays,
        attrs,
        make_task,
        execution,
        reuse,
        overwrite,
        restart_on_change,
        progress,
    )
