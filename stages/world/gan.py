"""The shapes world's generator, trained the StyleGAN2 way (not as an autoencoder).

    z ~ N(0, I) --mapping (trained)--> w --W+ with style mixing--> G --> fake [B, 3, 32, 32]
    real world renders (x-flipped at random) and fakes --D--> logits

* loss: non-saturating logistic (G: softplus(-D(G(z))), D: softplus(D(fake)) +
  softplus(-D(real))), lazy R1 on reals every `r1_every` steps (gamma / 2 * |grad|^2,
  scaled by r1_every), Adam with the lazy-regularisation correction of lr and betas;
* style mixing: with probability `mixing` a sample's W+ switches from w1 to w2 at a
  random layer, so neighbouring layers do not learn to depend on each other;
* EMA of the generator's weights (half-life `ema_kimg` thousand images): what is saved;
* noise inputs random during training (the pipeline renders with the constant buffers).

Training runs in time-boxed chunks: each call trains until `chunk_minutes` (or
`iterations` in all) and writes `state.safetensors` + `state.json` (G, G_ema, D, both
Adam states, the step, the RNG state), from which the next call resumes bitwise. A
resumed chunk whose config differs from its checkpoint's (in the keys that shape the
run) is refused, naming the keys. Sample grids and a loss log go beside the state.
"""

from __future__ import annotations

import copy
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
from PIL import Image

from model.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from model.discriminator import DiscriminatorConfig, create_discriminator
from model.stylegan2 import Generator, create_generator, save_generator
from stages.common import check_device, resolve_device
from stages.config import require
from stages.world.render import WorldConfig, from_unit, render_many, scenes

# keys that may change between chunks of one run (time boxes, logging, where it runs)
RESUMABLE_KEYS = ("iterations", "chunk_minutes", "log_every", "threads", "device", "out_dir")


@dataclass(frozen=True)
class GanConfig:
    """`world_gan:` in params. Defaults = the committed generator's run."""

    out_dir: str = "weights/world/gan"  # run folder: state, sample grids, log
    seed: int = 0
    n_train: int = 20000  # real renders (world seed), drawn once
    generator_config: str = "world-gan-32"
    d_channels: int = 64  # discriminator width (32 at full resolution)
    batch: int = 32
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 1.0
    r1_every: int = 16
    mixing: float = 0.9
    ema_kimg: float = 10.0
    xflip: bool = True
    iterations: int = 60000  # the run's total; a chunk stops earlier at chunk_minutes
    chunk_minutes: float = 30.0  # 0 = no time box
    log_every: int = 200
    threads: int = 1
    device: str = "cpu"

    def validate(self) -> None:
        for key in ("n_train", "batch", "r1_every", "threads", "log_every", "d_channels"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        require(self.iterations >= 0, "iterations", self.iterations, "an integer >= 0")
        for key in ("lr", "ema_kimg"):
            require(getattr(self, key) > 0, key, getattr(self, key), "a number > 0")
        require(self.r1_gamma >= 0, "r1_gamma", self.r1_gamma, "a number >= 0")
        require(0 <= self.mixing <= 1, "mixing", self.mixing, "a probability in [0, 1]")
        require(self.chunk_minutes >= 0, "chunk_minutes", self.chunk_minutes, ">= 0 (0 = none)")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        check_device(self.device)


@dataclass
class GanState:
    G: Generator
    G_ema: Generator
    D: torch.nn.Module
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    rng: torch.Generator
    step: int = 0


# --- setup and checkpoints ------------------------------------------------------------


def discriminator_config(cfg: GanConfig, resolution: int) -> DiscriminatorConfig:
    c = cfg.d_channels
    chans = {2**i: c for i in range(2, int(math.log2(resolution)) + 1)}
    chans[resolution] = max(c // 2, 1)
    return DiscriminatorConfig(resolution, chans)


def _adam(params, cfg: GanConfig, reg_every: int | None) -> torch.optim.Adam:
    ratio = reg_every / (reg_every + 1) if reg_every else 1.0  # lazy-regularisation correction
    b1, b2 = cfg.betas
    return torch.optim.Adam(params, lr=cfg.lr * ratio, betas=(b1**ratio, b2**ratio))


def new_state(cfg: GanConfig) -> GanState:
    G = create_generator(cfg.generator_config, seed=cfg.seed)
    D = create_discriminator(discriminator_config(cfg, G.resolution), seed=cfg.seed + 1)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    rng = torch.Generator().manual_seed(cfg.seed + 2)
    return GanState(
        G, G_ema, D, _adam(G.parameters(), cfg, None), _adam(D.parameters(), cfg, cfg.r1_every), rng
    )


def flatten_optimizer(prefix: str, opt: torch.optim.Adam) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{idx}.{k}"] = torch.as_tensor(v).clone()
    return out


def load_optimizer(prefix: str, opt: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))  # tuples -> lists, as the JSON beside the state has them


def config_diff(want: dict[str, Any], have: dict[str, Any], prefix: str) -> list[str]:
    """`prefix.key` for every key whose value differs between two plain config dicts."""
    return [f"{prefix}.{k}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]


def run_config(cfg: GanConfig) -> dict[str, Any]:
    """The config keys that shape the run (a resumed chunk must match them)."""
    return _plain({k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_KEYS})


def save_state(st: GanState, cfg: GanConfig, world: WorldConfig, folder: Path) -> None:
    tensors = {f"G.{k}": v for k, v in st.G.state_dict().items()}
    tensors |= {f"G_ema.{k}": v for k, v in st.G_ema.state_dict().items()}
    tensors |= {f"D.{k}": v for k, v in st.D.state_dict().items()}
    tensors |= flatten_optimizer("opt_g", st.opt_g) | flatten_optimizer("opt_d", st.opt_d)
    tensors["rng"] = st.rng.get_state()
    tensors["torch_rng"] = torch.get_rng_state()  # the generator's random noise inputs
    meta = {"step": st.step, "config": run_config(cfg), "world": _plain(dataclasses.asdict(world))}
    save_checkpoint(folder / "state.safetensors", tensors, meta)


def load_state(cfg: GanConfig, world: WorldConfig, folder: Path) -> GanState | None:
    """The run's state from `folder`, or None when there is none yet."""
    path = folder / "state.safetensors"
    if not path.exists():
        return None
    tensors, meta = load_checkpoint(path)
    # the dataset's size and folder do not shape the run (it draws n_train renders itself)
    ignored = ("out_dir", "n_images")
    world_now = {k: v for k, v in _plain(dataclasses.asdict(world)).items() if k not in ignored}
    world_then = {k: v for k, v in meta.get("world", {}).items() if k not in ignored}
    diff = config_diff(run_config(cfg), meta.get("config", {}), "world_gan")
    diff += config_diff(world_now, world_then, "world")
    if diff:
        raise CheckpointError(
            f"{path}: this chunk's config differs from the checkpoint's in {', '.join(diff)}; "
            f"use another world_gan.out_dir or the checkpoint's values"
        )
    st = new_state(cfg)
    for name, mod in (("G", st.G), ("G_ema", st.G_ema), ("D", st.D)):
        mod.load_state_dict(
            {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        )
    load_optimizer("opt_g", st.opt_g, tensors)
    load_optimizer("opt_d", st.opt_d, tensors)
    st.rng.set_state(tensors["rng"])
    torch.set_rng_state(tensors["torch_rng"])
    st.step = int(meta["step"])
    return st


# --- one training step ----------------------------------------------------------------


def mixed_wplus(
    G: Generator, z1: torch.Tensor, z2: torch.Tensor, mix: torch.Tensor, cut: torch.Tensor
) -> torch.Tensor:
    """W+ [B, L, W]: w1 = mapping(z1) on layers < cut, w2 = mapping(z2) from cut on, for
    the rows where `mix` is set (the others use w1 everywhere)."""
    w1, w2 = G.mapping(z1), G.mapping(z2)
    layer = torch.arange(G.n_latent)[None, :]
    use2 = (mix[:, None] & (layer >= cut[:, None]))[:, :, None]  # [B, L, 1]
    return torch.where(use2, w2[:, None, :], w1[:, None, :])


def _latents(G: Generator, cfg: GanConfig, rng: torch.Generator, batch: int) -> torch.Tensor:
    z = torch.randn(2, batch, G.config.in_dim, generator=rng)
    mix = torch.rand(batch, generator=rng) < cfg.mixing
    cut = torch.randint(1, G.n_latent, (batch,), generator=rng)
    return mixed_wplus(G, z[0], z[1], mix, cut)


def _reals(data: torch.Tensor, cfg: GanConfig, rng: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=rng)
    x = data[idx].float() / 127.5 - 1.0
    if cfg.xflip:
        flip = torch.rand(cfg.batch, generator=rng) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train_step(st: GanState, data: torch.Tensor, cfg: GanConfig, ema_beta: float) -> dict:
    """One D step (with R1 when due), one G step, one EMA update. data: uint8 [N, 3, R, R]."""
    G, D = st.G, st.D
    logs: dict[str, float] = {}
    # discriminator
    D.requires_grad_(True)
    real = _reals(data, cfg, st.rng)
    with torch.no_grad():
        fake = G.synthesize_w(_latents(G, cfg, st.rng, cfg.batch), "random")
    d_loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
    st.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    st.opt_d.step()
    logs["d_loss"] = float(d_loss.detach())
    if cfg.r1_gamma > 0 and st.step % cfg.r1_every == 0:
        real = _reals(data, cfg, st.rng).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
        r1 = grad.square().sum(dim=(1, 2, 3)).mean()
        st.opt_d.zero_grad(set_to_none=True)
        (r1 * (cfg.r1_gamma / 2) * cfg.r1_every).backward()
        st.opt_d.step()
        logs["r1"] = float(r1.detach())
    # generator
    D.requires_grad_(False)
    fake = G.synthesize_w(_latents(G, cfg, st.rng, cfg.batch), "random")
    g_loss = F.softplus(-D(fake)).mean()
    st.opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    st.opt_g.step()
    logs["g_loss"] = float(g_loss.detach())
    with torch.no_grad():
        for p_ema, p in zip(st.G_ema.parameters(), st.G.parameters(), strict=True):
            p_ema.lerp_(p, 1 - ema_beta)
    st.step += 1
    return logs


# --- the chunk ------------------------------------------------------------------------


def render_reals(world: WorldConfig, n: int) -> torch.Tensor:
    """uint8 [N, 3, R, R] world renders of the world seed."""
    w = dataclasses.replace(world, n_images=n)
    img = render_many(scenes(w), w)  # [N, R, R, 3] uint8
    return torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2)))


@torch.no_grad()
def sample_grid(G: Generator, path: Path, n: int = 64, seed: int = 123) -> np.ndarray:
    """An 8 x 8 grid of samples from fixed z (uint8 [n, R, R, 3] returned)."""
    z = torch.randn(n, G.config.in_dim, generator=torch.Generator().manual_seed(seed))
    img = from_unit(G.synthesize_w(G.wplus(G.mapping(z)), "const").clamp(-1, 1).numpy())
    side = int(math.ceil(math.sqrt(n)))
    R = img.shape[1]
    grid = np.zeros((side * R, side * R, 3), np.uint8)
    for i, im in enumerate(img):
        grid[(i // side) * R : (i // side + 1) * R, (i % side) * R : (i % side + 1) * R] = im
    Image.fromarray(grid).resize((side * R * 3, side * R * 3), Image.NEAREST).save(path)
    return img


def train_chunk(cfg: GanConfig, world: WorldConfig, log: Callable[[str], None] = print) -> dict:
    """Resume (or start) the run in `cfg.out_dir` and train one time-boxed chunk."""
    cfg.validate()
    world.validate()
    torch.set_num_threads(cfg.threads)
    if resolve_device(cfg.device) != "cpu":
        raise ValueError("world_gan runs on cpu in this version (device: cpu)")
    folder = Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    st = load_state(cfg, world, folder)
    resumed = st is not None
    if st is None:
        torch.manual_seed(cfg.seed + 3)  # the noise inputs draw from torch's global RNG
        st = new_state(cfg)
    log(f"world gan: {'resumed at' if resumed else 'started'} step {st.step} in {folder}")
    data = render_reals(world, cfg.n_train)
    ema_beta = 0.5 ** (cfg.batch / (cfg.ema_kimg * 1000))
    t0 = time.perf_counter()
    start_step = st.step
    sums: dict[str, list[float]] = {}
    log_path = folder / "log.jsonl"
    while st.step < cfg.iterations:
        if cfg.chunk_minutes and time.perf_counter() - t0 > cfg.chunk_minutes * 60:
            break
        for k, v in train_step(st, data, cfg, ema_beta).items():
            sums.setdefault(k, []).append(v)
        if st.step % cfg.log_every == 0:
            rate = (st.step - start_step) / (time.perf_counter() - t0)
            row = {"step": st.step, "it_s": round(rate, 2)}
            row |= {k: round(float(np.mean(v)), 4) for k, v in sums.items()}
            sums = {}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"world gan: {json.dumps(row)}")
    save_state(st, cfg, world, folder)
    save_generator(st.G_ema, folder / "generator.safetensors")
    sample_grid(st.G_ema, folder / f"samples_{st.step:06d}.png")
    secs = time.perf_counter() - t0
    summary = {
        "step": st.step,
        "chunk_steps": st.step - start_step,
        "seconds": round(secs, 1),
        "done": st.step >= cfg.iterations,
    }
    atomic_write_bytes(folder / "progress.json", json.dumps(summary, indent=1).encode())
    log(f"world gan: {summary}")
    return summary
