"""Stage `encode-s`: manifest OK rows -> e4e -> W+ -> S -> `<dataset>/s.zarr`.

Each image is resized to the e4e input size (bilinear, as the official
transforms), mapped to [-1, 1], inverted by e4e to W+ [L, W], and turned into the
generator's StyleSpace code s = G.w_to_s(W+) [D]. Stores s [N, D] and, when
`encode_s.keep_wplus`, wplus [N, L, W]. attrs: fingerprint = sha256(generator
fingerprint + e4e fingerprint), generator, e4e, layout (SLayout.to_dict()).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from stages.common import E4ERef, ExecutionConfig, GeneratorRef, resolve_device
from stages.config import require
from stages.encode_clip import EncodeResult, assemble, counts_of, encode_image_block
from stages.execution import (
    BlockReport,
    create_output,
    for_workers,
    load_e4e_ref,
    load_generator_ref,
    run_blocks,
)
from store import ArraySpec, RowStore, store_url
from store.fs import absolute


@dataclass(frozen=True)
class EncodeSConfig:
    """`encode_s:` in params."""

    dataset: str = "data/images"  # holds manifest.zarr; s.zarr is written beside it
    keep_wplus: bool = False  # also store the e4e W+ [N, L, W]
    decode_threads: int = 2

    def validate(self) -> None:
        require(bool(self.dataset), "dataset", self.dataset, "a dataset folder or URL")
        require(self.decode_threads >= 0, "decode_threads", self.decode_threads, "an integer >= 0")


class EncodeSError(ValueError):
    """The e4e encoder and the generator do not fit together; one line."""


def s_fingerprint(generator_fp: str, e4e_fp: str) -> str:
    return hashlib.sha256(f"{generator_fp}+{e4e_fp}".encode()).hexdigest()


def e4e_pixels(img: Image.Image, size: int) -> np.ndarray:
    """Decode-thread half (Pillow only): RGB, bilinear resize to size x size (no crop, as
    the official transforms) -> uint8 [size, size, 3]."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def to_input(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> e4e input [3, size, size] float in [-1, 1]."""
    return torch.from_numpy(e4e_pixels(img, size).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass(frozen=True)
class _STask:
    manifest_url: str
    out_url: str
    generator: GeneratorRef
    e4e: E4ERef
    device: str
    batch_size: int
    decode_threads: int
    keep_wplus: bool
    storage_options: dict = field(default_factory=dict)

    def __call__(self, block: int) -> BlockReport:
        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        start = time.perf_counter()
        manifest = RowStore.open(self.manifest_url, storage_options=self.storage_options)
        out = RowStore.open(self.out_url, storage_options=self.storage_options)
        G = load_generator_ref(self.generator, device)
        enc = load_e4e_ref(self.e4e, device)
        rows = out.block_rows(block)

        def prepare(img: Image.Image) -> np.ndarray:
            return e4e_pixels(img, enc.input_size)

        def forward(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
            x = torch.from_numpy(np.stack(arrays)).to(device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, S, S] in [-1, 1]
            with torch.no_grad():
                wplus = enc(x)  # [B, L, W]
                s = G.w_to_s(wplus)  # [B, D]
            out = {"s": s.float().cpu().numpy()}
            if self.keep_wplus:
                out["wplus"] = wplus.float().cpu().numpy()
            return out

        results, status, lines = encode_image_block(
            manifest, rows, prepare, forward, self.batch_size, self.decode_threads
        )
        shapes: dict[str, tuple[int, ...]] = {"s": (G.layout.dim,)}
        if self.keep_wplus:
            shapes["wplus"] = (G.n_latent, G.w_dim)
        out.write_block(block, assemble(results, len(status), shapes), status)
        return BlockReport(
            block, len(status), counts_of(status), tuple(lines), time.perf_counter() - start
        )


def run_encode_s(
    cfg: EncodeSConfig,
    generator: GeneratorRef,
    e4e: E4ERef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
) -> EncodeResult:
    """Invert every OK manifest row of `cfg.dataset` into `<dataset>/s.zarr`; resumable."""
    device = resolve_device(execution.device)
    so = execution.storage_options
    manifest_url = store_url(cfg.dataset, "manifest")
    manifest = RowStore.open(manifest_url, require_complete=True, storage_options=so)
    G = load_generator_ref(generator, device)
    enc = load_e4e_ref(e4e, device)
    if (enc.n_latent, enc.w_dim) != (G.n_latent, G.w_dim):
        raise EncodeSError(
            f"e4e gives W+ [{enc.n_latent}, {enc.w_dim}] but the generator takes "
            f"[{G.n_latent}, {G.w_dim}]; use the e4e trained for this generator "
            f"(params e4e.path / e4e.config)"
        )
    arrays = {"s": ArraySpec((G.layout.dim,), "float32")}
    if cfg.keep_wplus:
        arrays["wplus"] = ArraySpec((G.n_latent, G.w_dim), "float32")
    attrs = {
        "stage": "encode-s",
        "fingerprint": s_fingerprint(G.fingerprint, enc.fingerprint),
        "generator": G.fingerprint,
        "e4e": enc.fingerprint,
        "layout": G.layout.to_dict(),
        "manifest": manifest.fingerprint,
    }
    out_url = store_url(cfg.dataset, "s")
    notes: list[str] = []
    out = create_output(
        out_url,
        manifest.n_rows,
        manifest.rows_per_shard,
        arrays,
        attrs,
        overwrite,
        restart_on_change,
        notes,
        so,
    )
    task = _STask(
        absolute(manifest_url),
        absolute(out_url),
        for_workers(generator),
        for_workers(e4e),
        execution.device,
        execution.batch_size,
        cfg.decode_threads,
        cfg.keep_wplus,
        dict(so),
    )
    summary = run_blocks(task, out.pending_blocks(), execution, "encode-s", out.n_blocks, progress)
    summary.notes.extend(notes)
    return EncodeResult(out_url, summary)
