"""Config sections shared by several stages: execution and model references."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from stages.config import require
from store.fs import RETRY_OPTION, RetryPolicy, with_retries


@dataclass(frozen=True)
class ExecutionConfig:
    """`execution:` in params. Device auto = cuda when present, else cpu.

    storage_options: fsspec keyword arguments for every URL the pipeline reads or writes
    (s3fs: endpoint_url, key, secret, anon, profile, client_kwargs, ...); they reach the
    client and, inside every task, each Dask worker. Local paths ignore them.
    storage_retries / storage_backoff_s: a storage request that fails transiently (a
    dropped connection, 503 SlowDown) is retried this many times, waiting backoff_s,
    2*backoff_s, ... (store.fs.RetryPolicy); `storage()` is storage_options carrying them.
    worker_resources: Dask worker resources every model block task requests on a cluster
    when the device is not cpu (e.g. {GPU: 1} with workers started `--resources GPU=1`).
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
    storage_retries: int = 5  # retries of a storage request that failed transiently
    storage_backoff_s: float = 0.2  # first wait before a retry (doubles each time)
    worker_resources: dict[str, float] = field(default_factory=dict)  # {} = none requested
    # compute dtype of the mapper (edit, train) and the generator (render, sample, relevance):
    # fp32, bf16 autocast, or auto = bf16 where bf16 matmuls are fast (fast_bf16), resolved
    # here once for the run (the resolved value is what runs and what provenance records);
    # stored values stay float32
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    compile: bool = False  # torch.compile the generator's synthesis (CUDA graphs on a GPU)

    def __post_init__(self) -> None:
        if self.precision == "auto":
            fast = fast_bf16(resolve_device(self.device))
            object.__setattr__(self, "precision", "bf16" if fast else "fp32")

    def validate(self) -> None:
        check_device(self.device)
        require(self.precision in PRECISIONS, "precision", self.precision, "fp32, bf16 or auto")
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
        require(
            RETRY_OPTION not in self.storage_options,
            "storage_options",
            RETRY_OPTION,
            "no key of deltaedit's own (set execution.storage_retries / storage_backoff_s)",
        )
        r = self.storage_retries
        ok = isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= 100
        require(ok, "storage_retries", r, "an integer 0..100")
        b = self.storage_backoff_s
        ok = isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 60
        require(ok, "storage_backoff_s", b, "seconds 0..60")
        for k, v in self.worker_resources.items():
            ok = isinstance(k, str) and bool(k) and isinstance(v, (int, float)) and v > 0
            ok = ok and not isinstance(v, bool)
            require(ok, "worker_resources", {k: v}, "{name: amount > 0}")

    def storage(self) -> dict[str, Any]:
        """storage_options with the retry policy inside (store.fs.RETRY_OPTION): what every
        store helper and block task takes, so the policy reaches each worker with them."""
        policy = RetryPolicy(self.storage_retries, float(self.storage_backoff_s))
        return with_retries(self.storage_options, policy)

    def model_resources(self) -> dict[str, float]:
        """The Dask resources a model block task requests: worker_resources unless the
        device is cpu (then any worker runs it)."""
        return {} if self.device == "cpu" else dict(self.worker_resources)

    def __hash__(self) -> int:  # the dict fields (storage_options, ...) are left out
        return hash(
            tuple(
                v for v in (getattr(self, f.name) for f in fields(self)) if not isinstance(v, dict)
            )
        )


PRECISIONS = ("fp32", "bf16")  # what runs; params may also say "auto" (ExecutionConfig)


def cpu_flags() -> set[str]:
    """The CPU feature flags of this host (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(device: str) -> bool:
    """Whether bf16 compute pays on `device`, as measured (BENCHMARKS.md): a CUDA GPU with
    bf16, or a CPU with AMX tiles (amx_bf16: the official-size mapper 3.96x fp32). A CPU
    with AVX512-BF16 alone is not (0.79x there), nor one without either."""
    if device.startswith("cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return "amx_bf16" in cpu_flags()


def autocast(device: str, precision: str) -> Any:
    """The context a model forward runs in: nothing for fp32; for bf16, torch.autocast to
    bfloat16 on the device's type (matmuls and convolutions in bf16, reductions in fp32).
    Callers convert outputs with `.float()` before storing them."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def to_device(x: Any, device: str) -> Any:
    """A host array or tensor on `device`: on CUDA through pinned memory with a
    non-blocking copy (the copy overlaps the work queued before it); elsewhere as is."""
    import torch

    t = torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x
    if not str(device).startswith("cuda"):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, else os.cpu_count())."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


DecodeThreads = int | Literal["auto"]


def check_decode_threads(value: Any) -> None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    require(ok, "decode_threads", value, "auto, 0 (= auto) or an integer >= 1")


def decode_threads_for(value: DecodeThreads, tasks: int = 1) -> int:
    """Decode threads of one block task: `value`, or for auto / 0 the cores of this host
    shared by the `tasks` block tasks running at once (at least 1)."""
    if value == "auto" or value == 0:
        return max(1, cores() // max(1, tasks))
    return int(value)


def decode_setting(value: DecodeThreads, execution: ExecutionConfig) -> DecodeThreads:
    """What a block task gets: on the local scheduler the threads sized here (cores shared
    by `execution.workers` tasks); on a cluster `value` as is, sized on each worker."""
    return value if execution.scheduler_address else decode_threads_for(value, execution.workers)


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
