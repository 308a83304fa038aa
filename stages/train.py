"""Train stage: the Delta Mapper from random pairs of stored latents, without text.

DeltaEdit training (paper + official code). For random pairs (i, j) drawn uniformly
over the ok rows of every store given (e.g. inverted images + generator samples):

    c_hat     = normalize(c)                                   CLIP image embeddings [B, E]
    cond      = [c_hat_i || normalize(c_hat_j - c_hat_i)]      [B, 2E]
    delta_s   = s_j - s_i                                      conv channels only [B, Dconv]
    pred      = mapper(s_i, cond)
    loss      = l2_lambda * MSE(pred, delta_s) + cos_lambda * (1 - mean cos(pred, delta_s))

Adam, lr 0.5 on the official (lr_mul 0.01) parametrization, batch 64.

A seeded fraction of each store's rows is held out; every `val_every` steps the
mapper is scored on a fixed set of held-out pairs (mean cosine and MSE), next to
two baselines: the zero mapper (cosine 0, MSE = mean delta_s^2) and the mean delta,
E_j[s_j - s_i] = mean(s) - s_i: the best a mapper can do without the CLIP condition.

Checkpoints: the mapper (`out`, safetensors + json, official key names) and the
training state beside it (`<out>.train.safetensors` + json: the parameters as trained,
Adam state, step, sampler state, RNG states). `resume=True` continues from that state
and reproduces the uninterrupted run's losses exactly. Metrics go through dvclive to
`metrics_dir` (metrics.json + plots/metrics/*.tsv).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.layout import SLayout
from model.mapper import DeltaMapper, save_mapper
from stages.common import ExecutionConfig, autocast, release_freed_memory, resolve_device
from stages.config import require

STATE_FORMAT = "deltaedit-train-state"
# Config keys that change the training trajectory: a resume must keep them.
TRAJECTORY_KEYS = (
    "stores",
    "batch_size",
    "lr",
    "l2_lambda",
    "cos_lambda",
    "seed",
    "holdout_fraction",
    "val_pairs",
    "memory_budget_mb",
    "shuffle_targets",
)


class TrainError(ValueError):
    """Bad input for training (stores, checkpoints, config); a one-line message."""


@dataclass(frozen=True)
class TrainConfig:
    """`train:` in params. Defaults = the tiny configuration (minutes on 2 CPU cores)."""

    stores: tuple[str, ...] = ("data/images", "data/sampled")  # roots with clip.zarr + s.zarr
    out: str = "data/mapper.safetensors"
    metrics_dir: str = "data/metrics/train"
    iterations: int = 4000
    batch_size: int = 64
    lr: float = 0.5  # on the official parametrization (EqualLinear lr_mul 0.01)
    l2_lambda: float = 1.0
    cos_lambda: float = 1.0
    seed: int = 0
    holdout_fraction: float = 0.1  # of each store's ok rows, seeded
    val_pairs: int = 512  # fixed held-out pairs scored every val_every steps
    val_every: int = 200
    checkpoint_every: int = 500
    log_every: int = 10  # steps averaged per logged training loss
    memory_budget_mb: float = 1024.0  # pair sampler: in memory if it fits, else shard-blocked
    prefetch: int = 4  # batches prepared ahead in a thread, shard-blocked sampler (0 = none)
    expect_clip_fingerprint: str | None = None  # refuse stores of another CLIP (prefix ok)
    expect_generator_fingerprint: str | None = None  # refuse stores of another generator
    shuffle_targets: bool = False  # negative control: targets of other pairs (chance level)
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = auto (1 for a small mapper)
    # S channels the mapper predicts: "conv" (DeltaEdit: toRGB styles stay the source's)
    # or "all" (conv + toRGB; recorded in the mapper's config, the edit follows it)
    channels: str = "conv"
    # a finished mapper whose stores gained or lost rows since: false = keep it and say it is
    # stale (how many rows changed); true = train again (also `deltaedit train --retrain`)
    retrain: bool = False
    # share of the pairs whose partner is one of the `near_k` rows nearest in CLIP space
    # (store.sampler): an edit is a near pair, random pairs are far apart; 0 = DeltaEdit's
    # random pairs only
    near_pairs: float = 0.0
    near_k: int = 32

    def validate(self) -> None:
        require(len(self.stores) >= 1, "stores", list(self.stores), "at least one store root")
        require(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "lr", self.lr, "a number > 0")
        require(self.l2_lambda >= 0, "l2_lambda", self.l2_lambda, "a number >= 0")
        require(self.cos_lambda >= 0, "cos_lambda", self.cos_lambda, "a number >= 0")
        require(
            0 <= self.holdout_fraction < 1,
            "holdout_fraction",
            self.holdout_fraction,
            "a fraction in [0, 1)",
        )
        require(self.val_pairs >= 1, "val_pairs", self.val_pairs, "an integer >= 1")
        require(self.val_every >= 1, "val_every", self.val_every, "an integer >= 1")
        require(
            self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "an integer >= 1"
        )
        require(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        require(self.memory_budget_mb > 0, "memory_budget_mb", self.memory_budget_mb, "> 0")
        require(self.prefetch >= 0, "prefetch", self.prefetch, "an integer >= 0")
        require(self.cpu_threads >= 0, "cpu_threads", self.cpu_threads, "an integer >= 0")
        require(self.channels in ("conv", "all"), "channels", self.channels, "conv or all")
        require(0 <= self.near_pairs <= 1, "near_pairs", self.near_pairs, "a fraction in [0, 1]")
        require(self.near_k >= 1, "near_k", self.near_k, "an integer >= 1")
        require(self.out.endswith(".safetensors"), "out", self.out, "a path ending .safetensors")
        for key in ("expect_clip_fingerprint", "expect_generator_fingerprint"):
            fp = getattr(self, key)
            require(fp is None or len(fp) >= 8, key, fp, "a fingerprint (or its first >= 8 chars)")

    def trajectory(self) -> dict[str, Any]:
        out = {k: _plain(getattr(self, k)) for k in TRAJECTORY_KEYS}
        if self.channels != "conv":  # conv (the default) keeps older states resumable
            out["channels"] = self.channels
        if self.near_pairs:  # likewise: random pairs only (the default) adds no key
            out["near_pairs"] = self.near_pairs
            out["near_k"] = self.near_k
        return out


@dataclass
class TrainResult:
    mapper_path: str
    state_path: str
    step: int  # steps done in total
    losses: list[float]  # training loss of each step run in this call
    val: dict[str, float]  # last validation (+ baselines); empty without a held-out set
    history: list[dict[str, float]] = field(default_factory=list)  # every validation
    steps_per_s: float = 0.0
    data_wait_fraction: float = 0.0  # share of loop time spent waiting for batches
    sampler_mode: str = ""  # "memory" or "sharded"


# --- the math -----------------------------------------------------------------------


def normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def make_cond(c_i: torch.Tensor, c_j: torch.Tensor) -> torch.Tensor:
    """[c_hat_i || normalize(c_hat_j - c_hat_i)]: [B, E] x 2 -> [B, 2E]."""
    c_hat_i, c_hat_j = normalize(c_i), normalize(c_j)
    return torch.cat([c_hat_i, normalize(c_hat_j - c_hat_i)], dim=1)


def mapper_loss(
    pred: torch.Tensor, target: torch.Tensor, l2_lambda: float = 1.0, cos_lambda: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, mean cosine) of predicted vs true delta_s [B, Dconv]."""
    mse = F.mse_loss(pred, target)
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    return l2_lambda * mse + cos_lambda * (1 - cos), mse, cos


@dataclass
class Batch:
    s: torch.Tensor  # s_i conv [B, Dconv]
    cond: torch.Tensor  # [B, 2E]
    target: torch.Tensor  # s_j - s_i conv [B, Dconv]
    sampler_state: dict | None = None  # the sampler's state right after drawing it


def prepare_batch(raw: dict[str, np.ndarray], device: str, perm: np.ndarray | None = None) -> Batch:
    s_i, s_j = torch.from_numpy(raw["s_i"]), torch.from_numpy(raw["s_j"])
    target = s_j - s_i
    if perm is not None:
        target = target[torch.from_numpy(perm)]
    cond = make_cond(torch.from_numpy(raw["c_i"]), torch.from_numpy(raw["c_j"]))
    return Batch(s_i.to(device), cond.to(device), target.to(device))


# --- background batches -------------------------------------------------------------


class Prefetcher:
    """Runs `make(step)` for steps start+1..stop in a background thread, `depth` ahead."""

    _DONE = object()

    def __init__(self, make: Callable[[int], Batch], start: int, stop: int, depth: int) -> None:
        self._make, self._start, self._stop_step = make, start, stop
        self._depth = depth
        self._next = start + 1
        if depth > 0:
            self._q: queue.Queue = queue.Queue(maxsize=depth)
            self._halt = threading.Event()
            self._thread = threading.Thread(target=self._work, name="train-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        try:
            for step in range(self._start + 1, self._stop_step + 1):
                item: Any = self._make(step)
                while not self._halt.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._halt.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._q.put(exc)

    def get(self) -> Batch:
        if self._depth == 0:
            self._next += 1
            return self._make(self._next - 1)
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self._depth == 0:
            return
        self._halt.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


# --- stores -------------------------------------------------------------------------


@dataclass
class Dataset:
    """The stores to train on, checked to belong together."""

    sources: list[Any]  # store.SamplerSource per store (rows = training rows)
    held_out: list[np.ndarray]  # held-out store rows per store
    layout: SLayout
    clip_dim: int
    clip_fingerprint: str | None
    generator_fingerprint: str | None


def _generator_fingerprint(attrs: dict) -> str | None:
    for key in ("generator_fingerprint", "generator"):
        v = attrs.get(key)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, dict) and isinstance(v.get("fingerprint"), str):
            return v["fingerprint"]
    if "e4e" in attrs or "e4e_fingerprint" in attrs:
        return None  # the store fingerprint mixes in the encoder
    fp = attrs.get("fingerprint")
    return fp if isinstance(fp, str) else None


def _remake(attrs: dict) -> str:
    stage = attrs.get("stage")
    return f"`deltaedit {stage}`" if isinstance(stage, str) else "the stage that wrote it"


def _matches(expected: str, actual: str | None) -> bool:
    return actual is not None and len(expected) >= 8 and actual.startswith(expected)


def open_dataset(cfg: TrainConfig, storage_options: dict | None = None) -> Dataset:
    """Open every store's clip.zarr + s.zarr, check they agree, split rows (seeded)."""
    from store import RowStore, SamplerSource, StoreError, store_url
    from store.inspect import count_non_finite

    so = storage_options
    sources, held_out = [], []
    layout = clip_dim = clip_fp = gen_fp = None
    first = None
    for k, root in enumerate(cfg.stores):
        try:
            s_store = RowStore.open(store_url(root, "s"), storage_options=so)
            c_store = RowStore.open(store_url(root, "clip"), storage_options=so)
        except StoreError as exc:
            raise TrainError(f"train.stores[{k}] {root}: {exc}") from None
        for st, name in ((s_store, "s"), (c_store, "embed")):
            if name not in st.array_names:
                raise TrainError(f"{st.url}: no {name!r} array (has {st.array_names})")
        if s_store.n_rows != c_store.n_rows:
            raise TrainError(
                f"{root}: s.zarr has {s_store.n_rows} rows, clip.zarr {c_store.n_rows}; "
                "encode both from the same manifest"
            )
        if "layout" not in s_store.attrs:
            raise TrainError(f"{s_store.url}: no S layout in its attrs; rerun encode-s")
        lay = SLayout.from_dict(s_store.attrs["layout"])
        e = int(c_store.shape("embed")[1])
        c_fp = c_store.attrs.get("fingerprint")
        g_fp = _generator_fingerprint(s_store.attrs)
        if cfg.expect_clip_fingerprint and not _matches(cfg.expect_clip_fingerprint, c_fp):
            raise TrainError(
                f"{c_store.url} was encoded with CLIP {str(c_fp)[:12]}, params expect "
                f"{cfg.expect_clip_fingerprint[:12]} (train.expect_clip_fingerprint)"
            )
        if cfg.expect_generator_fingerprint and not _matches(
            cfg.expect_generator_fingerprint, g_fp
        ):
            raise TrainError(
                f"{s_store.url} was made with generator {str(g_fp)[:12]}, params expect "
                f"{cfg.expect_generator_fingerprint[:12]} (train.expect_generator_fingerprint)"
            )
        if first is None:
            first, layout, clip_dim, clip_fp, gen_fp = root, lay, e, c_fp, g_fp
        else:
            if lay != layout:
                raise TrainError(
                    f"{root}: S layout (D {lay.dim}, Dconv {lay.conv_dim}) differs from {first}'s "
                    f"(D {layout.dim}, Dconv {layout.conv_dim}); train on stores of one generator"
                )
            if e != clip_dim or c_fp != clip_fp:
                raise TrainError(
                    f"{root}: CLIP {str(c_fp)[:12]} (E={e}) differs from {first}'s CLIP "
                    f"{str(clip_fp)[:12]} (E={clip_dim}); encode every store with one CLIP"
                )
            if g_fp is not None and gen_fp is not None and g_fp != gen_fp:
                raise TrainError(
                    f"{root}: generator {g_fp[:12]} differs from {first}'s {gen_fp[:12]}; "
                    "train on stores of one generator"
                )
            gen_fp = gen_fp or g_fp
        ok = np.intersect1d(s_store.ok_rows(), c_store.ok_rows())
        for st, name in ((s_store, "s"), (c_store, "embed")):
            n_bad = count_non_finite(st, [name], ok)
            if n_bad:
                raise TrainError(
                    f"{st.url}: {n_bad} ok rows hold NaN or Inf (a model gave non-finite "
                    f"output); rerun {_remake(st.attrs)} with --overwrite (this version marks "
                    "such rows 'failed: non-finite output')"
                )
        rng = np.random.default_rng([cfg.seed, k])
        n_hold = int(round(cfg.holdout_fraction * ok.size))
        if ok.size >= 2:
            n_hold = min(max(n_hold, 1 if cfg.holdout_fraction > 0 else 0), ok.size - 1)
        else:
            n_hold = 0
        hold_mask = np.zeros(ok.size, dtype=bool)
        hold_mask[rng.permutation(ok.size)[:n_hold]] = True
        held_out.append(ok[hold_mask])
        sources.append(SamplerSource(s_store, "s", c_store, "embed", ok[~hold_mask]))
    if sum(src.rows.size for src in sources) == 0:
        raise TrainError(
            f"no ok rows to train on in {', '.join(cfg.stores)}; run the encode stages "
            "(`deltaedit store info` shows each store's status)"
        )
    return Dataset(sources, held_out, layout, clip_dim, clip_fp, gen_fp)


def _read_rows(src: Any, rows: np.ndarray, conv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s conv [n, Dconv] and c [n, E] of sorted unique store rows."""
    if rows.size == 0:
        return np.zeros((0, conv.size), np.float32), np.zeros((0, 0), np.float32)
    s = src.s.read(src.s_name, rows)[:, conv].astype(np.float32)
    c = src.c.read(src.c_name, rows).astype(np.float32)
    return s, c


@dataclass
class ValidationSet:
    s: torch.Tensor  # [P, Dconv]
    cond: torch.Tensor  # [P, 2E]
    target: torch.Tensor  # [P, Dconv]
    baselines: dict[str, float]


def make_validation_set(
    data: Dataset, cfg: TrainConfig, device: str, mean_rows: int = 4096
) -> ValidationSet | None:
    """Fixed held-out pairs (i, j uniform over all held-out rows) + baseline scores."""
    conv = data.layout.mapper_layout(cfg.channels).conv_index()
    s_parts, c_parts = [], []
    for src, rows in zip(data.sources, data.held_out, strict=True):
        s, c = _read_rows(src, rows, conv)
        if rows.size:
            s_parts.append(s)
            c_parts.append(c)
    if not s_parts:
        return None
    s_all, c_all = np.concatenate(s_parts), np.concatenate(c_parts)
    rng = np.random.default_rng([cfg.seed, 1_000_003])
    i = rng.integers(len(s_all), size=cfg.val_pairs)
    j = rng.integers(len(s_all), size=cfg.val_pairs)
    s_i, s_j = torch.from_numpy(s_all[i]), torch.from_numpy(s_all[j])
    cond = make_cond(torch.from_numpy(c_all[i]), torch.from_numpy(c_all[j]))
    target = s_j - s_i
    # Mean of s over (a seeded sample of) the training rows: the mean-delta baseline.
    total = sum(src.rows.size for src in data.sources)
    take = np.random.default_rng([cfg.seed, 7]).permutation(total)[:mean_rows]
    offsets = np.cumsum([0] + [src.rows.size for src in data.sources])
    sums, count = np.zeros(conv.size, np.float64), 0
    for k, src in enumerate(data.sources):
        pick = take[(take >= offsets[k]) & (take < offsets[k + 1])] - offsets[k]
        if pick.size:
            s, _ = _read_rows(src, np.sort(src.rows[pick]), conv)
            sums += s.sum(0, dtype=np.float64)
            count += s.shape[0]
    s_mean = torch.from_numpy((sums / max(count, 1)).astype(np.float32))
    mean_pred = s_mean.unsqueeze(0) - s_i
    _, mse_mean, cos_mean = mapper_loss(mean_pred, target)
    baselines = {
        "zero_cos": 0.0,
        "zero_mse": float(target.pow(2).mean()),
        "mean_delta_cos": float(cos_mean),
        "mean_delta_mse": float(mse_mean),
    }
    return ValidationSet(s_i.to(device), cond.to(device), target.to(device), baselines)


@torch.no_grad()
def evaluate(mapper: DeltaMapper, val: ValidationSet, chunk: int = 256) -> dict[str, float]:
    was_training = mapper.training
    mapper.eval()
    cos_sum = se_sum = 0.0
    for a in range(0, len(val.s), chunk):
        pred = mapper(val.s[a : a + chunk], val.cond[a : a + chunk])
        t = val.target[a : a + chunk]
        cos_sum += float(F.cosine_similarity(pred, t, dim=-1).sum())
        se_sum += float((pred - t).pow(2).mean(dim=1).sum())
    mapper.train(was_training)
    n = len(val.s)
    return {"cos": cos_sum / n, "mse": se_sum / n}


# --- checkpoints --------------------------------------------------------------------


def state_path_for(out: str | Path) -> Path:
    """`data/mapper.safetensors` -> `data/mapper.train.safetensors` (+ .json beside it)."""
    out = Path(out)
    return out.with_name(out.stem + ".train.safetensors")


def state_url_for(out: str) -> str:
    """state_path_for for a path or URL (`s3://b/m.safetensors` -> `s3://b/m.train...`)."""
    from store.fs import join, name, parent

    stem = name(out).rsplit(".", 1)[0] if "." in name(out) else name(out)
    return join(parent(out), stem + ".train.safetensors")


def _sidecar(url: str) -> str:
    """The .json beside a .safetensors path or URL."""
    return url.rsplit(".", 1)[0] + ".json" if "." in url.rsplit("/", 1)[-1] else url + ".json"


class _Outputs:
    """Where training writes. Local paths are written in place; for a URL (`s3://...`) the
    files are written to a local staging folder and copied to the URL, each atomically
    (temp key + move), after every checkpoint and metrics summary."""

    def __init__(self, cfg: TrainConfig, storage_options: dict, staging: Path) -> None:
        from store.fs import check_reachable, is_remote

        self.so = storage_options
        self.out_url = cfg.out if is_remote(cfg.out) else None
        self.metrics_url = cfg.metrics_dir if is_remote(cfg.metrics_dir) else None
        for url in (self.out_url, self.metrics_url):
            if url:
                check_reachable(url, self.so)
        self.out = staging / "mapper" / Path(cfg.out).name if self.out_url else Path(cfg.out)
        self.state = state_path_for(self.out)
        self.metrics = staging / "metrics" if self.metrics_url else Path(cfg.metrics_dir)

    def where(self) -> str:
        return self.out_url or str(self.out)

    def state_where(self) -> str:
        return state_url_for(self.out_url) if self.out_url else str(self.state)

    def fetch_for_resume(self) -> None:
        """Bring the training state and the metrics of a remote run into staging."""
        from store.fs import exists, filesystem, get_file

        if self.out_url:
            state_url = state_url_for(self.out_url)
            self.state.parent.mkdir(parents=True, exist_ok=True)
            for url, local in ((state_url, self.state), (_sidecar(state_url), _side(self.state))):
                if exists(url, self.so):
                    get_file(url, str(local), self.so)
        if self.metrics_url and exists(self.metrics_url, self.so):
            fs, path = filesystem(self.metrics_url, self.so)
            fs.get(path.rstrip("/") + "/", str(self.metrics) + "/", recursive=True)

    def push_checkpoint(self) -> None:
        from store.fs import put_file_atomic

        if not self.out_url:
            return
        state_url = state_url_for(self.out_url)
        # the state first: a mapper never points to a newer state than the one stored
        for local, url in (
            (self.state, state_url),
            (_side(self.state), _sidecar(state_url)),
            (self.out, self.out_url),
            (_side(self.out), _sidecar(self.out_url)),
        ):
            put_file_atomic(str(local), url, self.so)

    def push_metrics(self) -> None:
        import os

        from store.fs import join, put_file_atomic

        if not self.metrics_url or not self.metrics.is_dir():
            return
        for folder, _, files in os.walk(self.metrics):
            for f in files:
                local = Path(folder) / f
                rel = local.relative_to(self.metrics).as_posix()
                put_file_atomic(str(local), join(self.metrics_url, rel), self.so)


def _side(path: Path) -> Path:
    return path.with_suffix(".json")


def save_train_state(
    path: Path,
    mapper: DeltaMapper,
    opt: torch.optim.Optimizer,
    step: int,
    sampler_state: dict,
    meta: dict[str, Any],
) -> None:
    """Parameters as trained (folded), Adam state, RNGs, step, sampler state: exact resume."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in mapper.named_parameters():
        tensors[f"param/{name}"] = p.detach()
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"optim/{idx}/{key}"] = torch.as_tensor(value).detach()
    tensors["rng/torch"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    np_state = np.random.get_state()
    config = {
        "format": STATE_FORMAT,
        "version": 1,
        "step": step,
        "sampler": _plain(sampler_state),
        "optimizer_groups": _plain(groups),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        **meta,
    }
    save_checkpoint(path, tensors, config)


def load_train_state(
    path: Path, mapper: DeltaMapper, opt: torch.optim.Optimizer
) -> tuple[int, dict, dict]:
    """Restore into mapper/opt (built the same way); returns (step, sampler state, config)."""
    tensors, config = load_checkpoint(path)
    if config.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state (format {config.get('format')!r})")
    with torch.no_grad():
        for name, p in mapper.named_parameters():
            key = f"param/{name}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise CheckpointError(
                    f"{path}: parameter {name} missing or of another shape; "
                    "the state belongs to a mapper of another S layout"
                )
            p.copy_(tensors[key])
    template = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = []
    for saved, live in zip(config["optimizer_groups"], template["param_groups"], strict=True):
        g = dict(saved)
        g["params"] = live["params"]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    s = config["numpy_rng"]
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), *s[2:]))
    return int(config["step"]), config["sampler"], config


def _plain(x: Any) -> Any:
    """JSON-ready copy (numpy scalars/arrays, tuples)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _trim_dvclive(metrics_dir: Path, step: int) -> None:
    """Drop metric rows logged after `step` (an interrupted run) before resuming."""
    for tsv in (metrics_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        col = lines[0].split("\t").index("step") if "step" in lines[0].split("\t") else None
        if col is None:
            continue
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        tsv.write_text("\n".join(kept) + "\n")


def make_optimizer(mapper: DeltaMapper, lr: float, device: str) -> torch.optim.Adam:
    """Adam with the official update (per-parameter lr/eps for the folded gains), fused."""
    groups = mapper.param_groups(lr)
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, ValueError):  # fused unsupported on this device/build
        return torch.optim.Adam(groups, foreach=True)


# --- the stage ----------------------------------------------------------------------


def batch_bytes(batch_size: int, conv_dim: int, clip_dim: int) -> int:
    """One prepared batch: s and target [B, Dconv], cond [B, 2E], plus the raw draw."""
    return 4 * batch_size * (4 * conv_dim + 4 * clip_dim)


def sampler_budget(cfg: TrainConfig, conv_dim: int, clip_dim: int) -> int:
    """memory_budget minus the batches queued ahead: the data path stays within the budget."""
    queued = (cfg.prefetch + 2) * batch_bytes(cfg.batch_size, conv_dim, clip_dim)
    return max(int(cfg.memory_budget_mb * 2**20) - queued, 0)


SMALL_MAPPER = 2_000_000  # parameters; below this, one CPU thread per op is fastest


def cpu_threads_for(cfg: TrainConfig, mapper: DeltaMapper, device: str) -> int | None:
    """Intra-op threads to use on CPU (None = leave torch's setting).

    A small mapper's ops take microseconds: splitting them over threads costs more
    than it gains, and on a shared machine an OpenMP barrier waiting for a descheduled
    thread makes every step 10-50x slower (measured on 2 shared cores).
    """
    if not device.startswith("cpu"):
        return None
    if cfg.cpu_threads:
        return cfg.cpu_threads
    n_params = sum(p.numel() for p in mapper.parameters())
    return 1 if n_params < SMALL_MAPPER else None


def run(
    cfg: TrainConfig,
    execution: ExecutionConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or resume training) the mapper on the stores in `cfg`.

    on_step(step, loss) is called after every step (tests use it to interrupt a run).
    Holds the write lease of `cfg.out` (store.lease): a second train on the same mapper
    refuses instead of overwriting its checkpoints.
    """
    import tempfile

    from stages.execution import hold_outputs

    threads_before = torch.get_num_threads()
    execution = execution or ExecutionConfig()
    try:
        with (
            hold_outputs([cfg.out], "train", execution, log),
            tempfile.TemporaryDirectory(prefix="deltaedit-train-") as staging,
        ):
            return _run(
                cfg,
                execution,
                Path(staging),
                resume=resume,
                progress=progress,
                log=log,
                on_step=on_step,
            )
    finally:
        torch.set_num_threads(threads_before)


def _run(
    cfg: TrainConfig,
    execution: ExecutionConfig | None,
    staging: Path,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    on_step: Callable[[int, float], None] | None,
) -> TrainResult:
    from dvclive import Live
    from tqdm import tqdm

    from store import PairSampler, StoreError
    from store.fs import exists as url_exists

    cfg.validate()
    execution = execution or ExecutionConfig()
    release_freed_memory()  # peak RSS within memory_budget + model + optimizer
    device = resolve_device(execution.device)
    so = execution.storage()
    outs = _Outputs(cfg, so, staging)
    out, state_path = outs.out, outs.state
    data = open_dataset(cfg, so)
    conv = data.layout.mapper_layout(cfg.channels).conv_index()
    rows = trained_rows(data)
    if not resume and not cfg.retrain and url_exists(outs.where(), so):
        outs.fetch_for_resume()  # a finished run is judged from its state (local: in place)
        kept = _kept_mapper(data, cfg, rows, state_path, outs.where(), log)
        if kept is not None:
            return kept

    torch.manual_seed(cfg.seed)
    mapper = DeltaMapper(data.layout, data.clip_dim, cfg.channels).to(device)
    threads = cpu_threads_for(cfg, mapper, device)
    if threads is not None:
        torch.set_num_threads(threads)
    opt = make_optimizer(mapper, cfg.lr, device)
    try:
        sampler = PairSampler(
            data.sources,
            cfg.batch_size,
            cfg.seed,
            sampler_budget(cfg, conv.size, data.clip_dim),
            s_columns=conv,
            near_fraction=cfg.near_pairs,
            near_k=cfg.near_k,
        )
    except StoreError as exc:
        raise TrainError(str(exc)) from None

    meta = {
        "train": cfg.trajectory(),
        "layout": data.layout.to_dict(),
        "clip_dim": data.clip_dim,
        "clip_fingerprint": data.clip_fingerprint,
        "generator_fingerprint": data.generator_fingerprint,
        "rows": rows,
    }
    if execution.precision != "fp32":
        meta["precision"] = execution.precision  # the compute dtype of the steps
    start, history = 0, []
    if resume:
        outs.fetch_for_resume()
        if not state_path.exists():
            raise TrainError(
                f"--resume: no training state at {outs.state_where()}; start without --resume"
            )
        saved_cfg = json.loads(state_path.with_suffix(".json").read_text())
        for key in ("layout", "clip_dim", "clip_fingerprint", "train"):
            if saved_cfg.get(key) != meta[key]:
                what = key if key != "train" else _first_diff(saved_cfg.get(key), meta[key])
                raise TrainError(
                    f"--resume: {state_path} was trained with another {what}; "
                    "resume with the same stores and train params, or start over"
                )
        try:
            start, sampler_state, saved_cfg = load_train_state(state_path, mapper, opt)
            sampler.load_state_dict(sampler_state)
        except (CheckpointError, StoreError) as exc:
            raise TrainError(f"--resume: {exc}") from None
        history = list(saved_cfg.get("history", []))
        log(f"train: resuming {outs.state_where()} at step {start}")

    val = make_validation_set(data, cfg, device)
    if val is None:
        log("train: no held-out rows (holdout_fraction 0 or tiny stores): no validation")

    metrics_dir = outs.metrics
    if resume:
        _trim_dvclive(metrics_dir, start)
    live = Live(dir=str(metrics_dir), resume=resume, save_dvc_exp=False, dvcyaml=False)
    if not resume:
        live.log_params({"train": cfg.trajectory() | {"iterations": cfg.iterations}})

    def make(step: int) -> Batch:
        raw = sampler.next_batch()
        perm = None
        if cfg.shuffle_targets:
            perm = np.random.default_rng([cfg.seed, step]).permutation(cfg.batch_size)
        batch = prepare_batch(raw, device, perm)
        batch.sampler_state = sampler.state_dict()
        return batch

    def checkpoint(step: int, sampler_state: dict) -> None:
        save_train_state(state_path, mapper, opt, step, sampler_state, meta | {"history": history})
        extra = {k: v for k, v in meta.items() if k != "rows"}  # the keys stay in the state
        extra |= {"step": step, "metrics": history[-1] if history else {}}
        save_mapper(mapper, out, extra=extra)
        outs.push_checkpoint()

    def validate(step: int) -> dict[str, float]:
        scores = evaluate(mapper, val)
        row = {"step": step, "cos": scores["cos"], "mse": scores["mse"], **val.baselines}
        history.append(row)
        live.step = step
        live.log_metric("val/cos", scores["cos"])
        live.log_metric("val/mse", scores["mse"])
        for name, value in val.baselines.items():
            live.log_metric(f"val/baseline_{name}", value, plot=False)
        live.make_summary()
        outs.push_metrics()
        return row

    losses: list[float] = []
    window: list[tuple[float, float, float]] = []
    wait = 0.0
    sampler_state = sampler.state_dict()
    mapper.train()
    bar = tqdm(
        total=cfg.iterations,
        initial=min(start, cfg.iterations),
        desc="train",
        unit="step",
        disable=not progress,
    )
    # In memory a batch is a few fancy-indexing ops (well under 1 ms): drawing it in
    # the loop is cheaper than handing it over from a thread that competes for the GIL.
    depth = cfg.prefetch if sampler.mode == "sharded" else 0
    prefetch = Prefetcher(make, start, cfg.iterations, depth)
    t0 = time.perf_counter()
    step = start
    try:
        for step in range(start + 1, cfg.iterations + 1):
            tw = time.perf_counter()
            batch = prefetch.get()
            wait += time.perf_counter() - tw
            with autocast(device, execution.precision):  # bf16: the forward's matmuls
                pred = mapper(batch.s, batch.cond)
            loss, mse, cos = mapper_loss(pred.float(), batch.target, cfg.l2_lambda, cfg.cos_lambda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainError(f"loss became {value} at step {step}; lower train.lr")
            losses.append(value)
            window.append((value, float(mse.detach()), float(cos.detach())))
            sampler_state = batch.sampler_state
            if step % cfg.log_every == 0 or step == cfg.iterations:
                live.step = step
                for k, name in enumerate(("loss", "mse", "cos")):
                    live.log_metric(f"train/{name}", float(np.mean([w[k] for w in window])))
                window.clear()
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if val is not None and (step % cfg.val_every == 0 or step == cfg.iterations):
                row = validate(step)
                bar.set_postfix(loss=f"{value:.4f}", val_cos=f"{row['cos']:.3f}", refresh=False)
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                checkpoint(step, sampler_state)
            bar.update(1)
            if on_step is not None:
                on_step(step, value)
    finally:
        prefetch.close()
        sampler.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    if start >= cfg.iterations:  # nothing left to do: the final mapper is already written
        from store.fs import exists

        if not exists(outs.where(), so):
            checkpoint(start, sampler_state)
    live.make_summary()
    live.end()
    outs.push_metrics()
    ran = max(step - start, 0)
    rate = ran / elapsed if elapsed > 0 and ran else 0.0
    last = history[-1] if history else {}
    wait_frac = wait / elapsed if elapsed > 0 else 0.0
    summary = (
        f"train: {step} steps ({ran} now, {rate:.1f} steps/s, {sampler.mode} sampler, "
        f"data wait {wait_frac:.1%})"
    )
    if last:
        summary += (
            f"; held-out cos {last['cos']:.3f} mse {last['mse']:.4g} "
            f"(zero mapper cos 0 mse {last['zero_mse']:.4g}; mean delta cos "
            f"{last['mean_delta_cos']:.3f} mse {last['mean_delta_mse']:.4g})"
        )
    log(summary + f" -> {outs.where()}")
    return TrainResult(
        mapper_path=outs.where(),
        state_path=outs.state_where(),
        step=step,
        losses=losses,
        val=last,
        history=history,
        steps_per_s=rate,
        data_wait_fraction=wait_frac,
        sampler_mode=sampler.mode,
    )


def trained_rows(data: Dataset) -> list[list[str]]:
    """Per store, the sorted keys of its ok rows (training + held-out): the sha256 of each
    row's source bytes, or `row:<i>` for stores without keys (sampled rows)."""
    from store import update as up

    out = []
    for src, held in zip(data.sources, data.held_out, strict=True):
        rows = np.concatenate([src.rows, held])
        if up.KEY in src.s.specs:
            keys = up.as_str(src.s.read(up.KEY, rows))
        else:
            keys = np.array([f"row:{r}" for r in rows.tolist()], dtype=str)
        out.append(sorted(keys.tolist()))
    return out


def _kept_mapper(
    data: Dataset,
    cfg: TrainConfig,
    rows: list[list[str]],
    state_path: Path,
    out: str,
    log: Callable[[str], None],
) -> TrainResult | None:
    """The finished mapper at `out` (its state in `state_path`, local or fetched) when it
    was trained with these params and stores: kept (None = train). Says how many rows
    changed since, if any (a stale mapper)."""
    meta_path = state_path.with_suffix(".json")
    if not (state_path.exists() and meta_path.exists()):
        return None
    try:
        saved = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    same = (
        saved.get("train") == cfg.trajectory()
        and saved.get("layout") == data.layout.to_dict()
        and saved.get("clip_fingerprint") == data.clip_fingerprint
        and saved.get("step") == cfg.iterations
        and isinstance(saved.get("rows"), list)
        and len(saved["rows"]) == len(rows)
    )
    if not same:
        return None
    added = removed = 0
    for old, new in zip(saved["rows"], rows, strict=True):
        old_set, new_set = set(old), set(new)
        added += len(new_set - old_set)
        removed += len(old_set - new_set)
    n_old = sum(len(r) for r in saved["rows"])
    if added or removed:
        log(
            f"train: {out} is stale: {added} rows added, {removed} removed since it was trained "
            f"on {n_old} rows; kept (train again with --retrain or train.retrain: true)"
        )
    else:
        log(f"train: {out} is up to date (trained on these {n_old} rows); nothing to do")
    history = list(saved.get("history", []))
    last = history[-1] if history else {}
    return TrainResult(str(out), str(state_path), int(saved["step"]), [], last, history)


def _first_diff(saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key):
                return f"train.{key} ({saved.get(key)!r}, params say {now.get(key)!r})"
    return "train config"
