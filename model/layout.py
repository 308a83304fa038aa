"""The StyleSpace (S) layout of a StyleGAN2 generator.

S is every modulation output (conv and toRGB styles), concatenated in execution
order: conv1@4, torgb@4, then per resolution conv0 (upsampling), conv1, torgb.
DeltaEdit's mapper sees the conv channels only, in order; toRGB styles stay those
of the source. Conv layers split into levels by the resolution they output:
coarse = 4-8 px, medium = 16-32 px, fine = 64 px and up.

Pure Python + numpy so the store can record and check a layout without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Kind = Literal["conv", "torgb"]
Level = Literal["coarse", "medium", "fine"]
LEVELS: tuple[Level, ...] = ("coarse", "medium", "fine")


@dataclass(frozen=True)
class SLayer:
    name: str  # rosinality module name: conv1, to_rgb1, convs.{k}, to_rgbs.{i}
    resolution: int  # spatial size the layer outputs
    kind: Kind
    w_index: int  # W+ row that feeds its modulation
    channels: int  # modulation output size = the layer's input channels
    offset: int  # start of its slice in the flat S vector

    @property
    def level(self) -> Level:
        if self.resolution <= 8:
            return "coarse"
        if self.resolution <= 32:
            return "medium"
        return "fine"


@dataclass(frozen=True)
class SLayout:
    layers: tuple[SLayer, ...]

    @classmethod
    def from_channels(cls, resolution: int, channels: dict[int, int]) -> SLayout:
        """Layout of a rosinality-style generator; `channels[r]` = feature maps at r px."""
        log = int(math.log2(resolution))
        if 2**log != resolution or resolution < 8:
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
        layers: list[SLayer] = []
        off = 0

        def add(name: str, res: int, kind: Kind, w: int, ch: int) -> None:
            nonlocal off
            layers.append(SLayer(name, res, kind, w, ch, off))
            off += ch

        add("conv1", 4, "conv", 0, channels[4])
        add("to_rgb1", 4, "torgb", 1, channels[4])
        for i, lg in enumerate(range(3, log + 1)):
            res = 2**lg
            add(f"convs.{2 * i}", res, "conv", 2 * i + 1, channels[res // 2])
            add(f"convs.{2 * i + 1}", res, "conv", 2 * i + 2, channels[res])
            add(f"to_rgbs.{i}", res, "torgb", 2 * i + 3, channels[res])
        return cls(tuple(layers))

    # --- sizes -------------------------------------------------------------
    @property
    def dim(self) -> int:
        """D: width of the flat S vector (all layers)."""
        return sum(layer.channels for layer in self.layers)

    @property
    def n_latent(self) -> int:
        """L: rows of W+."""
        return max(layer.w_index for layer in self.layers) + 1

    @property
    def conv_layers(self) -> tuple[SLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind == "conv")

    @property
    def conv_dim(self) -> int:
        """Dconv: width of the conv-only S the mapper sees (6048 for 1024 config-f)."""
        return sum(layer.channels for layer in self.conv_layers)

    def conv_index(self) -> np.ndarray:
        """Indices of the conv channels inside the flat S, in order: s_conv = s[:, idx]."""
        return np.concatenate(
            [np.arange(la.offset, la.offset + la.channels) for la in self.conv_layers]
        )

    def level_layers(self, level: Level) -> tuple[SLayer, ...]:
        return tuple(la for la in self.conv_layers if la.level == level)

    def level_slices(self) -> dict[Level, slice]:
        """Slices of the conv-only S that belong to each level (contiguous, in order)."""
        out: dict[Level, slice] = {}
        start = 0
        for level in LEVELS:
            width = sum(la.channels for la in self.level_layers(level))
            out[level] = slice(start, start + width)
            start += width
        return out

    def mapper_layout(self, channels: str = "conv") -> SLayout:
        """The layout the Delta Mapper sees: its `conv_layers` are the channels it maps.

        "conv" (DeltaEdit): this layout itself (toRGB styles stay those of the source).
        "all": every layer relabelled conv, so `conv_index()` / `conv_dim` /
        `level_slices()` cover all D channels in S order (toRGB layers join the level
        of their resolution; S order is resolution order, so levels stay contiguous).
        """
        if channels == "conv":
            return self
        if channels == "all":
            return SLayout(
                tuple(
                    SLayer(la.name, la.resolution, "conv", la.w_index, la.channels, la.offset)
                    for la in self.layers
                )
            )
        raise ValueError(f"channels must be 'conv' or 'all', got {channels!r}")

    # --- serialization (store attrs, checkpoint configs) -------------------
    def to_dict(self) -> dict:
        return {"layers": [asdict(la) for la in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> SLayout:
        return cls(tuple(SLayer(**la) for la in data["layers"]))
