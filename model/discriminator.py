"""A small StyleGAN2-style residual discriminator (for training generators, e.g. the
shapes world's; real checkpoints never need one).

    image [B, 3, R, R] --fromRGB 1x1--> [B, C_R, R, R]
      --ResBlock (conv 3x3, 2x down + conv 3x3; skip: 2x down + 1x1)--> ... --> [B, C_4, 4, 4]
      --minibatch std (+1 channel)--> conv 3x3 --> flatten --> linear --> linear --> logit [B]

Equalized learning rate (weights ~ N(0, 1), scaled by 1/sqrt(fan_in) at run time),
leaky ReLU 0.2 x sqrt 2, residual sums scaled by 1/sqrt 2, as in StyleGAN2. Downsampling
is a 2x2 average (a box filter) rather than StyleGAN2's [1, 3, 3, 1] FIR: the world is
32 px and the difference is not what this module is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class DiscriminatorConfig:
    resolution: int  # input size, a power of two >= 8
    channels: dict[int, int]  # feature maps per resolution 4..resolution
    mbstd_group: int = 4  # minibatch-std group size (the batch must divide by it, or be smaller)

    def to_dict(self) -> dict:
        return {
            "resolution": self.resolution,
            "channels": {str(k): v for k, v in sorted(self.channels.items())},
            "mbstd_group": self.mbstd_group,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DiscriminatorConfig:
        return cls(
            int(d["resolution"]),
            {int(k): int(v) for k, v in d["channels"].items()},
            int(d.get("mbstd_group", 4)),
        )


class EqualConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = 1 / math.sqrt(c_in * k * k)
        self.padding = k // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualDense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.scale = 1 / math.sqrt(d_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2) * SQRT2


class ResBlock(nn.Module):
    """[B, C_in, H, W] -> [B, C_out, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = EqualConv(c_in, c_in, 3)
        self.conv1 = EqualConv(c_in, c_out, 3)
        self.skip = EqualConv(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = lrelu(self.conv0(x))
        y = lrelu(self.conv1(F.avg_pool2d(y, 2)))  # downsample first: a quarter of the work
        return (y + self.skip(F.avg_pool2d(x, 2))) / SQRT2


def minibatch_std(x: Tensor, group: int) -> Tensor:
    """Append one channel: the std over groups of `group` samples, averaged over C, H, W."""
    B, C, H, W = x.shape
    g = min(group, B)
    if B % g:
        g = 1
    y = x.reshape(g, B // g, C, H, W)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B/g]
    y = y.repeat(g).reshape(B, 1, 1, 1).expand(B, 1, H, W)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        ch, R = config.channels, config.resolution
        self.from_rgb = EqualConv(3, ch[R], 1)
        res = [2**i for i in range(int(math.log2(R)), 2, -1)]  # R, R/2, ..., 8
        self.blocks = nn.ModuleList([ResBlock(ch[r], ch[r // 2]) for r in res])
        self.final_conv = EqualConv(ch[4] + 1, ch[4], 3)
        self.final_dense = EqualDense(ch[4] * 16, ch[4])
        self.out = EqualDense(ch[4], 1)

    def forward(self, image: Tensor) -> Tensor:
        """image [B, 3, R, R] -> logit [B] (real > 0)."""
        x = lrelu(self.from_rgb(image))
        for block in self.blocks:
            x = block(x)
        x = lrelu(self.final_conv(minibatch_std(x, self.config.mbstd_group)))
        x = lrelu(self.final_dense(x.flatten(1)))
        return self.out(x)[:, 0]


def create_discriminator(config: DiscriminatorConfig, seed: int = 0) -> Discriminator:
    """Weights ~ N(0, 1) drawn from `seed` (equalized lr), biases 0."""
    D = Discriminator(config)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in D.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
    return D
