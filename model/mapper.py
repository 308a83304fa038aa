"""The Delta Mapper (DeltaEdit, CVPR 2023): (s, [c, delta_c]) -> delta_s.

The network predicts an S-space edit delta_s from the source style code s (conv
channels only) and a condition cond = [normalize(c) || normalize(delta_c)], where c
is the CLIP image embedding of the source and delta_c a CLIP direction (image
difference while training, text difference at inference).

Structure (official `delta_mapper.py`, state-dict keys kept so `net_face.pth` loads
unchanged). The conv channels of s split into three levels (see model/layout.py):
coarse = 4-8 px, medium = 16-32 px, fine = 64 px and up. Per level:

    style module      sm_<level> = Mapper(C, C)    PixelNorm + 4 EqualLinear, on s
    condition module  cm_<level> = Mapper(2E, C)   PixelNorm + 4 EqualLinear, on cond
    fusion module     fm_<level> = Mapper(2C, C)   4 EqualLinear, on [sm(s) || cm(cond)]

Every EqualLinear has lr_mul 0.01 and is followed by the fused leaky ReLU
(slope 0.2, gain sqrt(2)), the last layer of every Mapper included.

Two forms of a level, chosen from the layout:

* per-layer: all L layers of the level have the same width C (and L >= 2). s is
  viewed as [B, L, C], the mappers act on the last axis with weights shared across
  layers, and cm(cond) [B, C] is repeated on every layer. The official coarse
  (3 x 512) and medium (4 x 512) levels.
* flat: unequal widths, or a single layer. s is the flat [B, W] slice of the level.
  The official fine level (2464 = 512+512+512+256+256+128+128+64+64+32).

A level without conv layers (e.g. fine at 32 px) has no modules and no output.
PixelNorm normalizes over dim 1 as the official code does: for [B, L, C] that is
the *layer* axis (each channel across the level's layers), not the channels. Kept
for checkpoint compatibility. With the official 1024 config-f layout and E = 512
this is exactly the official network (82.8 M parameters).

Equalized learning rate, folded: the official EqualLinear stores W (init randn /
lr_mul) and b, and computes lrelu(x @ (W * lr_mul / sqrt(in)).T + lr_mul * b) * sqrt(2).
Here the parameters hold the effective values W * g_w and b * g_b with
g_w = lr_mul * sqrt(2) / sqrt(in) and g_b = lr_mul * sqrt(2) (sqrt(2) > 0 commutes with
leaky ReLU), so a forward pass is one addmm + one in-place leaky ReLU. `state_dict()`
and `load_state_dict()` convert to and from the official values, so checkpoints are
official. Adam on the effective parameters equals Adam on the official ones when
each parameter's lr is multiplied by g and eps divided by g: see `param_groups`.

The forward computes the official function with less work (equal to it up to float
rounding): the condition modules' PixelNorm of cond is computed once for the three levels;
in fp32 inference on a CPU every layer is one fused oneDNN call (matmul + bias + leaky
ReLU, `fused_cpu_linear`); in other inference (bf16, GPUs) the fusion module's first layer
never builds [sm(s) || cm(cond)]: with W = [W_s | W_c] it is one matmul of sm(s) by W_s
accumulating the product of cm(cond) by W_c (`EqualLinear.forward_joined`); in the
per-layer form that product is [B, C], computed once per row instead of on each of the L
layers of the repeated cm(cond). Training (autograd) runs F.linear on the concatenation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import (
    CheckpointError,
    check_state_fits,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    torch_load_safe,
)
from model.layout import LEVELS, Level, SLayout

LR_MUL = 0.01
N_LAYERS = 4  # EqualLinear layers per Mapper
FORMAT = "deltaedit-mapper"

# The official generator: StyleGAN2 config-f, 1024 px.
OFFICIAL_CHANNELS = {
    4: 512,
    8: 512,
    16: 512,
    32: 512,
    64: 512,
    128: 256,
    256: 128,
    512: 64,
    1024: 32,
}


def official_layout() -> SLayout:
    """S layout of the 1024 px config-f generator (Dconv = 6048)."""
    return SLayout.from_channels(1024, OFFICIAL_CHANNELS)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) over dim 1 (the layer axis for [B, L, C] inputs, as in the official code)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class PixelNorm(nn.Module):
    """`pixel_norm` as a module (the first entry of a style / condition Mapper)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x)


def fused_cpu_linear(x: torch.Tensor) -> bool:
    """Whether a layer's forward on `x` runs as one oneDNN call (matmul + bias + leaky
    ReLU fused: `torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile uses on
    CPU): fp32 on a CPU with oneDNN, outside autograd and autocast (inference: edit,
    validation). Elsewhere (training, bf16, GPUs) F.linear + leaky ReLU; the two agree
    within float rounding (tests/test_mapper.py). On 2 shared cores of an AMD EPYC it is
    2-3x the MKL matmul + separate activation (BENCHMARKS.md)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not _cpu_autocast()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


class EqualLinear(nn.Module):
    """Linear layer with equalized lr (lr_mul) and fused leaky ReLU 0.2 * sqrt(2).

    `weight` [out, in] and `bias` [out] hold the effective (folded) values; the
    state dict holds the official ones (see the module docstring).
    """

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = LR_MUL) -> None:
        super().__init__()
        self.gain_w = lr_mul * math.sqrt(2) / math.sqrt(in_dim)
        self.gain_b = lr_mul * math.sqrt(2)
        # Official init: W = randn / lr_mul, b = 0.
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) * (self.gain_w / lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.register_state_dict_post_hook(EqualLinear._to_official)
        self.register_load_state_dict_pre_hook(EqualLinear._from_official)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if fused_cpu_linear(x):
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.weight, self.bias, "leaky_relu", [0.2], ""
            )
        return F.leaky_relu(F.linear(x, self.weight, self.bias), 0.2, inplace=True)

    def forward_joined(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """forward(cat([a, c], -1)) without building the concatenation: W = [W_a | W_c],
        out = lrelu(a @ W_a.T + b + c @ W_c.T). a [B, k] with c [B, in - k], or a [B, L, k]
        with c [B, in - k] standing for the same c on each of the L rows (computed once per
        row instead of L times). What the fusion module's first layer sees; the split form
        runs in inference off the oneDNN path (bf16, GPUs)."""
        # the concatenation: for the fused oneDNN call (one call on the whole contiguous
        # weight) and under autograd (the weight slices' backward costs more than it saves)
        if fused_cpu_linear(a) or torch.is_grad_enabled():
            if a.dim() == 3:
                c = c.unsqueeze(1).expand(*a.shape[:2], c.shape[-1])
            return self.forward(torch.cat([a, c], dim=-1))
        k = a.shape[-1]
        w_c = self.weight[:, k:]
        y = F.linear(a, self.weight[:, :k], self.bias)
        if y.dim() == 2 and y.dtype == c.dtype == w_c.dtype:
            y.addmm_(c, w_c.t())  # accumulated by the matmul itself (no autocast here)
        elif y.dim() == 2:
            y += F.linear(c, w_c)
        else:
            y += F.linear(c, w_c).unsqueeze(1)
        return F.leaky_relu(y, 0.2, inplace=True)

    def gains(self) -> dict[str, float]:
        """Effective = official * gain, per parameter name."""
        return {"weight": self.gain_w, "bias": self.gain_b}

    @staticmethod
    def _to_official(module: EqualLinear, state: dict, prefix: str, _meta: Any) -> None:
        for name, gain in module.gains().items():
            if prefix + name in state:
                state[prefix + name] = state[prefix + name].detach() / gain

    @staticmethod
    def _from_official(module: EqualLinear, state: dict, prefix: str, *_: Any) -> None:
        for name, gain in module.gains().items():
            if prefix + name in state:
                state[prefix + name] = state[prefix + name] * gain

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, lr_mul={LR_MUL}"


class Mapper(nn.Module):
    """[PixelNorm] + 4 EqualLinear: in_dim -> out_dim -> out_dim -> out_dim -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, pixel_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [PixelNorm()] if pixel_norm else []
        layers += [EqualLinear(in_dim if k == 0 else out_dim, out_dim) for k in range(N_LAYERS)]
        self.mapping = nn.Sequential(*layers)  # keys mapping.{i}.weight / .bias

    def forward(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """`normalized`: x is already pixel_norm'ed (the PixelNorm entry is skipped)."""
        for layer in self.mapping:
            if not (normalized and isinstance(layer, PixelNorm)):
                x = layer(x)
        return x

    def linears(self) -> list[EqualLinear]:
        return [m for m in self.mapping if isinstance(m, EqualLinear)]


@dataclass(frozen=True)
class LevelPlan:
    """How one level of conv-only S is mapped."""

    level: Level
    span: slice  # its channels in conv-only S
    n_layers: int  # L (1 in the flat form)
    width: int  # C per layer (the whole level width W in the flat form)


def plan_levels(layout: SLayout) -> list[LevelPlan]:
    """Per-layer form for >= 2 equal-width layers, flat otherwise; empty levels dropped."""
    plans = []
    spans = layout.level_slices()
    for level in LEVELS:
        widths = [la.channels for la in layout.level_layers(level)]
        if not widths:
            continue
        if len(widths) >= 2 and len(set(widths)) == 1:
            plans.append(LevelPlan(level, spans[level], len(widths), widths[0]))
        else:
            plans.append(LevelPlan(level, spans[level], 1, sum(widths)))
    return plans


class DeltaMapper(nn.Module):
    """delta_s = DeltaMapper(s_conv [B, Dconv], cond [B, 2E]) -> [B, Dconv].

    layout None = the official 1024 config-f layout (exact official network).
    channels "conv" (official) maps the conv channels; "all" (an extension) maps every
    S channel, toRGB included: Dconv then reads "D" and s_layout.conv_index() = 0..D-1.
    `layout` stays the generator's S layout; `s_layout` is the one the mapper sees.
    """

    def __init__(
        self, layout: SLayout | None = None, clip_dim: int = 512, channels: str = "conv"
    ) -> None:
        super().__init__()
        self.layout = layout if layout is not None else official_layout()
        self.clip_dim = int(clip_dim)
        self.channels = channels
        self.s_layout = self.layout.mapper_layout(channels)
        self.plans = plan_levels(self.s_layout)
        if not self.plans:
            raise ValueError("layout has no conv layers: nothing for the mapper to map")
        cond_dim = 2 * self.clip_dim
        # Registration order = official state_dict order: all sm_, then cm_, then fm_.
        for p in self.plans:
            self.add_module(f"sm_{p.level}", Mapper(p.width, p.width))
        for p in self.plans:
            self.add_module(f"cm_{p.level}", Mapper(cond_dim, p.width))
        for p in self.plans:
            self.add_module(f"fm_{p.level}", Mapper(2 * p.width, p.width, pixel_norm=False))

    @property
    def conv_dim(self) -> int:
        """Width of the S slice the mapper maps (Dconv; D for channels "all")."""
        return self.s_layout.conv_dim

    def s_index(self) -> np.ndarray:
        """Indices of the mapped channels in the flat S, in order."""
        return self.s_layout.conv_index()

    def config(self) -> dict[str, Any]:
        config = {
            "format": FORMAT,
            "version": 1,
            "clip_dim": self.clip_dim,
            "layout": self.layout.to_dict(),
        }
        if self.channels != "conv":  # official mappers keep the official config (fingerprint)
            config["channels"] = self.channels
        return config

    @property
    def fingerprint(self) -> str:
        """sha256 of the official-convention weights + config."""
        return fingerprint(self.state_dict(), self.config())

    def forward(self, s_conv: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if s_conv.shape[-1] != self.conv_dim or cond.shape[-1] != 2 * self.clip_dim:
            raise ValueError(
                f"mapper expects s_conv [B, {self.conv_dim}] and cond [B, {2 * self.clip_dim}], "
                f"got {tuple(s_conv.shape)} and {tuple(cond.shape)}"
            )
        b = s_conv.shape[0]
        cond = pixel_norm(cond)  # every condition module's PixelNorm, once for all levels
        out = []
        for p in self.plans:
            sm, cm, fm = (getattr(self, f"{k}_{p.level}") for k in ("sm", "cm", "fm"))
            s = s_conv[:, p.span]  # [B, L*C]
            if p.n_layers > 1:
                s = s.reshape(b, p.n_layers, p.width)  # [B, L, C]
            c = cm(cond, normalized=True)  # [B, C]: the same on every layer of the level
            first, *rest = fm.linears()
            fused = first.forward_joined(sm(s), c)  # fm([sm(s) || c]), [B, L, C] or [B, W]
            for layer in rest:
                fused = layer(fused)
            out.append(fused.reshape(b, -1))
        return torch.cat(out, dim=1)  # [B, Dconv]

    def param_groups(self, lr: float, eps: float = 1e-8) -> list[dict[str, Any]]:
        """Adam groups giving the official update: lr * gain, eps / gain per parameter.

        One group per distinct gain, in a fixed order (module order).
        """
        groups: dict[float, dict[str, Any]] = {}
        for module in self.modules():
            if isinstance(module, EqualLinear):
                for name, gain in module.gains().items():
                    g = groups.setdefault(
                        gain, {"params": [], "lr": lr * gain, "eps": eps / gain, "gain": gain}
                    )
                    g["params"].append(getattr(module, name))
        return list(groups.values())


# --- checkpoints ---------------------------------------------------------------


def save_mapper(mapper: DeltaMapper, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """`path` (safetensors, official key names and values) + its JSON config, atomically.

    `extra` (provenance: CLIP/generator fingerprints, training config, metrics) is
    stored in the JSON config beside the mapper's own keys.
    """
    config = dict(extra or {}) | mapper.config() | {"fingerprint": mapper.fingerprint}
    save_checkpoint(path, mapper.state_dict(), config)


def load_mapper(
    path: str | Path,
    layout: SLayout | None = None,
    clip_dim: int | None = None,
    device: str | torch.device = "cpu",
) -> DeltaMapper:
    """This project's safetensors + json, or an official `.pth`/`.pt` state dict.

    An official file carries no config: it is built for `layout` (None = official
    1024 layout) and `clip_dim` (None = 512). For a safetensors file, `layout` /
    `clip_dim` if given must match the checkpoint's (else CheckpointError).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, config = load_checkpoint(path)
        if config.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a Delta Mapper checkpoint (format {config.get('format')!r})"
            )
        ck_layout = SLayout.from_dict(config["layout"])
        ck_clip = int(config["clip_dim"])
        if layout is not None and ck_layout != layout:
            raise CheckpointError(
                f"{path}: mapper made for another S layout (Dconv {ck_layout.conv_dim}, "
                f"{len(ck_layout.conv_layers)} conv layers) than expected "
                f"(Dconv {layout.conv_dim}, {len(layout.conv_layers)} conv layers)"
            )
        if clip_dim is not None and ck_clip != clip_dim:
            raise CheckpointError(
                f"{path}: mapper made for CLIP dim {ck_clip}, expected {clip_dim}"
            )
        layout, clip_dim = ck_layout, ck_clip
        channels = str(config.get("channels", "conv"))
    else:
        channels = "conv"
        state = torch_load_safe(path)
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        clip_dim = 512 if clip_dim is None else clip_dim
    _check_state(layout, clip_dim, state, path, channels)
    with torch.device("meta"):  # no random init: the parameters are assigned the loaded ones
        mapper = DeltaMapper(layout, clip_dim, channels)
    mapper.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return mapper.to(device)


def _check_state(
    layout: SLayout | None,
    clip_dim: int,
    state: dict[str, torch.Tensor],
    path: Path,
    channels: str = "conv",
) -> None:
    """Keys and shapes of `state` against a mapper for this layout (built on "meta": no memory)."""
    with torch.device("meta"):
        own = DeltaMapper(layout, clip_dim, channels).state_dict()
    what = "a Delta Mapper for this layout (a mapper for another S layout or CLIP dim?)"
    check_state_fits(own, state, path, what)
