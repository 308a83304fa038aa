"""Config sections shared by several stages: execution and model references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.config import require


@dataclass(frozen=True)
class ExecutionConfig:
    """`execution:` in params. Device auto = cuda when present, else cpu."""

    device: str = "auto"
    scheduler_address: str | None = None  # a dask.distributed scheduler; None = local
    workers: int = 1  # local scheduler threads/processes for encoder passes
    batch_size: int = 64
    # one writer per store (store.lease): a lease with no heartbeat for this long is stale
    lease_timeout: float = 10.0  # minutes
    break_lease: bool = False  # take over a live lease (`--break-lease`; for one run, not params)

    def validate(self) -> None:
        check_device(self.device)
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        ok = self.lease_timeout > 0
        require(ok, "lease_timeout", self.lease_timeout, "minutes > 0")


def check_device(device: str, key: str = "device") -> None:
    ok = device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
    require(ok, key, device, "auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GeneratorRef:
    """A generator: a checkpoint `path`, or a registered `config` built with `seed`."""

    path: str | None = None
    config: str = "tiny-64"
    seed: int = 0


@dataclass(frozen=True)
class ClipRef:
    """A CLIP model: open_clip `name` + local `weights`, or a registered tiny config."""

    name: str = "deltaedit-tiny"
    weights: str | None = None
    seed: int = 0
    trust_checkpoint: bool = False  # allow TorchScript files (weights_only=False)
    preprocessing: Literal["clip", "deltaedit"] = "deltaedit"


@dataclass(frozen=True)
class E4ERef:
    path: str | None = None
    config: str = "tiny"
    seed: int = 0
