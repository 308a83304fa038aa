"""Encoder4Editing (e4e): image -> W+ of a StyleGAN2 generator.

Structure (Tov et al. 2021, over the pSp framework), with the official module
names so `e4e_ffhq_encode.pt` loads unchanged:

    x [B,3,S,S] in [-1,1]
    input_layer: conv3x3 -> BN -> PReLU                       [B,C0,S,S]
    body: IR-SE bottleneck units in 4 stages (first unit of each stride 2)
          c1 = end of stage 1 [B,C1,S/4], c2 = end of stage 2 [B,C2,S/8],
          c3 = end of stage 3 [B,C3,S/16]
    feature pyramid: p2 = up(c3) + latlayer1(c2)  [B,C3,S/8]
                     p1 = up(p2) + latlayer2(c1)  [B,C3,S/4]
    styles[i] (GradualStyleBlock: stride-2 convs down to 1x1 -> EqualLinear):
          w0 = styles[0](c3); delta_i = styles[i](features_i), i >= 1, with
          features = c3 for coarse i < coarse_ind, p2 for medium i < middle_ind, p1 fine
    wplus[:, i] = w0 + delta_i (delta_0 = 0) + latent_avg[i]   [B,L,W]

The official FFHQ encoder is IR-SE50 (units 3/4/14/3, widths 64/128/256/512),
256 px input, L = 18, W = 512. Smaller configs keep the structure for tests
and the shapes world.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from model.checkpoint import (
    CheckpointError,
    check_state_fits,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    torch_load_safe,
)

FORMAT = "deltaedit-e4e"


@dataclass(frozen=True)
class E4EConfig:
    input_size: int = 256  # S: square input, a power of two >= 32
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # channels of the 4 body stages
    units: tuple[int, int, int, int] = (3, 4, 14, 3)  # bottleneck units per stage (IR-SE50)
    n_latent: int = 18  # L: W+ rows = 2 * log2(generator resolution) - 2
    w_dim: int = 512  # W
    coarse_ind: int = 3  # rows < coarse_ind read c3
    middle_ind: int = 7  # rows < middle_ind read p2; the rest read p1
    se_reduction: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(x) for x in self.widths))
        object.__setattr__(self, "units", tuple(int(x) for x in self.units))
        s = self.input_size
        if s < 32 or 2 ** int(math.log2(s)) != s:
            raise ValueError(f"e4e input_size must be a power of two >= 32, got {s}")
        if len(self.widths) != 4 or len(self.units) != 4 or min(self.units) < 1:
            raise ValueError("e4e needs 4 stages, each with >= 1 unit")
        if self.n_latent < 1 or self.w_dim < 1:
            raise ValueError("e4e n_latent and w_dim must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"], d["units"] = list(self.widths), list(self.units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> E4EConfig:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


CONFIGS: dict[str, E4EConfig] = {
    # the official e4e_ffhq_encode.pt architecture
    "ir_se50": E4EConfig(),
    # tests and the default tiny pipeline: matches the tiny-64 generator (L=10, W=32)
    "tiny": E4EConfig(64, (16, 24, 32, 64), (1, 1, 1, 1), n_latent=10, w_dim=32, se_reduction=8),
    # the shapes world: matches the world-32 generator (L=8, W=64)
    "world-32": E4EConfig(32, (16, 32, 48, 64), (1, 1, 2, 1), n_latent=8, w_dim=64, se_reduction=8),
}


def get_config(config: str | E4EConfig) -> E4EConfig:
    if isinstance(config, E4EConfig):
        return config
    if config not in CONFIGS:
        raise ValueError(f"unknown e4e config {config!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[config]


# ---- building blocks (module names = official state-dict keys) ------------------
class SEModule(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # [B,C,1,1]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """IR-SE unit: BN, conv3x3, PReLU, conv3x3 (stride), BN, SE; plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduction: int):
        super().__init__()
        if c_in == c_out:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)  # subsampling only
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            SEModule(c_out, reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualLinear(nn.Module):
    """Linear with equalized learning rate: y = x @ (w * lr_mul / sqrt(in)).T + b * lr_mul."""

    def __init__(self, c_in: int, c_out: int, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = lr_mul / math.sqrt(c_in)
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class GradualStyleBlock(nn.Module):
    """Feature map [B,C,r,r] -> one W row [B,W]: log2(r) stride-2 conv3x3 + LeakyReLU, linear."""

    def __init__(self, c_in: int, w_dim: int, spatial: int):
        super().__init__()
        n = max(1, int(math.log2(spatial)))
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(c_in if i == 0 else w_dim, w_dim, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(w_dim, w_dim, lr_mul=1.0)
        self.w_dim = w_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).reshape(-1, self.w_dim))


def _upsample_add(x: Tensor, y: Tensor) -> Tensor:
    """FPN merge: bilinear (align_corners=True) upsampling of x to y's size, plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class E4E(nn.Module):
    def __init__(self, config: E4EConfig, latent_avg: Tensor | None = None):
        super().__init__()
        self.config = config
        c = config
        w0 = c.widths[0]
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.PReLU(w0)
        )
        units: list[nn.Module] = []
        c_in = w0
        for width, n in zip(c.widths, c.units, strict=True):
            for k in range(n):
                units.append(BottleneckIRSE(c_in, width, 2 if k == 0 else 1, c.se_reduction))
                c_in = width
        self.body = nn.Sequential(*units)
        ends = [sum(c.units[: i + 1]) - 1 for i in range(4)]
        self._taps = (ends[1], ends[2], ends[3])  # body indices of c1, c2, c3 (6, 20, 23)
        s, fpn = c.input_size, c.widths[3]
        self.styles = nn.ModuleList()
        for i in range(c.n_latent):
            spatial = s // 16 if i < c.coarse_ind else s // 8 if i < c.middle_ind else s // 4
            self.styles.append(GradualStyleBlock(fpn, c.w_dim, spatial))
        self.latlayer1 = nn.Conv2d(c.widths[2], fpn, 1)
        self.latlayer2 = nn.Conv2d(c.widths[1], fpn, 1)
        if latent_avg is None:
            avg = torch.zeros(c.n_latent, c.w_dim)  # [L,W]
        else:
            avg = _latent_avg_rows(latent_avg, c.n_latent, c.w_dim)
        self.register_buffer("latent_avg", avg)
        self._fp_cache: tuple[Any, str] | None = None

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def w_dim(self) -> int:
        return self.config.w_dim

    @property
    def device(self) -> torch.device:
        return self.latent_avg.device

    @property
    def fingerprint(self) -> str:
        """sha256 of weights (incl. latent_avg) + config; recomputed after the weights change."""
        state = self.state_dict()
        key = tuple((k, v._version, v.data_ptr()) for k, v in state.items())
        if self._fp_cache is None or self._fp_cache[0] != key:
            flat = {k: v.reshape(1) if v.ndim == 0 else v for k, v in state.items()}
            self._fp_cache = (key, fingerprint(flat, {"format": FORMAT, **self.config.to_dict()}))
        return self._fp_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        """x [B,3,S,S] in [-1,1] -> wplus [B,L,W] (latent_avg included)."""
        s = self.config.input_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"e4e expects images [B, 3, {s}, {s}] in [-1, 1], got {tuple(x.shape)}; "
                f"use E4E.encode() to resize any size"
            )
        x = self.input_layer(x)
        feats = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                feats[i] = x
        c1, c2, c3 = (feats[i] for i in self._taps)
        w0 = self.styles[0](c3)  # [B,W]
        deltas = [torch.zeros_like(w0)]
        features = c3
        p2 = None
        for i in range(1, self.config.n_latent):
            if i == self.config.coarse_ind:
                p2 = features = _upsample_add(c3, self.latlayer1(c2))  # medium [B,C3,S/8]
            elif i == self.config.middle_ind:
                if p2 is None:
                    p2 = _upsample_add(c3, self.latlayer1(c2))
                features = _upsample_add(p2, self.latlayer2(c1))  # fine [B,C3,S/4]
            deltas.append(self.styles[i](features))
        return w0[:, None] + torch.stack(deltas, dim=1) + self.latent_avg[None]

    def encode(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] in [-1,1], any size -> wplus [B,L,W]; resized to S x S with
        antialiased bilinear (as the official transforms.Resize((256, 256)))."""
        x = x.to(self.device, torch.float32)
        s = self.config.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self(x)

    @torch.no_grad()
    def encode_pil(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> wplus [B,L,W]: RGB, Resize((S,S)) bilinear, to [-1,1] (official)."""
        s = self.config.input_size
        batch = []
        for im in images:
            im = im.convert("RGB").resize((s, s), Image.BILINEAR)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(s, s, 3)
            batch.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
        return self(torch.stack(batch).to(self.device))

    def official_state_dict(self) -> dict[str, Tensor]:
        """The official checkpoint's `state_dict` entries of the encoder ("encoder." + key)."""
        return {f"encoder.{k}": v for k, v in self.state_dict().items() if k != "latent_avg"}


def _latent_avg_rows(avg: Tensor, n_latent: int, w_dim: int) -> Tensor:
    """latent_avg as [L,W] from [W], [1,W] or [L,W]."""
    avg = torch.as_tensor(avg, dtype=torch.float32).detach().cpu()
    if avg.ndim == 1:
        avg = avg[None]
    if avg.ndim != 2 or avg.shape[1] != w_dim or avg.shape[0] not in (1, n_latent):
        raise ValueError(
            f"latent_avg of shape {tuple(avg.shape)} does not fit L={n_latent}, W={w_dim}"
        )
    return avg.expand(n_latent, w_dim).clone()


def create_e4e(config: str | E4EConfig, seed: int = 0, latent_avg: Tensor | None = None) -> E4E:
    """A randomly initialized e4e (deterministic for a seed; the global RNG is untouched), in
    eval mode (BatchNorm uses its running statistics); call .train() to train it."""
    cfg = get_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = E4E(cfg, latent_avg)
    return model.eval()


def save_e4e(model: E4E, path: str | Path) -> None:
    """safetensors + JSON config (format, config, fingerprint)."""
    meta = {"format": FORMAT, "config": model.config.to_dict(), "fingerprint": model.fingerprint}
    save_checkpoint(path, model.state_dict(), meta)


def load_e4e(path: str | Path, device: str = "cpu") -> E4E:
    """This project's safetensors+json, or the official `e4e_ffhq_encode.pt` layout
    ({"state_dict": {"encoder.*", "decoder.*"}, "latent_avg", "opts"}), read with
    weights_only=True. The architecture is read from the checkpoint's shapes."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = load_checkpoint(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an e4e checkpoint written by save_e4e")
        model = _load(E4EConfig.from_dict(meta["config"]), state, path)
        if meta.get("fingerprint") not in (None, model.fingerprint):
            raise CheckpointError(f"{path}: weights do not match the fingerprint in its json")
        return model.to(device).eval()
    ckpt = torch_load_safe(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not an e4e checkpoint (expected a dict)")
    sd = ckpt.get("state_dict", ckpt)
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc:
        raise CheckpointError(f"{path}: no 'encoder.*' weights: not an e4e/pSp checkpoint")
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":
        raise CheckpointError(
            f"{path}: encoder_type {opts['encoder_type']!r}; only Encoder4Editing is supported"
        )
    cfg = infer_config(enc, path)
    avg = ckpt.get("latent_avg")
    if avg is None:
        if opts.get("start_from_latent_avg", True):
            raise CheckpointError(f"{path}: no latent_avg in the checkpoint")
        warnings.warn(f"{path}: no latent_avg; W+ is not offset", UserWarning, stacklevel=2)
    try:
        enc["latent_avg"] = _latent_avg_rows(
            torch.zeros(cfg.w_dim) if avg is None else avg, cfg.n_latent, cfg.w_dim
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return _load(cfg, enc, path).to(device).eval()


def infer_config(enc: dict[str, Tensor], src: Any = "checkpoint") -> E4EConfig:
    """E4EConfig from official encoder keys (without the "encoder." prefix).

    Stages start where the unit width changes (the first at unit 0); the input size follows
    from the number of stride-2 convs of styles.0 (input = 16 * 2**n).
    """
    try:
        n_units = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("body."))
        widths_per_unit = [enc[f"body.{i}.res_layer.1.weight"].shape[0] for i in range(n_units)]
        n_latent = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("styles."))
        w_dim = enc["styles.0.linear.weight"].shape[0]
        n_convs0 = sum(1 for k in enc if k.startswith("styles.0.convs.") and k.endswith("weight"))
        fc1 = enc["body.0.res_layer.5.fc1.weight"].shape
        reduction = enc["body.0.res_layer.5.fc2.weight"].shape[0] // fc1[0]
        coarse = [
            sum(1 for k in enc if k.startswith(f"styles.{i}.convs.") and k.endswith("weight"))
            for i in range(n_latent)
        ]
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{src}: e4e weights are missing expected keys ({exc})") from None
    starts = [0] + [i for i in range(1, n_units) if widths_per_unit[i] != widths_per_unit[i - 1]]
    if len(starts) != 4:
        raise CheckpointError(f"{src}: expected 4 body stages, found {len(starts)}")
    units = [b - a for a, b in zip(starts, starts[1:] + [n_units], strict=True)]
    widths = [widths_per_unit[a] for a in starts]
    # heads read c3 (n0 convs), p2 (n0 + 1) and p1 (n0 + 2)
    coarse_ind = sum(1 for n in coarse if n == n_convs0)
    middle_ind = coarse_ind + sum(1 for n in coarse if n == n_convs0 + 1)
    return E4EConfig(
        input_size=16 * 2**n_convs0,
        widths=tuple(widths),
        units=tuple(units),
        n_latent=n_latent,
        w_dim=w_dim,
        coarse_ind=coarse_ind,
        middle_ind=middle_ind,
        se_reduction=reduction,
    )


def _load(config: E4EConfig, state: dict[str, Tensor], src: Any) -> E4E:
    """An E4E holding `state` (float32). Built on the meta device and assigned: no wasted
    random init (the full IR-SE50 has 267 M parameters)."""
    with torch.device("meta"):
        model = E4E(config)
    own = model.state_dict()
    check_state_fits(own, state, src, f"e4e {config}")
    state = {k: v if k.endswith("num_batches_tracked") else v.float() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
