"""The shapes world's encoder, trained the e4e way into a fixed (GAN-trained) generator.

    synthetic rows: z -> w (W, every layer the same) -> G -> x_syn;  E(x_syn) -> W+^
        latent loss |W+^ - W+|^2 / var(w)  +  image loss (MSE + l1 * L1) of G(W+^) vs x_syn
    real rows: world renders x -> E -> W+^ -> G -> image loss vs x
    both: e4e's delta regularisation, the spread of W+^ rows around the first row

The generator is frozen (its weights never change); gradients of the image losses flow
through it into the encoder. Synthetic rows teach the encoder where the generator keeps
each attribute in W (the latent loss); real rows teach it the world's own images. The
encoder's latent_avg is the generator's mean w. Chunked and resumable like world_gan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from model.e4e import E4E, create_e4e, load_e4e, save_e4e
from model.stylegan2 import Generator, load_generator
from stages.config import require
from stages.world.gan import config_diff, flatten_optimizer, load_optimizer, render_reals
from stages.world.render import WorldConfig, from_unit

RESUMABLE_KEYS = ("iterations", "chunk_minutes", "log_every", "threads", "out_dir")


@dataclass(frozen=True)
class EncoderTrainConfig:
    """`world_e4e:` in params."""

    generator: str = "weights/world/gan/generator.safetensors"
    out_dir: str = "weights/world/e4e-run"
    e4e_config: str = "world-32"
    init: str = ""  # a new run starts from this e4e's weights (e.g. one trained on an
    # earlier snapshot of the generator); latent_avg stays this generator's mean w
    seed: int = 0
    n_train: int = 20000
    batch: int = 32  # half synthetic, half real
    lr: float = 1e-3
    latent_weight: float = 1.0
    l1: float = 0.1
    delta_reg: float = 2e-4
    iterations: int = 20000
    chunk_minutes: float = 30.0
    log_every: int = 200
    threads: int = 1

    def validate(self) -> None:
        for key in ("n_train", "batch", "threads", "log_every"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        require(self.batch % 2 == 0, "batch", self.batch, "an even integer (half synthetic)")
        require(self.lr > 0, "lr", self.lr, "a number > 0")
        for key in ("latent_weight", "l1", "delta_reg"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")


@dataclass
class EncoderState:
    E: E4E
    opt: torch.optim.Adam
    rng: torch.Generator
    step: int = 0


def _run_config(cfg: EncoderTrainConfig, G: Generator) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS}
    d["generator_fingerprint"] = G.fingerprint
    return json.loads(json.dumps(d))


def new_state(cfg: EncoderTrainConfig, G: Generator) -> EncoderState:
    E = create_e4e(cfg.e4e_config, seed=cfg.seed, latent_avg=G.mean_latent().detach())
    if cfg.init:
        start = load_e4e(cfg.init)
        if start.config != E.config:
            raise CheckpointError(
                f"{cfg.init}: world_e4e.init is an e4e of another shape than {cfg.e4e_config!r}"
            )
        weights = {k: v for k, v in start.state_dict().items() if k != "latent_avg"}
        E.load_state_dict(weights | {"latent_avg": E.latent_avg})
    E.train()
    opt = torch.optim.Adam(E.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    return EncoderState(E, opt, torch.Generator().manual_seed(cfg.seed + 5))


def save_state(st: EncoderState, cfg: EncoderTrainConfig, G: Generator, folder: Path) -> None:
    tensors = {f"E.{k}": v for k, v in st.E.state_dict().items()}
    tensors |= flatten_optimizer("opt", st.opt)
    tensors["rng"] = st.rng.get_state()
    meta = {"step": st.step, "config": _run_config(cfg, G)}
    save_checkpoint(folder / "state.safetensors", tensors, meta)


def load_state(cfg: EncoderTrainConfig, G: Generator, folder: Path) -> EncoderState | None:
    path = folder / "state.safetensors"
    if not path.exists():
        return None
    tensors, meta = load_checkpoint(path)
    diff = config_diff(_run_config(cfg, G), meta.get("config", {}), "world_e4e")
    if diff:
        raise CheckpointError(
            f"{path}: this chunk's config differs from the checkpoint's in {', '.join(diff)}; "
            f"use another world_e4e.out_dir"
        )
    st = new_state(cfg, G)
    st.E.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("E.")})
    load_optimizer("opt", st.opt, tensors)
    st.rng.set_state(tensors["rng"])
    st.step = int(meta["step"])
    return st


def image_loss(recon: torch.Tensor, x: torch.Tensor, l1: float) -> torch.Tensor:
    return F.mse_loss(recon, x) + l1 * F.l1_loss(recon, x)


def train_step(
    st: EncoderState, G: Generator, data: torch.Tensor, cfg: EncoderTrainConfig, w_var: float
) -> dict[str, float]:
    half = cfg.batch // 2
    with torch.no_grad():
        z = torch.randn(half, G.config.in_dim, generator=st.rng)
        w_true = G.wplus(G.mapping(z))  # [half, L, W]
        x_syn = G.synthesize_w(w_true, "const")
        idx = torch.randint(0, data.shape[0], (half,), generator=st.rng)
        x_real = data[idx].float() / 127.5 - 1.0
    x = torch.cat([x_syn, x_real])
    w_hat = st.E(x)  # [B, L, W]
    recon = G.synthesize_w(w_hat, "const")
    lat = F.mse_loss(w_hat[:half], w_true) / w_var
    img = image_loss(recon, x, cfg.l1)
    delta = (w_hat[:, 1:] - w_hat[:, :1]).square().sum(-1).mean()
    loss = cfg.latent_weight * lat + img + cfg.delta_reg * delta
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    st.opt.step()
    st.step += 1
    return {
        "latent": float(lat.detach()),
        "image": float(img.detach()),
        "delta": float(delta.detach()),
    }


def cosine_lr(cfg: EncoderTrainConfig, step: int) -> float:
    """Cosine decay to 10% over the run's iterations."""
    frac = min(step / max(cfg.iterations, 1), 1.0)
    return cfg.lr * (0.55 + 0.45 * math.cos(math.pi * frac))


def train_chunk(
    cfg: EncoderTrainConfig, world: WorldConfig, log: Callable[[str], None] = print
) -> dict:
    """Resume (or start) the encoder run in `cfg.out_dir` and train one time-boxed chunk;
    saves `e4e.safetensors` (eval mode) beside the state."""
    cfg.validate()
    world.validate()
    torch.set_num_threads(cfg.threads)
    G = load_generator(cfg.generator).eval().requires_grad_(False)
    folder = Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    st = load_state(cfg, G, folder)
    log(f"world e4e: {'resumed at' if st else 'started'} step {st.step if st else 0} in {folder}")
    st = st or new_state(cfg, G)
    st.E.train()
    data = render_reals(world, cfg.n_train)
    with torch.no_grad():
        z = torch.randn(4096, G.config.in_dim, generator=torch.Generator().manual_seed(1))
        w_var = float(G.mapping(z).var(0).mean())
    t0, start = time.perf_counter(), st.step
    sums: dict[str, list[float]] = {}
    while st.step < cfg.iterations:
        if cfg.chunk_minutes and time.perf_counter() - t0 > cfg.chunk_minutes * 60:
            break
        for g in st.opt.param_groups:
            g["lr"] = cosine_lr(cfg, st.step)
        for k, v in train_step(st, G, data, cfg, w_var).items():
            sums.setdefault(k, []).append(v)
        if st.step % cfg.log_every == 0:
            rate = (st.step - start) / (time.perf_counter() - t0)
            row = {"step": st.step, "it_s": round(rate, 2)}
            row |= {k: round(float(np.mean(v)), 5) for k, v in sums.items()}
            sums = {}
            with (folder / "log.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"world e4e: {json.dumps(row)}")
    save_state(st, cfg, G, folder)
    st.E.eval()
    save_e4e(st.E, folder / "e4e.safetensors")
    summary = {
        "step": st.step,
        "chunk_steps": st.step - start,
        "seconds": round(time.perf_counter() - t0, 1),
        "done": st.step >= cfg.iterations,
    }
    atomic_write_bytes(folder / "progress.json", json.dumps(summary, indent=1).encode())
    log(f"world e4e: {summary}")
    return summary


@torch.no_grad()
def reconstruct(G: Generator, E: E4E, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """float [N, 3, R, R] in [-1, 1] -> uint8 [N, R, R, 3] reconstructions G(E(x))."""
    out = [
        G.synthesize_w(E(images[i : i + batch]), "const").clamp(-1, 1).numpy()
        for i in range(0, len(images), batch)
    ]
    return from_unit(np.concatenate(out))
