"""Stage `ingest`: a folder of images (or webdataset tar shards) -> `<out>/manifest.zarr`.

Rows are the sorted sources (relative paths, or `shard.tar::member`). The folder is
listed first, the stores are created at their final shape, then blocks run:

1. scan (parallel, resumable): read each file, sha256 it, decode-verify it with a
   bounded decoder (header size check before decoding) into a scratch store
   `<out>/.ingest-scan.zarr`;
2. manifest (cheap, resumable): duplicates are found over all rows (same sha256 ->
   DUPLICATE on the later rows, earliest row stays OK), then the manifest blocks are
   written and the scratch store removed.

Every problem is a row status plus a `reason` string, never a crash or a lost row.
Source files are not copied: encoders read them again from `attrs.root`.

Stage `import-official` (also here): DeltaEdit's published latents
(`sspace_*_feat.npy`, `cspace_*_feat.npy`, `wspace_*_feat.npy`) -> a dataset of
manifest + clip.zarr + s.zarr.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np

from model.checkpoint import sha256_file
from stages import images
from stages.common import ExecutionConfig, GeneratorRef
from stages.config import require
from stages.execution import BlockReport, PassSummary, run_blocks
from store import ArraySpec, RowStore, Status, StoreError, store_url

SCAN_NAME = ".ingest-scan"


@dataclass(frozen=True)
class IngestConfig:
    """`ingest:` in params."""

    source: str = "data/raw"  # a folder of images / .tar shards, or one .tar shard
    out: str = "data/images"  # dataset folder (or fsspec URL): manifest.zarr goes there
    max_pixels: int = 40_000_000  # images whose header claims more are TOO_LARGE, undecoded
    rows_per_shard: int = 1024
    extensions: tuple[str, ...] = images.IMAGE_EXTENSIONS

    def validate(self) -> None:
        require(bool(self.source), "source", self.source, "a folder or .tar path")
        require(bool(self.out), "out", self.out, "a dataset folder or URL")
        require(self.max_pixels >= 1, "max_pixels", self.max_pixels, "an integer >= 1")
        require(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "an integer >= 1")
        require(
            len(self.extensions) > 0 and all(isinstance(e, str) and e for e in self.extensions),
            "extensions",
            self.extensions,
            "a non-empty list of file extensions such as [jpg, png]",
        )


class IngestError(ValueError):
    """Bad input for the whole pass (missing folder, nothing to ingest); one line."""


@dataclass
class IngestResult:
    manifest: str
    scan: PassSummary
    summary: PassSummary
    lines: list[str] = field(default_factory=list)


MANIFEST_ARRAYS = {
    "ids": ArraySpec((), "str"),
    "source": ArraySpec((), "str"),
    "sha256": ArraySpec((), "str"),
    "size": ArraySpec((2,), "int32"),  # (width, height) from the header; 0 when unknown
    "reason": ArraySpec((), "str"),  # why a row is not OK ('' when OK)
}
SCAN_ARRAYS = {
    "sha256": ArraySpec((), "str"),
    "size": ArraySpec((2,), "int32"),
    "reason": ArraySpec((), "str"),
}


def make_ids(sources: list[str]) -> list[str]:
    """Row ids: the source without its image extension (`a/b`, `shard/key`), unless two
    sources would share one; then the full source."""

    def stem(src: str) -> str:
        if images.TAR_SEP in src:
            tar, member = src.split(images.TAR_SEP, 1)
            tar = tar[:-4] if tar.lower().endswith(".tar") else tar
            src = f"{tar}/{member}"
        p = PurePosixPath(src)
        return str(p.with_suffix("")) if p.suffix else src

    stems = [stem(s) for s in sources]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [st if counts[st] == 1 else src for st, src in zip(stems, sources, strict=True)]


@dataclass(frozen=True)
class _ScanTask:
    """Probe one block of sources into the scratch store (picklable for distributed)."""

    url: str
    root: str
    sources: tuple[str, ...]
    refused: tuple[str, ...]
    max_pixels: int

    def __call__(self, block: int) -> BlockReport:
        start = time.perf_counter()
        scan = RowStore.open(self.url)
        rows = scan.block_rows(block)
        n = rows.stop - rows.start
        sha = np.full(n, "", dtype=object)
        size = np.zeros((n, 2), dtype=np.int32)
        reason = np.full(n, "", dtype=object)
        status = np.zeros(n, dtype=np.uint8)
        with images.SourceReader(self.root) as reader:
            for k, row in enumerate(range(rows.start, rows.stop)):
                src = self.sources[row]
                if self.refused[row]:
                    status[k], reason[k] = Status.UNREADABLE, self.refused[row]
                    continue
                try:
                    data = reader.read(src)
                except (OSError, ValueError) as exc:
                    status[k], reason[k] = Status.UNREADABLE, f"cannot read: {exc}"
                    continue
                got = images.probe(data, self.max_pixels)
                status[k] = Status[got.outcome]
                sha[k], size[k], reason[k] = got.sha256, got.size, got.reason
        scan.write_block(
            block, {"sha256": sha.astype(str), "size": size, "reason": reason.astype(str)}, status
        )
        return _report(block, status, reason, self.sources[rows], time.perf_counter() - start)


def _report(
    block: int, status: np.ndarray, reason: np.ndarray, sources, seconds: float
) -> BlockReport:
    counts: dict[str, int] = {}
    for code in status.tolist():
        name = Status(code).name
        counts[name] = counts.get(name, 0) + 1
    lines = tuple(
        f"{Status(int(st)).name}: {src} ({why})"
        for st, why, src in zip(status, reason, sources, strict=True)
        if int(st) != Status.OK
    )
    return BlockReport(block, len(status), counts, lines, seconds)


def _fingerprint(cfg: IngestConfig, sources: list[str], refused: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"max_pixels": cfg.max_pixels, "stage": "ingest"}).encode())
    for s, r in zip(sources, refused, strict=True):
        h.update(s.encode() + b"\0" + r.encode() + b"\n")
    return h.hexdigest()


def find_duplicates(sha: np.ndarray, status: np.ndarray) -> np.ndarray:
    """For each row, the earlier OK row with the same sha256, or -1 (rows in order)."""
    first: dict[str, int] = {}
    dup_of = np.full(len(sha), -1, dtype=np.int64)
    for row in np.flatnonzero(status == Status.OK).tolist():
        key = str(sha[row])
        if key in first:
            dup_of[row] = first[key]
        else:
            first[key] = row
    return dup_of


def _remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def run_ingest(
    cfg: IngestConfig,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> IngestResult:
    """List `cfg.source`, scan every file, write `<out>/manifest.zarr`; resumable."""
    src = Path(cfg.source)
    if not src.exists():
        raise IngestError(f"ingest.source {cfg.source}: no such folder or file")
    try:
        entries = images.list_sources(src, cfg.extensions)
    except (ValueError, OSError) as exc:
        raise IngestError(f"ingest.source {cfg.source}: {exc}") from None
    if not entries:
        raise IngestError(
            f"ingest.source {cfg.source}: no images found (extensions {', '.join(cfg.extensions)})"
        )
    sources = [e.source for e in entries]
    refused = [e.refused for e in entries]
    root = str(images.source_root(src))
    n = len(sources)
    fp = _fingerprint(cfg, sources, refused)
    attrs = {
        "stage": "ingest",
        "fingerprint": fp,
        "root": root,
        "max_pixels": cfg.max_pixels,
    }
    mode = "overwrite" if overwrite else "resume"
    manifest_url = store_url(cfg.out, "manifest")
    scan_url = store_url(cfg.out, SCAN_NAME)
    manifest = RowStore.create(
        manifest_url, n, cfg.rows_per_shard, MANIFEST_ARRAYS, attrs, mode=mode
    )
    scan_summary = PassSummary("ingest scan", manifest.n_blocks)
    pending = manifest.pending_blocks()
    if pending:
        scan = RowStore.create(scan_url, n, cfg.rows_per_shard, SCAN_ARRAYS, attrs, mode=mode)
        task = _ScanTask(scan_url, root, tuple(sources), tuple(refused), cfg.max_pixels)
        scan_summary = run_blocks(
            task, scan.pending_blocks(), execution, "ingest", scan.n_blocks, progress
        )
        scan.require_complete()
        sha = scan.read("sha256")
        status = scan.status()
        dup_of = find_duplicates(sha, status)
        ids = np.array(make_ids(sources), dtype=object)
        src_arr = np.array(sources, dtype=object)
        for b in pending:
            rows = manifest.block_rows(b)
            st = status[rows].copy()
            reason = scan.read("reason", rows).astype(object)
            for k, d in enumerate(dup_of[rows].tolist()):
                if d >= 0:
                    st[k] = Status.DUPLICATE
                    reason[k] = f"same content as {sources[d]}"
            manifest.write_block(
                b,
                {
                    "ids": ids[rows].astype(str),
                    "source": src_arr[rows].astype(str),
                    "sha256": sha[rows],
                    "size": scan.read("size", rows),
                    "reason": reason.astype(str),
                },
                st,
            )
    _remove(scan_url)
    summary = manifest_summary(manifest, scan_summary.seconds)
    return IngestResult(manifest_url, scan_summary, summary, summary.details())


def manifest_summary(manifest: RowStore, seconds: float = 0.0) -> PassSummary:
    """The whole manifest's row counts and problem lines (also after a resumed run)."""
    summary = PassSummary("ingest", manifest.n_blocks)
    status = manifest.status()
    reason = manifest.read("reason")
    source = manifest.read("source")
    for b in range(manifest.n_blocks):
        rows = manifest.block_rows(b)
        summary.add(_report(b, status[rows], reason[rows], source[rows], 0.0))
    summary.blocks_run = manifest.n_blocks
    summary.seconds = seconds
    return summary


def open_manifest(dataset: str) -> RowStore:
    """`<dataset>/manifest.zarr`, complete (an interrupted ingest is an error naming the fix)."""
    return RowStore.open(store_url(dataset, "manifest"), require_complete=True)


def file_fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


_ = (GeneratorRef, StoreError)  # used by import-official below
