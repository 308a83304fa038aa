"""The block runner every encoder pass uses.

A pass is a picklable callable `task(block) -> BlockReport` that reads its inputs,
computes one shard-aligned block of rows and writes it (data, status, then the
done mark) itself, so a worker never ships arrays back. `run_blocks` schedules one
Dask task per pending block:

- local (default): Dask's threaded scheduler with `execution.workers` threads;
- `execution.scheduler_address`: a `dask.distributed` Client on that scheduler. A scheduler
  that does not answer within `execution.connect_timeout_s` is a one-line ClusterError; so
  is a pass left without any worker for `execution.worker_timeout_s` (blocks already
  written stay done: a rerun resumes). A worker that dies mid-task has its task rerun
  elsewhere by the scheduler; a task is idempotent (a block is rewritten whole).

Models are loaded once per worker process through `cached(key, loader)`, keyed
by a hashable model reference (frozen dataclass + device). A tqdm bar counts
blocks; `PassSummary.line()` is the summary printed at the end of the pass.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from tqdm import tqdm

from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef
from store import Status
from store.errors import StoreError

T = TypeVar("T")
R = TypeVar("R")
MAX_REASON_LINES = 20  # per-row problem lines kept for the summary


class ClusterError(StoreError):
    """The cluster cannot run the pass (no scheduler, no workers, a worker lacking a
    package or a file); one line. A StoreError, so every command prints it as one line."""


@dataclass(frozen=True)
class BlockReport:
    """What one block did: rows, rows per status name, a few 'source: reason' lines."""

    block: int
    rows: int
    counts: dict[str, int]
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0


class BlockTask(Protocol):
    def __call__(self, block: int) -> BlockReport: ...


@runtime_checkable
class StagedTask(Protocol):
    """A block task in three steps, which the local runner overlaps across blocks:
    read(block) -> inputs (store reads), compute(block, inputs) -> outputs (the model),
    write(block, outputs) -> BlockReport (store writes). `Staged` gives it __call__."""

    def read(self, block: int) -> Any: ...
    def compute(self, block: int, data: Any) -> Any: ...
    def write(self, block: int, result: Any) -> BlockReport: ...


class Staged:
    """Mixin: __call__(block) = write(compute(read(block))), one block alone (a Dask task)."""

    def __call__(self, block: int) -> BlockReport:
        task: Any = self
        return task.write(block, task.compute(block, task.read(block)))


def run_staged(
    read: Callable[[int], Any],
    compute: Callable[[int, Any], Any],
    write: Callable[[int, Any], BlockReport],
    blocks: Sequence[int],
    on_report: Callable[[BlockReport], None],
) -> None:
    """Blocks in order, the next block read and the previous one written (two threads)
    while the caller's thread computes one: at most three blocks in memory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        reading = pool.submit(read, blocks[0]) if len(blocks) else None
        writing = None
        for k, b in enumerate(blocks):
            data = reading.result()  # type: ignore[union-attr]
            reading = pool.submit(read, blocks[k + 1]) if k + 1 < len(blocks) else None
            result = compute(b, data)
            if writing is not None:
                on_report(writing.result())
            writing = pool.submit(write, b, result)
        if writing is not None:
            on_report(writing.result())


@dataclass
class PassSummary:
    name: str
    blocks_total: int
    blocks_run: int = 0
    rows: int = 0
    counts: Counter = field(default_factory=Counter)
    reasons: list[str] = field(default_factory=list)
    n_reasons: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # pass-level remarks (restarted outputs)

    def add(self, report: BlockReport) -> None:
        self.blocks_run += 1
        self.rows += report.rows
        self.counts.update(report.counts)
        self.n_reasons += len(report.reasons)
        room = MAX_REASON_LINES - len(self.reasons)
        if room > 0:
            self.reasons.extend(report.reasons[:room])

    @property
    def ok(self) -> int:
        return self.counts.get("OK", 0)

    def line(self) -> str:
        """One line: rows ok / not ok by reason / throughput, plus resumed blocks."""
        bad = {k: v for k, v in sorted(self.counts.items()) if k != "OK" and v}
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        text = f"{self.name}: {self.rows} rows in {self.blocks_run} blocks, ok {self.ok}"
        if bad:
            text += ", not ok " + ", ".join(f"{k} {v}" for k, v in bad.items())
        text += f"; {rate:.1f} rows/s ({self.seconds:.1f} s)"
        skipped = self.blocks_total - self.blocks_run
        if skipped:
            text += f"; {skipped} blocks already done"
        return text

    def details(self) -> list[str]:
        """The per-row problem lines (at most MAX_REASON_LINES, then a count)."""
        lines = [*self.notes, *self.reasons]
        if self.n_reasons > len(self.reasons):
            lines.append(f"... and {self.n_reasons - len(self.reasons)} more")
        return lines


# --- non-finite model outputs ------------------------------------------------------------------


def counts_of(status: np.ndarray) -> dict[str, int]:
    """{status name: rows} of one block's status (what a BlockReport counts)."""
    names, counts = np.unique(status, return_counts=True)
    return {Status(int(v)).name: int(c) for v, c in zip(names, counts, strict=True)}


def non_finite_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """[n] bool: rows holding a NaN or Inf in any of `arrays` (each [n, ...])."""
    bad = np.zeros(len(arrays[0]) if len(arrays) else 0, dtype=bool)
    for a in arrays:
        a = np.asarray(a)
        bad |= ~np.isfinite(a).all(axis=tuple(range(1, a.ndim)))
    return bad


def mark_non_finite(status: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Rows OK in `status` whose outputs hold NaN or Inf become NON_FINITE and their values
    zeros (both in place): a model's NaN is a row status, never stored data. Returns them."""
    idx = np.flatnonzero(non_finite_rows(arrays) & (status == Status.OK))
    if idx.size:
        status[idx] = Status.NON_FINITE
        for a in arrays:
            a[idx] = 0
    return idx


# --- per-process model cache -----------------------------------------------------------------

_MODELS: dict[Hashable, Any] = {}
_MODELS_LOCK = threading.Lock()


def cached(key: Hashable, loader: Callable[[], T]) -> T:
    """The object for `key`, built once per process (threads share it)."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = loader()
        return _MODELS[key]


def clear_cache() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()


# --- the runner --------------------------------------------------------------------------------


def run_blocks(
    task: BlockTask,
    blocks: Sequence[int],
    execution: ExecutionConfig,
    name: str,
    blocks_total: int | None = None,
    progress: bool = True,
    resources: Mapping[str, float] | None = None,
) -> PassSummary:
    """Run `task` once per block in `blocks` (the pending ones); return the summary.

    A failing task stops the pass with its exception; blocks already written stay
    done, so a rerun resumes from them. `resources` (a model pass passes
    `execution.model_resources()`): on a cluster every task requests these Dask worker
    resources, so it runs only on workers started with them (`--resources GPU=1`).
    """
    summary = PassSummary(name, blocks_total if blocks_total is not None else len(blocks))
    start = time.perf_counter()
    bar = tqdm(total=len(blocks), desc=name, unit="block", disable=not progress, leave=False)
    try:
        if not blocks:
            pass
        elif execution.scheduler_address:
            _run_distributed(task, blocks, execution, name, summary, bar, dict(resources or {}))
        else:
            _run_local(task, blocks, execution.workers, name, summary, bar)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _run_local(
    task: BlockTask,
    blocks: Sequence[int],
    workers: int,
    name: str,
    summary: PassSummary,
    bar: tqdm,
) -> None:
    import dask
    from dask.callbacks import Callback

    if workers == 1 and isinstance(task, StagedTask):  # one block at a time: overlap its steps

        def add(report: BlockReport) -> None:
            summary.add(report)
            bar.update(1)

        run_staged(task.read, task.compute, task.write, blocks, add)
        return
    lock = threading.Lock()

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if isinstance(result, BlockReport):
            with lock:
                summary.add(result)
                bar.update(1)

    tasks = [dask.delayed(task, pure=False)(b, dask_key_name=f"{name}-block-{b}") for b in blocks]
    with Callback(posttask=posttask):
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def connect(execution: ExecutionConfig):
    """A distributed Client on `execution.scheduler_address`, or a one-line ClusterError."""
    address = execution.scheduler_address
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError(
            f"execution.scheduler_address {address}: dask.distributed is not installed; "
            f"pip install 'deltaedit[distributed]'"
        ) from None
    try:
        return Client(address, set_as_default=False, timeout=execution.connect_timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(
            f"execution.scheduler_address {address}: no scheduler answered within "
            f"{execution.connect_timeout_s:g} s ({type(exc).__name__}); start one "
            f"(`dask scheduler`) or fix the address"
        ) from None


def _run_distributed(
    task: BlockTask,
    blocks: Sequence[int],
    execution: ExecutionConfig,
    name: str,
    summary: PassSummary,
    bar: tqdm,
    resources: dict[str, float],
) -> None:
    from distributed import as_completed

    with connect(execution) as client:
        futures = client.map(
            _OnWorker(task),
            list(blocks),
            pure=False,
            key=[f"{name}-block-{b}-{time.time_ns()}" for b in blocks],
            resources=resources or None,
        )
        done = 0
        finished = as_completed(futures, loop=client.loop)
        alone_since: float | None = None
        next_check = time.monotonic()
        try:
            while not finished.is_empty():
                progressed = False
                for future in finished.next_batch(block=False) if finished.has_ready() else ():
                    try:
                        report = future.result(timeout=1.0)
                    except TimeoutError:
                        # its report lived on a worker that died: the scheduler reruns it
                        finished.add(future)
                        continue
                    summary.add(report)
                    bar.update(1)
                    done += 1
                    progressed = True
                if progressed:
                    alone_since = None
                    continue
                time.sleep(0.02)
                now = time.monotonic()
                if now < next_check:
                    continue
                next_check = now + min(1.0, execution.worker_timeout_s / 4)
                if _can_run(client, resources):
                    alone_since = None
                    continue
                alone_since = alone_since or now
                if now - alone_since >= execution.worker_timeout_s:
                    which = f"with resources {resources}" if resources else "connected"
                    start = "start workers"
                    if resources:
                        given = " ".join(f"{k}={v:g}" for k, v in resources.items())
                        start = f"start workers with `--resources {given}`"
                    raise ClusterError(
                        f"{name}: no worker {which} to {execution.scheduler_address} for "
                        f"{execution.worker_timeout_s:g} s, {len(futures) - done} of "
                        f"{len(futures)} blocks not done; {start} and rerun (it resumes; "
                        f"execution.worker_timeout_s sets the wait, execution.worker_resources "
                        f"what a model task asks for)"
                    )
        finally:
            if done < len(futures):
                client.cancel(futures)


def _can_run(client: Any, resources: dict[str, float]) -> bool:
    """Whether a connected worker can run a task asking for `resources`."""
    if not resources:
        return bool(client.nthreads())
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(
        all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items())
        for w in workers.values()
    )


@dataclass(frozen=True)
class _OnWorker:
    """A block task run on a Dask worker: an ImportError, a missing file or a model file that
    does not load there (a worker without a package or a model file the client has) is one
    line naming the worker and the file."""

    task: BlockTask

    def __call__(self, block: int) -> BlockReport:
        try:
            return self.task(block)
        except Exception as exc:
            from model.checkpoint import CheckpointError  # what a loader says of a bad path

            if not isinstance(exc, (ImportError, FileNotFoundError, CheckpointError)):
                raise
            from distributed import get_worker

            try:
                where = get_worker().address
            except ValueError:
                where = "?"
            raise ClusterError(
                f"block {block} on worker {where}: {type(exc).__name__}: {exc} (install the "
                f"package / copy the file there, or put it on storage every worker reads)"
            ) from None


# --- overlap decoding with the model -------------------------------------------------------


def prefetch_map(
    load: Callable[[Any], T], items: Sequence[Any], threads: int, ahead: int
) -> Iterator[T]:
    """`load(item)` for each item, in order, computed by `threads` threads up to `ahead`
    items in front of the consumer (bounded memory), so decoding overlaps the model."""
    if threads <= 0:
        for item in items:
            yield load(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(load, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.submit(load, nxt))
            yield result


_END = object()


# --- model references -> models, once per worker process ------------------------------------


def for_workers(ref: T) -> T:
    """A model reference whose local file paths (`path`, `weights`) are absolute: what a
    worker started in another folder needs. URLs and unset paths are left as they are."""
    import dataclasses

    from store.fs import absolute

    changes = {
        f: absolute(getattr(ref, f))
        for f in ("path", "weights")
        if isinstance(getattr(ref, f, None), str) and getattr(ref, f)
    }
    return dataclasses.replace(ref, **changes) if changes else ref  # type: ignore[type-var]


def load_generator_ref(ref: GeneratorRef, device: str):
    """The generator a `generator:` params section names, cached per (ref, device)."""

    def load():
        from model.stylegan2 import create_generator, load_generator

        if ref.path:
            g = load_generator(ref.path, device=device)
        else:
            g = create_generator(ref.config, seed=ref.seed).to(device)
        return g.eval().requires_grad_(False)

    ref = for_workers(ref)  # one cache entry per file, wherever the process started
    return cached(("generator", ref, device), load)


class CompiledGenerator:
    """A generator whose `synthesize` runs through torch.compile (on CUDA in
    'reduce-overhead' mode: CUDA graphs; elsewhere the default mode). Guarded: a compile
    that fails (no compiler, an unsupported op) falls back to eager synthesis for good,
    with one warning. Everything else is the wrapped generator's."""

    def __init__(self, generator: Any, device: str) -> None:
        import torch

        self.generator = generator
        mode = "reduce-overhead" if str(device).startswith("cuda") else "default"
        self._compiled = torch.compile(generator.synthesize, mode=mode, dynamic=False)
        self._eager = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def synthesize(self, s: Any, noise_mode: str = "const") -> Any:
        if not self._eager:
            try:
                return self._compiled(s, noise_mode=noise_mode).clone()  # graphs reuse outputs
            except Exception as exc:  # noqa: BLE001 - any compile failure: eager from now on
                import warnings

                warnings.warn(
                    f"execution.compile: torch.compile failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); synthesis runs eager",
                    stacklevel=2,
                )
                self._eager = True
        return self.generator.synthesize(s, noise_mode=noise_mode)


def compiled_generator(generator: Any, device: str) -> CompiledGenerator:
    """`generator` behind torch.compile (execution.compile), once per process and model."""
    return cached(("compiled", id(generator), device), lambda: CompiledGenerator(generator, device))


def load_clip_ref(ref: ClipRef, device: str):
    """The CLIP model a `clip:` params section names, cached per (ref, device)."""

    def load():
        from model.clip import load_clip

        return load_clip(
            ref.name,
            weights=ref.weights,
            device=device,
            trust_checkpoint=ref.trust_checkpoint,
            seed=ref.seed,
        )

    ref = for_workers(ref)  # one cache entry per file, wherever the process started
    return cached(("clip", ref, device), load)


def load_e4e_ref(ref: E4ERef, device: str):
    """The e4e encoder an `e4e:` params section names, cached per (ref, device)."""

    def load():
        from model.e4e import create_e4e, load_e4e

        if ref.path:
            e = load_e4e(ref.path, device=device)
        else:
            e = create_e4e(ref.config, seed=ref.seed).to(device)
        return e.eval().requires_grad_(False)

    ref = for_workers(ref)  # one cache entry per file, wherever the process started
    return cached(("e4e", ref, device), load)


# --- stage outputs ------------------------------------------------------------------------------


def create_output(
    url: str,
    n_rows: int,
    rows_per_shard: int,
    arrays: dict,
    attrs: dict,
    overwrite: bool,
    restart_on_change: bool,
    notes: list[str],
    storage_options: dict | None = None,
):
    """A stage's output store: resumed when it was made from the same inputs and models;
    otherwise an error (FingerprintMismatch / StoreError naming the difference), or, with
    `restart_on_change` (what `dvc repro` wants after a params change), started over with a
    note. `overwrite` always starts over. Never replaces something that is not a store."""
    from store import FingerprintMismatch, RowStore, StoreError

    mode = "overwrite" if overwrite else "resume"
    try:
        return RowStore.create(url, n_rows, rows_per_shard, arrays, attrs, mode, storage_options)
    except (FingerprintMismatch, StoreError) as exc:
        if not restart_on_change or type(exc) not in (FingerprintMismatch, StoreError):
            raise
        notes.append(f"{url}: made from other inputs or models, started over ({exc})")
        return RowStore.create(
            url, n_rows, rows_per_shard, arrays, attrs, "overwrite", storage_options
        )


def leased(
    urls: Sequence[str], pass_name: str, execution: ExecutionConfig, run: Callable[[], R]
) -> R:
    """run() while holding the write leases of `urls` (hold_outputs); takeover notes lead
    the result's summary notes (run() returns an object with a PassSummary `.summary`)."""
    notes: list[str] = []
    with hold_outputs(urls, pass_name, execution, notes.append):
        result = run()
    result.summary.notes[:0] = notes
    return result


@contextlib.contextmanager
def hold_outputs(
    urls: Sequence[str],
    pass_name: str,
    execution: ExecutionConfig,
    log: Callable[[str], None],
) -> Iterator[None]:
    """Hold the write lease (store.lease) of every output store of a pass while it runs: a
    second pass on one of them refuses, naming this one; `log` gets takeover notes. First
    the one reachability check of the pass's outputs (the stages do not repeat it)."""
    from store import hold_lease
    from store.fs import check_reachable

    for url in urls:  # one line for a dead endpoint or refused credentials, before any work
        check_reachable(url, execution.storage())
    with contextlib.ExitStack() as stack:
        for url in urls:
            stack.enter_context(
                hold_lease(
                    url,
                    pass_name,
                    break_lease=execution.break_lease,
                    storage_options=execution.storage(),
                    timeout_minutes=execution.lease_timeout,
                    log=log,
                )
            )
        yield
