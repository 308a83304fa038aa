"""Config sections shared by several stages: execution and model references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stages.config import require


@dataclass(frozen=True)
class ExecutionConfig:
    """`execution:` in params. Device auto = cuda when present, else cpu.

    storage_options: fsspec keyword arguments for every URL the pipeline reads or writes
    (s3fs: endpoint_url, key, secret, anon, profile, client_kwargs, ...); they reach the
    client and, inside every task, each Dask worker. Local paths ignore them.
    """

    device: str = "auto"
    scheduler_address: str | None = None  # a dask.distributed scheduler; None = local
    workers: int = 1  # local scheduler threads/processes for encoder passes
    batch_size: int = 64
    # one writer per store (store.lease): a lease with no heartbeat for this long is stale
    lease_timeout: float = 10.0  # minutes
    break_lease: bool = False  # take over a live lease (`--break-lease`; for one run, not params)
    storage_options: dict[str, Any] = field(default_factory=dict)
    connect_timeout_s: float = 10.0  # a scheduler that does not answer: error after this
    worker_timeout_s: float = 120.0  # no worker left for this long: the pass stops (resumable)

    def validate(self) -> None:
        check_device(self.device)
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        ok = self.lease_timeout > 0
        require(ok, "lease_timeout", self.lease_timeout, "minutes > 0")
        require(
            self.connect_timeout_s > 0, "connect_timeout_s", self.connect_timeout_s, "seconds > 0"
        )
        require(self.worker_timeout_s > 0, "worker_timeout_s", self.worker_timeout_s, "seconds > 0")
        for k in self.storage_options:
            require(isinstance(k, str) and bool(k), "storage_options", k, "string keys")

    def __hash__(self) -> int:  # storage_options is a dict: hash the rest
        return hash(
            (
                self.device,
                self.scheduler_address,
                self.workers,
                self.batch_size,
                self.lease_timeout,
                self.break_lease,
                self.connect_timeout_s,
                self.worker_timeout_s,
            )
        )


def check_device(device: str, key: str = "device") -> None:
    ok = device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
    require(ok, key, device, "auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def release_freed_memory(threshold: int = 1 << 18) -> bool:
    """Have glibc's malloc serve every block >= `threshold` bytes by mmap (given back to the
    OS when freed) and trim the heap above 2 x threshold, for this process.

    Without it glibc raises its mmap threshold to the largest block freed so far (up to
    32 MiB), so a pass whose 10-30 MB weight-, gradient- and shard-sized buffers come and go
    (train, edit) grows its heap past its memory budget. Called at the start of such a
    pass; a threshold set in the environment (MALLOC_MMAP_THRESHOLD_) is left as it is.
    True when set; False elsewhere (another libc: nothing changes)."""
    import ctypes
    import os
    import platform

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, 2 * int(threshold)) == 1


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
