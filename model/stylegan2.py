"""StyleGAN2 generator (mapping + synthesis) driven by W+ or by StyleSpace S.

Pure PyTorch, one code path for CPU and CUDA, differentiable end to end.

    z [B, Z] --mapping--> w [B, W] --(repeat / truncate)--> W+ [B, L, W]
    W+ --w_to_s--> s [B, D]   (every modulation output, `model.layout` order)
    s  --synthesize--> image [B, 3, H, W] (raw last RGB skip sum, never clamped)

Parameter and buffer names follow rosinality/stylegan2-pytorch `Generator`
(`style.{i}`, `input.input`, `conv1`, `to_rgb1`, `convs.{k}`, `to_rgbs.{i}`,
`noises.noise_{j}`), so its checkpoints map onto this module key for key; the
fixed FIR buffers (`*.blur.kernel`, `*.upsample.kernel`) are not parameters
here: the filter comes from `GeneratorConfig.blur_kernel`.

Forward conventions (tests/fixtures/README.md):
- mapping: PixelNorm(z), then n_mlp x [x @ (W * lr/sqrt(in)).T + lr * b, lrelu 0.2 * sqrt 2].
- modulation (S): s = w_row @ (A / sqrt(W)).T + b.
- modulated conv: the weight is shared across the batch; activations are scaled by s
  instead (x * s -> conv -> * demod), demod[b, o] = rsqrt(sum_i c^2 |W[o, i]|^2 s[b, i]^2
  + 1e-8) with c = 1 / sqrt(fan_in). Equal to per-sample weight modulation up to
  float rounding (~1e-5).
- upsampling conv: conv_transpose2d(stride 2) with the shared weight (H -> 2H + 1),
  then the FIR blur K = outer(k, k) / sum(k)^2 * 4 with pad (1, 1) (-> 2H).
- noise: out + noise.weight * noise (buffer for "const", fresh N(0, 1) for "random").
- activation: lrelu(out + bias, 0.2) * sqrt 2 (clamped to +-conv_clamp when set).
- toRGB: 1x1 modulated conv without demod, + bias, + upfirdn(skip, K, up 2, pad (2, 1)).

Execution (speed, same numbers): activations run channels-last (NHWC; oneDNN / cuDNN
are faster there); demod, noise, bias and the sqrt 2 gain are one fused multiply-add
(lrelu(a) * sqrt 2 = lrelu(sqrt 2 * a)), then an in-place leaky ReLU when no gradient
is wanted; the scaled weights and their squared sums are cached while the weights are
unchanged; toRGB folds s into its tiny per-sample 1x1 weights (one batched matmul).
Results agree with the reference within ~1e-5 (conformance test, atol 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.checkpoint import (
    CheckpointError,
    check_state_fits,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    torch_load_safe,
)
from model.layout import SLayout

NoiseMode = Literal["const", "random", "none"]
SQRT2 = math.sqrt(2.0)
FORMAT = "deltaedit-stylegan2"
MEAN_LATENT_SEED = 3  # mean latent without latent_avg: mapping over default_rng(3) z
MEAN_LATENT_N = 4096


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GeneratorConfig:
    resolution: int  # output size, a power of two in 8..1024 (32 and up in practice)
    style_dim: int  # W: width of w and of every W+ row
    n_mlp: int  # mapping depth
    channels: dict[int, int]  # feature maps per resolution 4..resolution
    lr_mlp: float = 0.01  # mapping learning-rate multiplier (equalized lr)
    z_dim: int | None = None  # mapping input width; None = style_dim (rosinality)
    conv_clamp: float | None = None  # NVIDIA configs clamp activations at 256
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    mapping_dims: tuple[int, ...] | None = field(default=None)  # hidden widths if not W

    def __hash__(self) -> int:  # the channel table is a dict: hash the canonical form
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def in_dim(self) -> int:
        return self.z_dim if self.z_dim is not None else self.style_dim

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    def validate(self) -> None:
        r = self.resolution
        if r < 8 or 2 ** int(math.log2(r)) != r or r > 4096:
            raise ValueError(f"generator resolution must be a power of two in 8..4096, got {r}")
        need = [2**i for i in range(2, self.log_size + 1)]
        missing = [k for k in need if k not in self.channels]
        if missing:
            raise ValueError(f"generator channel table lacks resolutions {missing}")
        if self.style_dim < 1 or self.n_mlp < 1:
            raise ValueError(
                f"style_dim and n_mlp must be >= 1, got {self.style_dim}, {self.n_mlp}"
            )
        if self.mapping_dims is not None and len(self.mapping_dims) != self.n_mlp - 1:
            raise ValueError(f"mapping_dims must list {self.n_mlp - 1} hidden widths")

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "style_dim": self.style_dim,
            "n_mlp": self.n_mlp,
            "channels": {str(k): int(v) for k, v in sorted(self.channels.items())},
            "lr_mlp": self.lr_mlp,
            "z_dim": self.z_dim,
            "conv_clamp": self.conv_clamp,
            "blur_kernel": list(self.blur_kernel),
            "mapping_dims": None if self.mapping_dims is None else list(self.mapping_dims),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneratorConfig:
        md = d.get("mapping_dims")
        return cls(
            resolution=int(d["resolution"]),
            style_dim=int(d["style_dim"]),
            n_mlp=int(d["n_mlp"]),
            channels={int(k): int(v) for k, v in d["channels"].items()},
            lr_mlp=float(d.get("lr_mlp", 0.01)),
            z_dim=None if d.get("z_dim") is None else int(d["z_dim"]),
            conv_clamp=None if d.get("conv_clamp") is None else float(d["conv_clamp"]),
            blur_kernel=tuple(int(x) for x in d.get("blur_kernel", (1, 3, 3, 1))),
            mapping_dims=None if md is None else tuple(int(x) for x in md),
        )


def config_f(resolution: int, style_dim: int = 512, n_mlp: int = 8) -> GeneratorConfig:
    """The paper's config-f channel table (rosinality channel_multiplier=2)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    return GeneratorConfig(
        resolution, style_dim, n_mlp, {k: v for k, v in table.items() if k <= resolution}
    )


CONFIGS: dict[str, GeneratorConfig] = {
    # tests and the default tiny pipeline: 64 px, narrow
    "tiny-64": GeneratorConfig(64, 32, 2, {4: 32, 8: 32, 16: 32, 32: 16, 64: 16}),
    # the shapes world: 32 px
    "world-32": GeneratorConfig(32, 64, 2, {4: 64, 8: 64, 16: 64, 32: 32}),
    # the shapes world trained the StyleGAN2 way (stages/world/gan.py): a 4-layer mapping
    "world-gan-32": GeneratorConfig(32, 64, 4, {4: 64, 8: 64, 16: 64, 32: 32}),
    # the conformance fixture's architecture (stylegan2-small)
    "small-64": GeneratorConfig(64, 64, 2, {4: 64, 8: 64, 16: 64, 32: 64, 64: 32}),
    "ffhq-1024": config_f(1024),
    "config-f-256": config_f(256),
}


# --------------------------------------------------------------------------- layers
def fir_kernel(k: tuple[int, ...]) -> Tensor:
    """2-D FIR filter with gain 4 (upsampling by 2): outer(k, k) / sum(outer) * 4."""
    k1 = torch.tensor(k, dtype=torch.float32)
    k2 = torch.outer(k1, k1)
    return k2 / k2.sum() * 4


def fir_filter(x: Tensor, k: Tensor, pad: int) -> Tensor:
    """upfirdn2d with up=down=1 and equal padding: pad `pad` on every side, convolve
    with k (depthwise, valid)."""
    c = x.shape[1]
    kf = torch.flip(k, (0, 1))[None, None].expand(c, 1, *k.shape).to(x.dtype)
    return F.conv2d(x, kf, padding=pad, groups=c)


def fir_upsample2(x: Tensor, k: Tensor) -> Tensor:
    """upfirdn2d(x, k, up=2, pad=(2, 1)) for a 4-tap k: [B, C, H, W] -> [B, C, 2H, 2W].

    Zero insertion + pad (2, 1) + convolution with k equals a stride-2 transposed
    convolution with k and padding 1 (same taps, no multiply by the inserted zeros).
    """
    c = x.shape[1]
    kk = k[None, None].expand(c, 1, *k.shape).to(x.dtype)
    return F.conv_transpose2d(x, kk, stride=2, padding=1, groups=c)


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalized lr: y = x @ (W * lr / sqrt(in)).T + lr * b."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: Tensor) -> Tensor:
        if self.activate:
            y = F.linear(x, self.weight * self.scale)
            return F.leaky_relu(y + self.bias * self.lr_mul, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)


class ModulatedConv(nn.Module):
    """Modulated k x k conv. `weight` [1, C_out, C_in, k, k]; `modulation` w -> s [B, C_in].

    The weight is shared by the batch; the style scales the activations and the
    demodulation factor is returned for the caller to apply (fused with its epilogue).
    """

    def __init__(self, c_in: int, c_out: int, k: int, w_dim: int, demodulate: bool, upsample: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, c_out, c_in, k, k))
        self.modulation = EqualLinear(w_dim, c_in)
        self.scale = 1 / math.sqrt(c_in * k * k)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = k // 2

    def prepared(self) -> tuple[Tensor, Tensor]:
        """(conv weight as the conv op takes it, sum_{kh,kw} w^2 [C_out, C_in]) with
        w = weight * 1/sqrt(fan_in); cached while the weight is unchanged and no
        gradient is wanted."""
        p = self.weight
        key = (p._version, p.data_ptr(), p.device, p.dtype)
        cache = getattr(self, "_prep", None)
        fresh = torch.is_grad_enabled() and p.requires_grad
        if not fresh and cache is not None and cache[0] == key:
            return cache[1], cache[2]
        w = p[0] * self.scale  # [C_out, C_in, k, k]
        wsq = w.square().sum(dim=(2, 3))  # [C_out, C_in]
        if self.upsample:
            w = w.transpose(0, 1)  # conv_transpose2d layout [C_in, C_out, k, k]
        if not fresh:  # stored in the layout the NHWC convolution reads (no per-call reorder)
            w = w.contiguous(memory_format=torch.channels_last)
            self._prep = (key, w, wsq)
        return w, wsq

    def forward(self, x: Tensor, s: Tensor, fir: Tensor) -> tuple[Tensor, Tensor | None]:
        """x [B, C_in, H, W], s [B, C_in] -> (conv(x * s) [B, C_out, H', W'], demod [B, C_out])."""
        w, wsq = self.prepared()
        x = x * s[:, :, None, None].to(x.dtype)
        if self.upsample:  # transposed conv (H -> 2H + 1), then blur (-> 2H)
            out = F.conv_transpose2d(x, w, stride=2)
            out = fir_filter(out, fir, 1)
        else:
            out = F.conv2d(x, w, padding=self.padding)
        demod = None
        if self.demodulate:  # rsqrt(sum_{i,kh,kw} (w[o, i] * s[b, i])^2 + 1e-8)
            demod = torch.rsqrt(F.linear(s.square(), wsq) + 1e-8)  # [B, C_out]
        return out, demod


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength


class BiasLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))


class StyledConv(nn.Module):
    """modulated conv (optional upsample) -> * demod + noise -> + bias, lrelu 0.2 * sqrt 2."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, upsample: bool, clamp: float | None):
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, 3, w_dim, demodulate=True, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = BiasLeakyReLU(c_out)
        self.clamp = clamp

    def forward(
        self, x: Tensor, s: Tensor, noise: Tensor | None, fir: Tensor, const: bool = False
    ) -> Tensor:
        """`const`: `noise` is the layer's buffer (its shift may be cached)."""
        out, demod = self.conv(x, s, fir)
        # lrelu(a) * sqrt2 = lrelu(sqrt2 * a): one fused multiply-add, then the activation
        shift = self.shift(noise, cacheable=const)
        out = torch.addcmul(shift, out, (demod * SQRT2)[:, :, None, None].to(out.dtype))
        if torch.is_grad_enabled() and out.requires_grad:
            out = F.leaky_relu(out, 0.2)
        else:
            out = F.leaky_relu_(out, 0.2)
        return out if self.clamp is None else out.clamp(-self.clamp, self.clamp)

    def shift(self, noise: Tensor | None, cacheable: bool = False) -> Tensor:
        """sqrt2 * (bias + strength * noise) [1|B, C, H, W], built in NHWC order; the
        constant-noise one is cached while bias, strength and buffer are unchanged."""
        bias, strength = self.activate.bias, self.noise.weight
        if noise is None:
            return (bias * SQRT2)[None, :, None, None]
        key = tuple((t._version, t.data_ptr()) for t in (bias, strength, noise))
        grad = torch.is_grad_enabled() and (bias.requires_grad or strength.requires_grad)
        fresh = grad or not cacheable or noise.shape[0] != 1
        cache = getattr(self, "_shift", None)
        if not fresh and cache is not None and cache[0] == key:
            return cache[1]
        nb, _, h, w = noise.shape
        out = (bias * SQRT2).view(1, 1, 1, -1) + (strength * SQRT2 * noise).view(nb, h, w, 1)
        out = out.permute(0, 3, 1, 2)
        if not fresh:
            self._shift = (key, out)
        return out


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, + bias, + upsampled skip."""

    def __init__(self, c_in: int, w_dim: int, clamp: float | None):
        super().__init__()
        self.conv = ModulatedConv(c_in, 3, 1, w_dim, demodulate=False, upsample=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.clamp = clamp

    def forward(self, x: Tensor, s: Tensor, skip: Tensor | None, fir: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # per-sample 1x1 weights are tiny [B, C, 3]: fold s into them, one batched matmul
        w = self.conv.weight[0, :, :, 0, 0] * self.conv.scale  # [3, C]
        wb = (s[:, :, None] * w.t()[None]).to(x.dtype)  # [B, C, 3]
        xl = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when x is channels_last
        rgb = torch.baddbmm(self.bias.view(1, 1, 3).to(x.dtype), xl, wb)  # [B, HW, 3]
        rgb = rgb.view(B, H, W, 3).permute(0, 3, 1, 2)  # [B, 3, H, W]
        if self.clamp is not None:
            rgb = rgb.clamp(-self.clamp, self.clamp)
        return rgb if skip is None else rgb + fir_upsample2(skip, fir)


class ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.input = nn.Parameter(torch.empty(1, channels, 4, 4))


# --------------------------------------------------------------------------- generator
class Generator(nn.Module):
    """StyleGAN2 with an explicit StyleSpace: see the module docstring."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.layout = SLayout.from_channels(config.resolution, config.channels)
        self.resolution = config.resolution
        self.w_dim = config.style_dim
        self.n_latent = self.layout.n_latent
        ch, W, clamp = config.channels, config.style_dim, config.conv_clamp

        dims = [config.in_dim, *(config.mapping_dims or [W] * (config.n_mlp - 1)), W]
        self.style = nn.Sequential(
            PixelNorm(),
            *[
                EqualLinear(dims[i], dims[i + 1], lr_mul=config.lr_mlp, activate=True)
                for i in range(config.n_mlp)
            ],
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], W, upsample=False, clamp=clamp)
        self.to_rgb1 = ToRGB(ch[4], W, clamp)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        self.noises.register_buffer("noise_0", torch.zeros(1, 1, 4, 4))
        c_prev = ch[4]
        for i, lg in enumerate(range(3, config.log_size + 1)):
            res, c = 2**lg, ch[2**lg]
            self.convs.append(StyledConv(c_prev, c, W, upsample=True, clamp=clamp))
            self.convs.append(StyledConv(c, c, W, upsample=False, clamp=clamp))
            self.to_rgbs.append(ToRGB(c, W, clamp))
            for j in (2 * i + 1, 2 * i + 2):
                self.noises.register_buffer(f"noise_{j}", torch.zeros(1, 1, res, res))
            c_prev = c
        self.register_buffer("fir", fir_kernel(config.blur_kernel), persistent=False)
        self.register_buffer("latent_avg", None)  # [1, W] when the checkpoint has one
        self.channels_last = True  # activation memory format inside synthesis
        self._mean_cache: tuple[tuple, Tensor] | None = None
        self._fp_cache: tuple[tuple, str] | None = None
        # modulated layers in layout (execution) order
        self.styled: list[nn.Module] = [self.conv1, self.to_rgb1]
        for i in range(len(self.to_rgbs)):
            self.styled += [self.convs[2 * i], self.convs[2 * i + 1], self.to_rgbs[i]]
        names = [la.name for la in self.layout.layers]
        expected = ["conv1", "to_rgb1"] + [
            n
            for i in range(len(self.to_rgbs))
            for n in (f"convs.{2 * i}", f"convs.{2 * i + 1}", f"to_rgbs.{i}")
        ]
        assert names == expected, (names, expected)

    # ---------------------------------------------------------------- identity
    @property
    def fingerprint(self) -> str:
        """sha256 of weights + config; recomputed only after the weights change."""
        state = self.state_dict()
        key = tuple((k, v._version, v.data_ptr()) for k, v in state.items())
        if self._fp_cache is None or self._fp_cache[0] != key:
            self._fp_cache = (key, fingerprint(state, self.config.to_dict()))
        return self._fp_cache[1]

    @property
    def device(self) -> torch.device:
        return self.input.input.device

    # ---------------------------------------------------------------- mapping
    def mapping(self, z: Tensor, truncation: float = 1.0) -> Tensor:
        """z [B, Z] -> w [B, W]; truncation toward `mean_latent()` when != 1."""
        if z.ndim != 2 or z.shape[1] != self.config.in_dim:
            raise ValueError(
                f"mapping expects z of shape [B, {self.config.in_dim}], got {list(z.shape)}"
            )
        w = self.style(z)
        return w if truncation == 1.0 else self.truncate(w, truncation)

    def truncate(self, w: Tensor, truncation: float) -> Tensor:
        """mean + t * (w - mean) for w [B, W] or W+ [B, L, W]."""
        mean = self.mean_latent().to(w.dtype)
        return mean + truncation * (w - mean)

    def mean_latent(self) -> Tensor:
        """[1, W]: the checkpoint's `latent_avg`, else the mean of mapping over 4096 z
        drawn by numpy.random.default_rng(3).standard_normal((4096, Z), float32)."""
        if self.latent_avg is not None:
            return self.latent_avg
        params = [p for p in self.style.parameters()]
        key = tuple((p._version, p.data_ptr()) for p in params) + (str(self.device),)
        if self._mean_cache is None or self._mean_cache[0] != key:
            rng = np.random.default_rng(MEAN_LATENT_SEED)
            z = rng.standard_normal((MEAN_LATENT_N, self.config.in_dim), dtype=np.float32)
            with torch.no_grad():
                w = self.style(torch.from_numpy(z).to(self.device, self.input.input.dtype))
            self._mean_cache = (key, w.mean(0, keepdim=True))
        return self._mean_cache[1]

    def wplus(self, w: Tensor) -> Tensor:
        """w [B, W] -> W+ [B, L, W] (the same row everywhere)."""
        return w[:, None, :].expand(-1, self.n_latent, -1)

    # ---------------------------------------------------------------- S space
    def w_to_s(self, wplus: Tensor) -> Tensor:
        """W+ [B, L, W] -> s [B, D]: every layer's modulation output, layout order."""
        if wplus.ndim != 3 or tuple(wplus.shape[1:]) != (self.n_latent, self.w_dim):
            raise ValueError(
                f"W+ must have shape [B, {self.n_latent}, {self.w_dim}], got {list(wplus.shape)}"
            )
        return torch.cat(
            [
                m.conv.modulation(wplus[:, la.w_index])
                for la, m in zip(self.layout.layers, self.styled, strict=True)
            ],
            dim=1,
        )

    def split_s(self, s: Tensor) -> list[Tensor]:
        """s [B, D] -> per-layer styles [B, C_layer] in layout order."""
        if s.ndim != 2 or s.shape[1] != self.layout.dim:
            raise ValueError(
                f"S code must have shape [B, {self.layout.dim}] for this generator's layout "
                f"(conv-only width {self.layout.conv_dim}), got {list(s.shape)}"
            )
        return list(torch.split(s, [la.channels for la in self.layout.layers], dim=1))

    def _noises(self, batch: int, mode: NoiseMode) -> list[Tensor | None]:
        bufs = [getattr(self.noises, f"noise_{j}") for j in range(2 * len(self.to_rgbs) + 1)]
        if mode == "const":
            return bufs
        if mode == "random":
            return [
                torch.randn(batch, 1, *b.shape[2:], device=b.device, dtype=b.dtype) for b in bufs
            ]
        if mode == "none":
            return [None] * len(bufs)
        raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {mode!r}")

    def synthesize(self, s: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        """s [B, D] -> image [B, 3, H, W], the raw output (never clamped)."""
        styles = self.split_s(s)
        noise = self._noises(s.shape[0], noise_mode)
        const = noise_mode == "const"
        fir = self.fir
        x = self.input.input.expand(s.shape[0], -1, -1, -1)
        if self.channels_last:  # NHWC: faster convolutions on CPU (oneDNN) and GPU
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x, styles[0], noise[0], fir, const)
        img = self.to_rgb1(x, styles[1], None, fir)
        for i in range(len(self.to_rgbs)):
            x = self.convs[2 * i](x, styles[3 * i + 2], noise[2 * i + 1], fir, const)
            x = self.convs[2 * i + 1](x, styles[3 * i + 3], noise[2 * i + 2], fir, const)
            img = self.to_rgbs[i](x, styles[3 * i + 4], img, fir)
        return img.contiguous()

    def synthesize_w(self, wplus: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        """W+ [B, L, W] -> image [B, 3, H, W]."""
        return self.synthesize(self.w_to_s(wplus), noise_mode)

    def forward(self, wplus: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        return self.synthesize_w(wplus, noise_mode)

    # ---------------------------------------------------------------- state
    def load_weights(self, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
        """Strictly load rosinality-named tensors (FIR buffers ignored, latent_avg optional)."""
        state = dict(state)
        latent_avg = state.pop("latent_avg", None)
        expected = fir_kernel(self.config.blur_kernel)
        for key in [k for k in state if k.endswith((".blur.kernel", ".upsample.kernel"))]:
            k = state.pop(key)
            if tuple(k.shape) != tuple(expected.shape) or not torch.allclose(
                k.float(), expected, atol=1e-6
            ):
                raise CheckpointError(
                    f"{source}: {key} is not the [1,3,3,1] FIR filter; unsupported"
                )
        own = {k: v for k, v in self.state_dict().items() if k != "latent_avg"}
        check_state_fits(own, state, source, "the architecture inferred from its shapes")
        self.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        if latent_avg is not None:
            rows = latent_avg.detach().to(torch.float32).reshape(-1, latent_avg.shape[-1])
            # [W], [1, W], or [L, W] with identical rows (e4e/pSp store it repeated)
            if rows.shape[1] != self.w_dim or not torch.equal(rows, rows[:1].expand_as(rows)):
                raise CheckpointError(
                    f"{source}: latent_avg has shape {list(latent_avg.shape)}, expected "
                    f"[{self.w_dim}] (or rows of one [{self.w_dim}] vector)"
                )
            self.latent_avg = rows[:1].clone().to(self.device)
        self._fp_cache = None
        self._mean_cache = None

    def to_state(self) -> OrderedDict[str, Tensor]:
        return OrderedDict((k, v.detach()) for k, v in self.state_dict().items())


# --------------------------------------------------------------------------- creation
def _resolve_config(config: str | GeneratorConfig) -> GeneratorConfig:
    if isinstance(config, GeneratorConfig):
        return config
    if config not in CONFIGS:
        raise ValueError(f"unknown generator config {config!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[config]


def create_generator(config: str | GeneratorConfig, seed: int = 0) -> Generator:
    """A freshly initialised generator (rosinality's init), deterministic in `seed`.

    Conv/modulation/const weights ~ N(0, 1), mapping weights ~ N(0, 1) / lr_mlp,
    modulation biases 1, other biases 0, noise strengths 0, noise buffers ~ N(0, 1).
    """
    cfg = _resolve_config(config)
    G = Generator(cfg)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, t in G.state_dict(keep_vars=True).items():
            if name.endswith("modulation.bias"):
                t.fill_(1.0)
            elif name.endswith(("bias", "noise.weight")):
                t.zero_()
            else:
                t.copy_(torch.randn(t.shape, generator=gen))
                if name.startswith("style."):
                    t.div_(cfg.lr_mlp)
    return G


# --------------------------------------------------------------------------- loading
_PREFIXES = ("", "g_ema.", "module.", "decoder.", "generator.", "G_ema.")


def infer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> GeneratorConfig:
    """Architecture from rosinality-named tensor shapes (lr_mlp cannot be read: 0.01)."""
    try:
        n_mlp = 0
        while f"style.{n_mlp + 1}.weight" in state:
            n_mlp += 1
        if n_mlp == 0:
            raise KeyError("style.1.weight")
        dims = [tuple(state[f"style.{i}.weight"].shape) for i in range(1, n_mlp + 1)]
        style_dim, z_dim = dims[-1][0], dims[0][1]
        hidden = tuple(d[0] for d in dims[:-1])
        channels = {4: int(state["input.input"].shape[1])}
        n_convs = 0
        while f"convs.{n_convs}.conv.weight" in state:
            n_convs += 1
        if n_convs % 2 or n_convs == 0:
            raise KeyError(f"convs.{n_convs}.conv.weight")
        for i in range(n_convs // 2):
            channels[8 * 2**i] = int(state[f"convs.{2 * i}.conv.weight"].shape[1])
        k = tuple(state["conv1.conv.weight"].shape)
    except KeyError as exc:
        raise CheckpointError(
            f"{source}: not a StyleGAN2 generator (missing tensor {exc.args[0]!r})"
        ) from None
    if k[-1] != 3:
        raise CheckpointError(f"{source}: conv kernel {k[-1]} unsupported (expected 3)")
    return GeneratorConfig(
        resolution=4 * 2 ** (n_convs // 2),
        style_dim=int(style_dim),
        n_mlp=n_mlp,
        channels=channels,
        z_dim=None if z_dim == style_dim else int(z_dim),
        mapping_dims=None if all(h == style_dim for h in hidden) else hidden,
    )


def _find_generator_state(obj: Any, source: str) -> dict[str, Tensor]:
    """The rosinality-named generator tensors inside a loaded .pt/.pth object."""
    if isinstance(obj, Mapping) and isinstance(obj.get("g_ema"), Mapping):
        state = dict(obj["g_ema"])
        if "latent_avg" in obj and isinstance(obj["latent_avg"], Tensor):
            state["latent_avg"] = obj["latent_avg"]
        return state
    for holder in (obj, obj.get("state_dict") if isinstance(obj, Mapping) else None):
        if not isinstance(holder, Mapping):
            continue
        for p in _PREFIXES:
            if isinstance(holder.get(p + "style.1.weight"), Tensor):
                state = {
                    k[len(p) :]: v
                    for k, v in holder.items()
                    if k.startswith(p) and isinstance(v, Tensor)
                }
                if "latent_avg" not in state and isinstance(obj.get("latent_avg"), Tensor):
                    state["latent_avg"] = obj["latent_avg"]
                return state
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{source}: not a StyleGAN2 generator checkpoint (no 'g_ema' and no 'style.1.weight'; "
        f"found {keys})"
    )


def generator_from_state(
    state: Mapping[str, Tensor], source: str = "checkpoint", config: GeneratorConfig | None = None
) -> Generator:
    cfg = config or infer_config(state, source)
    G = Generator(cfg)
    G.load_weights(state, source)
    return G


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".pkl":
        return "pickle"
    if head[:2] == b"PK":
        return "torch"
    if head[:1] == b"\x80" and path.suffix not in (".pt", ".pth"):
        return "pickle"
    return "torch"


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """A generator from rosinality `.pt` (`g_ema` [+ `latent_avg`]), a plain state dict
    (`netG.pth`), an NVIDIA `.pkl` (`G_ema`, restricted unpickler), or this project's
    safetensors + JSON. Never executes code from the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such generator checkpoint")
    kind = _sniff(path)
    if kind == "safetensors":
        state, meta = load_checkpoint(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a generator checkpoint of this project "
                f"(format {meta.get('format')!r})"
            )
        try:
            cfg = GeneratorConfig.from_dict(meta["config"])
            cfg.validate()
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: bad generator config in {path.with_suffix('.json').name} ({exc})"
            ) from None
        G = generator_from_state(state, str(path), cfg)
    elif kind == "pickle":
        from model.nvidia_pickle import load_nvidia_generator_state

        state, cfg = load_nvidia_generator_state(path)
        G = generator_from_state(state, str(path), cfg)
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch_load_safe(path)
        G = generator_from_state(_find_generator_state(obj, str(path)), str(path))
    G = G.to(device).eval()
    G.source = str(path)
    return G


def save_generator(G: Generator, path: str | Path) -> None:
    """safetensors + JSON config (format, config, layout, fingerprint)."""
    save_checkpoint(
        path,
        G.to_state(),
        {
            "format": FORMAT,
            "version": 1,
            "config": G.config.to_dict(),
            "layout": G.layout.to_dict(),
            "fingerprint": G.fingerprint,
        },
    )
