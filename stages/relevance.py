"""Relevance stage: per conv channel, the CLIP image-space direction it moves (StyleCLIP's
global-direction statistics, `fs3.npy` in the official code), plus S mean and std.

    finite-difference (the published recipe), for each conv channel k and base image i:
        s_i^+ = s_i with s_k = mean_k + sigma * std_k;  s_i^- = ... - sigma * std_k
        d_ik  = normalize(normalize(CLIP(G(s_i^+))) - normalize(CLIP(G(s_i^-))))
        r_k   = normalize(mean_i d_ik)
    jacobian: d_ik = normalize(J_i e_k), the derivative of normalize(CLIP(G(s))) along
        channel k at s_i with s_k = mean_k (the midpoint of the finite difference),
        by forward-mode autograd (torch.func.jvp; double-backward when an op lacks
        forward AD), one channel per batch row.

Output `relevance.zarr`: a RowStore whose rows are the S channels (all D of them, in
layout order): `directions` [D, E] (toRGB rows zero, status SKIPPED: DeltaEdit never
moves them), `s_mean` [D], `s_std` [D]. `read_relevance()` hands out directions
[Dconv, E] for the conv channels. Work units are blocks of channels, so a long pass
resumes. `fs3_path` imports a published `fs3.npy` [Dconv, E] instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from model.layout import SLayout
from stages.common import ClipRef, ExecutionConfig, GeneratorRef, autocast, resolve_device
from stages.config import require
from stages.execution import for_workers
from store.fs import absolute

Method = Literal["finite-difference", "jacobian"]


@dataclass(frozen=True)
class RelevanceConfig:
    """`relevance:` in params."""

    method: Method = "finite-difference"
    store: str = "data/images"  # dataset root whose s.zarr gives statistics and base images
    out: str = "data/relevance.zarr"
    n_images: int = 8  # base images per channel (the official fs3 used about 100)
    sigma: float = 5.0  # finite difference: channel set to mean +/- sigma * std
    seed: int = 0  # which stored rows are the base images
    channels_per_block: int = 64  # resume unit (rows of relevance.zarr per shard)
    fs3_path: str | None = None  # import a published fs3.npy [Dconv, E] instead of computing
    overwrite: bool = False

    def validate(self) -> None:
        require(self.n_images >= 1, "n_images", self.n_images, "an integer >= 1")
        require(0 < self.sigma <= 100, "sigma", self.sigma, "a number in (0, 100]")
        require(
            self.channels_per_block >= 1,
            "channels_per_block",
            self.channels_per_block,
            "an integer >= 1",
        )
        if self.fs3_path is not None:
            require(str(self.fs3_path).endswith(".npy"), "fs3_path", self.fs3_path, "a .npy file")


class RelevanceError(ValueError):
    """Bad relevance input (wrong fs3 shape, empty store ...): one line."""


@dataclass
class Relevance:
    directions: torch.Tensor  # [Dconv, E] unit rows
    s_mean: np.ndarray  # [D]
    s_std: np.ndarray  # [D]
    attrs: dict


# --- math ------------------------------------------------------------------------------


def s_statistics(s_store: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std [D] of the stored codes over `rows` (ok rows), streamed per block."""
    d = s_store.shape("s")[1]
    total = np.zeros(d, dtype=np.float64)
    total_sq = np.zeros(d, dtype=np.float64)
    n = 0
    for b in range(s_store.n_blocks):
        sl = s_store.block_rows(b)
        r = rows[(rows >= sl.start) & (rows < sl.stop)]
        if len(r) == 0:
            continue
        x = s_store.read("s", rows=sl)[r - sl.start].astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        n += len(r)
    if n == 0:
        raise RelevanceError(f"{s_store.url}: no ok rows to compute S statistics from")
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _embed(generator: Any, clip: Any, s: torch.Tensor, preprocessing: str) -> torch.Tensor:
    """normalize(CLIP(G(s))) [B, E]."""
    img = generator.synthesize(s, noise_mode="const").float()
    return _normalize(clip.encode_images(img, preprocessing=preprocessing).float())


def _rows_for(base: torch.Tensor, channels: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """All (image, channel) pairs as a batch: s [n_img * n_ch, D] and each row's channel."""
    n_img, n_ch = base.shape[0], len(channels)
    s = base.repeat_interleave(n_ch, dim=0)  # image-major: rows i*n_ch + j
    ch = np.tile(channels, n_img)
    return s, ch


def finite_difference_directions(
    generator: Any,
    clip: Any,
    base: torch.Tensor,
    channels: np.ndarray,
    s_mean: torch.Tensor,
    s_std: torch.Tensor,
    sigma: float = 5.0,
    batch_size: int = 64,
    preprocessing: str = "deltaedit",
) -> torch.Tensor:
    """directions [len(channels), E] for flat-S channel indices `channels`.

    base: S codes [n_img, D] of the base images. Many channels share one forward:
    each batch row is one (image, channel, sign).
    """
    s_all, ch_all = _rows_for(base, channels)
    n_img, n_ch = base.shape[0], len(channels)
    d = torch.zeros(len(s_all), clip.embed_dim)
    half = max(1, batch_size // 2)
    with torch.no_grad():
        for i in range(0, len(s_all), half):
            s = s_all[i : i + half].clone()
            ch = torch.as_tensor(ch_all[i : i + half], device=s.device)
            r = torch.arange(len(s), device=s.device)
            hi, lo = s.clone(), s
            hi[r, ch] = s_mean[ch] + sigma * s_std[ch]
            lo[r, ch] = s_mean[ch] - sigma * s_std[ch]
            e = _embed(generator, clip, torch.cat([hi, lo]), preprocessing)
            d[i : i + len(s)] = _normalize(e[: len(s)] - e[len(s) :]).cpu()
    return _normalize(d.view(n_img, n_ch, -1).mean(0))


_MHA_LOCK = threading.Lock()
_MHA_USERS = [0, True]  # threads inside _math_attention, fast-path setting to restore


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Attention on plain math kernels: the fused MHA fast path and flash SDPA have no
    forward-mode derivative and no double backward. The fast-path switch is process-wide,
    so threads (Dask workers) share it through a counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _MHA_LOCK:
        if _MHA_USERS[0] == 0:
            _MHA_USERS[1] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _MHA_USERS[0] += 1
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        with _MHA_LOCK:
            _MHA_USERS[0] -= 1
            if _MHA_USERS[0] == 0:
                torch.backends.mha.set_fastpath_enabled(_MHA_USERS[1])


def _jvp(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor):
    """J_f(x) v by forward mode; falls back to the double-backward trick."""
    with _math_attention():
        try:
            from torch.func import jvp

            return jvp(f, (x,), (v,))[1]
        except (RuntimeError, NotImplementedError):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = f(x)
                u = torch.zeros_like(y, requires_grad=True)
                (g,) = torch.autograd.grad(y, x, u, create_graph=True)  # J^T u, linear in u
                (jv,) = torch.autograd.grad(g, u, v)  # d/du <J^T u, v> = J v
            return jv


def jacobian_directions(
    generator: Any,
    clip: Any,
    base: torch.Tensor,
    channels: np.ndarray,
    s_mean: torch.Tensor,
    s_std: torch.Tensor,
    batch_size: int = 64,
    preprocessing: str = "deltaedit",
) -> torch.Tensor:
    """directions [len(channels), E] from directional derivatives (one channel per row)."""
    s_all, ch_all = _rows_for(base, channels)
    n_img, n_ch = base.shape[0], len(channels)
    d = torch.zeros(len(s_all), clip.embed_dim)

    def f(s: torch.Tensor) -> torch.Tensor:
        return _embed(generator, clip, s, preprocessing)

    for i in range(0, len(s_all), batch_size):
        s = s_all[i : i + batch_size].clone()
        ch = torch.as_tensor(ch_all[i : i + batch_size], device=s.device)
        r = torch.arange(len(s), device=s.device)
        s[r, ch] = s_mean[ch]
        v = torch.zeros_like(s)
        v[r, ch] = s_std[ch].clamp_min(1e-8)
        d[i : i + len(s)] = _normalize(_jvp(f, s, v).detach()).cpu()
    return _normalize(d.view(n_img, n_ch, -1).mean(0))


# --- stage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RelevanceTask:
    """One block of channels (picklable: runs on a Dask worker)."""

    out_url: str
    generator: GeneratorRef
    clip: ClipRef
    method: Method
    sigma: float
    base: np.ndarray  # [n_img, D]
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    device: str  # as configured ('auto' resolves on the worker)
    batch_size: int
    storage_options: dict = field(default_factory=dict)
    precision: str = "fp32"  # execution.precision: generator + CLIP compute dtype

    def __call__(self, block: int):
        from stages.execution import BlockReport, load_clip_ref, load_generator_ref
        from store import RowStore, Status

        t0 = time.perf_counter()
        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any
        out = RowStore.open(self.out_url, storage_options=self.storage_options)
        layout = SLayout.from_dict(out.attrs["layout"])
        sl = out.block_rows(block)
        is_conv = np.zeros(layout.dim, dtype=bool)
        is_conv[layout.conv_index()] = True
        chans = np.arange(sl.start, sl.stop)
        conv = chans[is_conv[sl]]
        mean, std = self.mean, self.std
        dirs = np.zeros((len(chans), out.shape("directions")[1]), dtype=np.float32)
        if len(conv):
            G = load_generator_ref(self.generator, device)
            clip = load_clip_ref(self.clip, device)
            base = torch.as_tensor(self.base, device=device)
            m = torch.as_tensor(mean, device=device)
            sd = torch.as_tensor(std, device=device)
            pre = self.clip.preprocessing
            with autocast(device, self.precision):
                if self.method == "finite-difference":
                    d = finite_difference_directions(
                        G, clip, base, conv, m, sd, self.sigma, self.batch_size, pre
                    )
                else:
                    d = jacobian_directions(G, clip, base, conv, m, sd, self.batch_size, pre)
            dirs[is_conv[sl]] = d.float().numpy()
        status = np.where(is_conv[sl], int(Status.OK), int(Status.SKIPPED)).astype(np.uint8)
        out.write_block(block, {"directions": dirs, "s_mean": mean[sl], "s_std": std[sl]}, status)
        return BlockReport(
            block,
            len(chans),
            {"OK": len(conv), "SKIPPED": len(chans) - len(conv)},
            seconds=time.perf_counter() - t0,
        )


def _fingerprint(attrs: dict) -> str:
    return hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()


def run(
    cfg: RelevanceConfig,
    generator_ref: GeneratorRef | None = None,
    clip_ref: ClipRef | None = None,
    execution: ExecutionConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Relevance:
    """Compute (or import) relevance.zarr for the dataset at `cfg.store`."""
    from stages.execution import hold_outputs

    execution = execution or ExecutionConfig()
    with hold_outputs([cfg.out], "relevance", execution, log):
        return _relevance(cfg, generator_ref, clip_ref, execution, progress, log)


def _relevance(
    cfg: RelevanceConfig,
    generator_ref: GeneratorRef | None,
    clip_ref: ClipRef | None,
    execution: ExecutionConfig,
    progress: bool,
    log: Callable[[str], None],
) -> Relevance:
    from stages.edit import dataset_urls
    from stages.execution import load_clip_ref, load_generator_ref, run_blocks
    from store import ArraySpec, RowStore

    generator_ref = generator_ref or GeneratorRef()
    clip_ref = clip_ref or ClipRef()
    device = resolve_device(execution.device)
    so = execution.storage()
    s_store = RowStore.open(dataset_urls(cfg.store)["s"], storage_options=so)
    layout = SLayout.from_dict(s_store.attrs["layout"])
    ok = s_store.ok_rows()
    if len(ok) == 0:
        raise RelevanceError(f"{s_store.url}: no ok rows (run encode-s or sample first)")

    if cfg.fs3_path is not None:
        return import_fs3(cfg, s_store, layout, ok, log, so)

    G = load_generator_ref(generator_ref, device)
    clip = load_clip_ref(clip_ref, device)
    if G.layout.to_dict() != layout.to_dict():
        raise RelevanceError(
            f"generator S layout (D {G.layout.dim}) differs from {s_store.url}'s (D {layout.dim}); "
            "set generator: to the one that made the store"
        )
    recorded = s_store.attrs.get("generator")
    if isinstance(recorded, str) and recorded != G.fingerprint:
        raise RelevanceError(
            f"{s_store.url} was made with generator {recorded[:12]}, params name "
            f"{G.fingerprint[:12]}; set generator: to the one that made the store"
        )
    mean, std = s_statistics(s_store, ok)
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(ok, size=min(cfg.n_images, len(ok)), replace=False))
    base = s_store.read("s", rows=pick).astype(np.float32)
    attrs = {
        "stage": "relevance",
        "method": cfg.method,
        "n_images": len(pick),
        "sigma": cfg.sigma,
        "seed": cfg.seed,
        "generator": G.fingerprint,
        "clip": clip.fingerprint,
        "clip_name": clip.name,
        "preprocessing": clip_ref.preprocessing,
        "source": s_store.url,
        "source_fingerprint": s_store.attrs.get("fingerprint"),
        "layout": layout.to_dict(),
        "stats_sha256": hashlib.sha256(mean.tobytes() + std.tobytes()).hexdigest(),
    }
    if execution.precision != "fp32":  # bf16 directions differ from fp32 ones
        attrs["precision"] = execution.precision
    attrs["fingerprint"] = _fingerprint(attrs)
    out = _create(cfg, layout, clip.embed_dim, attrs, ArraySpec, RowStore, so)
    task = _RelevanceTask(
        absolute(out.url),
        for_workers(generator_ref),
        for_workers(clip_ref),
        cfg.method,
        cfg.sigma,
        base,
        mean,
        std,
        execution.device,
        execution.batch_size,
        dict(so),
        execution.precision,
    )
    pending = out.pending_blocks()
    summary = run_blocks(
        task,
        pending,
        execution,
        f"relevance {cfg.method} (rows = S channels, toRGB skipped)",
        out.n_blocks,
        progress,
        resources=execution.model_resources(),
    )
    log(summary.line())
    return read_relevance(out.url, so)


def _create(
    cfg: RelevanceConfig, layout: SLayout, e: int, attrs: dict, ArraySpec, RowStore, so: dict
):
    spec = {
        "directions": ArraySpec((e,), "float32"),
        "s_mean": ArraySpec((), "float32"),
        "s_std": ArraySpec((), "float32"),
    }
    mode = "overwrite" if cfg.overwrite else "resume"
    from store import FingerprintMismatch, StoreError

    try:
        return RowStore.create(cfg.out, layout.dim, cfg.channels_per_block, spec, attrs, mode, so)
    except (FingerprintMismatch, StoreError):
        # another method / model / dataset: a new relevance replaces the old one
        return RowStore.create(
            cfg.out, layout.dim, cfg.channels_per_block, spec, attrs, "overwrite", so
        )


def import_fs3(
    cfg: RelevanceConfig,
    s_store: Any,
    layout: SLayout,
    ok: np.ndarray,
    log: Callable,
    so: dict | None = None,
) -> Relevance:
    """A published fs3.npy [Dconv, E] as relevance.zarr (statistics from the stored codes)."""
    from store import ArraySpec, RowStore, Status

    path = Path(str(cfg.fs3_path))
    if not path.exists():
        raise RelevanceError(f"relevance.fs3_path {path}: no such file")
    try:
        fs3 = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise RelevanceError(f"{path}: not a plain .npy array ({exc})") from None
    if fs3.ndim != 2 or fs3.shape[0] != layout.conv_dim:
        raise RelevanceError(
            f"{path}: shape {fs3.shape}, expected [Dconv, E] with Dconv = {layout.conv_dim} "
            f"conv channels of {s_store.url}'s S layout (6048 for 1024 px config-f)"
        )
    if not np.isfinite(fs3).all():
        raise RelevanceError(f"{path}: holds NaN or inf values")
    mean, std = s_statistics(s_store, ok)
    attrs = {
        "stage": "relevance",
        "method": "official-fs3",
        "n_images": None,
        "fs3_sha256": hashlib.sha256(fs3.tobytes()).hexdigest(),
        "generator": s_store.attrs.get("generator"),
        "clip": None,
        "source": s_store.url,
        "source_fingerprint": s_store.attrs.get("fingerprint"),
        "layout": layout.to_dict(),
    }
    attrs["fingerprint"] = _fingerprint(attrs)
    out = _create(cfg, layout, fs3.shape[1], attrs, ArraySpec, RowStore, so or {})
    full = np.zeros((layout.dim, fs3.shape[1]), dtype=np.float32)
    idx = layout.conv_index()
    full[idx] = fs3.astype(np.float32)
    is_conv = np.zeros(layout.dim, dtype=bool)
    is_conv[idx] = True
    for b in out.pending_blocks():
        sl = out.block_rows(b)
        status = np.where(is_conv[sl], int(Status.OK), int(Status.SKIPPED)).astype(np.uint8)
        out.write_block(b, {"directions": full[sl], "s_mean": mean[sl], "s_std": std[sl]}, status)
    log(f"relevance: imported {path} ({fs3.shape[0]} x {fs3.shape[1]}) -> {out.url}")
    return read_relevance(out.url, so)


def read_relevance(url: str, storage_options: dict | None = None) -> Relevance:
    """relevance.zarr -> directions [Dconv, E] (conv channels, layout order), s_mean, s_std."""
    from store import RowStore

    st = RowStore.open(url, require_complete=True, storage_options=storage_options)
    layout = SLayout.from_dict(st.attrs["layout"])
    idx = layout.conv_index()
    dirs = st.read("directions")[idx]
    return Relevance(torch.as_tensor(dirs), st.read("s_mean"), st.read("s_std"), dict(st.attrs))


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Per-channel cosine between two direction sets [Dconv, E]: median, 10th percentile."""
    cos = (_normalize(a.float()) * _normalize(b.float())).sum(-1).numpy()
    return {
        "median": float(np.median(cos)),
        "p10": float(np.percentile(cos, 10)),
        "mean": float(cos.mean()),
    }
