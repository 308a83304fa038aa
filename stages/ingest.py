"""Stage `ingest`: a folder of images (or webdataset tar shards) -> `<out>/manifest.zarr`.

Rows are the sorted sources (relative paths, or `shard.tar::member`); ids are the
source without its extension, so they depend on the path only (stable for unchanged
files). The folder is listed first, then blocks run:

1. scan (parallel, resumable): read each file and sha256 it; bytes an earlier manifest
   (the previous one of this dataset, or a `--reuse` one) already probed keep that
   outcome, others are decode-verified with a bounded decoder (header size check before
   decoding), into a scratch store `<out>/.ingest-scan.zarr`;
2. manifest (cheap): duplicates are found over all rows (same sha256 -> DUPLICATE on the
   later rows, earliest row stays OK); unless the rows equal the present manifest's, the
   new manifest is written to `manifest.zarr.next` and swapped in (store.update), and the
   scratch store is removed.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from model.checkpoint import sha256_file
from stages import images
from stages.common import (
    DecodeThreads,
    ExecutionConfig,
    GeneratorRef,
    check_decode_threads,
    decode_setting,
    decode_threads_for,
)
from stages.config import require
from stages.execution import (
    BlockReport,
    PassSummary,
    counts_of,
    create_output,
    leased,
    mark_non_finite,
    prefetch_map,
    run_blocks,
)
from stages.incremental import UpdateCounts
from store import ArraySpec, RowStore, Status, StoreError, store_url
from store import fs as storefs
from store import update as up

SCAN_NAME = ".ingest-scan"


@dataclass(frozen=True)
class IngestConfig:
    """`ingest:` in params."""

    source: str = "data/raw"  # a folder of images / .tar shards, or one .tar shard
    out: str = "data/images"  # dataset folder (or fsspec URL): manifest.zarr goes there
    max_pixels: int = 40_000_000  # images whose header claims more are TOO_LARGE, undecoded
    rows_per_shard: int = 1024
    extensions: tuple[str, ...] = images.IMAGE_EXTENSIONS
    decode_threads: DecodeThreads = "auto"  # decoding threads per block task; auto/0: cores/workers

    def validate(self) -> None:
        require(bool(self.source), "source", self.source, "a folder or .tar path")
        check_decode_threads(self.decode_threads)
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
    counts: UpdateCounts | None = None  # rows reused / computed (probed) / dropped


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
    threads: DecodeThreads
    known: dict[str, tuple[int, str, tuple[int, int]]]  # sha256 -> (status, reason, size)
    storage_options: dict = field(default_factory=dict)

    def __call__(self, block: int) -> BlockReport:
        start = time.perf_counter()
        scan = RowStore.open(self.url, storage_options=self.storage_options)
        rows = scan.block_rows(block)
        n = rows.stop - rows.start
        sha = np.full(n, "", dtype=object)
        size = np.zeros((n, 2), dtype=np.int32)
        reason = np.full(n, "", dtype=object)
        status = np.zeros(n, dtype=np.uint8)
        with images.SourceReader(self.root) as reader:

            def check(row: int) -> tuple[int, str, images.Probe]:
                """(status, reason, probe) of one source; runs in the decode threads."""
                src = self.sources[row]
                if self.refused[row]:
                    return Status.UNREADABLE, self.refused[row], images.Probe("UNREADABLE")
                try:
                    data = reader.read(src)
                except (OSError, ValueError) as exc:
                    return Status.UNREADABLE, f"cannot read: {exc}", images.Probe("UNREADABLE")
                sha = hashlib.sha256(data).hexdigest()
                if sha in self.known:  # these bytes were probed by an earlier pass
                    st, why, size = self.known[sha]
                    return st, why, images.Probe(Status(st).name, tuple(size), sha, why)
                got = images.probe(data, self.max_pixels)
                return Status[got.outcome], got.reason, got

            todo = range(rows.start, rows.stop)
            threads = decode_threads_for(self.threads)
            for k, (st, why, got) in enumerate(
                prefetch_map(check, todo, threads, ahead=4 * threads)
            ):
                status[k], reason[k] = st, why
                sha[k], size[k] = got.sha256, got.size
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


def _scan_fingerprint(cfg: IngestConfig, sources: list[str], refused: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"max_pixels": cfg.max_pixels, "stage": "ingest"}).encode())
    for s, r in zip(sources, refused, strict=True):
        h.update(s.encode() + b"\0" + r.encode() + b"\n")
    return h.hexdigest()


def _content_fingerprint(cfg: IngestConfig, rows: dict[str, np.ndarray]) -> str:
    """The manifest's fingerprint: its producer settings and every row's source, bytes
    (sha256) and outcome, so a file changed under the same name changes it."""
    return up.rows_checksum({"max_pixels": np.array([cfg.max_pixels]), **rows})


def known_probes(stores: list[RowStore]) -> dict[str, tuple[int, str, tuple[int, int]]]:
    """sha256 -> (status, reason, size) of the probed rows of earlier manifests (done blocks;
    a DUPLICATE row was probed OK). What ingest reuses instead of decoding again."""
    known: dict[str, tuple[int, str, tuple[int, int]]] = {}
    for rs in stores:
        status = rs.status()
        done = np.flatnonzero(status != Status.PENDING).tolist()
        if not done:
            continue
        sha, reason, size = up.as_str(rs.read("sha256")), rs.read("reason"), rs.read("size")
        for r in done:
            if not sha[r]:  # never read: nothing known about its bytes
                continue
            st, why = int(status[r]), str(reason[r])
            if st == Status.DUPLICATE:  # only OK rows are marked duplicates
                st, why = int(Status.OK), ""
            known.setdefault(str(sha[r]), (st, why, (int(size[r, 0]), int(size[r, 1]))))
    return known


def _manifest_difference(old: RowStore, cfg: IngestConfig) -> str | None:
    if old.attrs.get("stage") != "ingest" or "sha256" not in old.specs:
        return f"{old.url} is not a manifest written by ingest (stage {old.attrs.get('stage')!r})"
    if old.attrs.get("max_pixels") != cfg.max_pixels:
        return (
            f"{old.url} was probed with max_pixels {old.attrs.get('max_pixels')!r}, this pass "
            f"uses {cfg.max_pixels} (manifest fingerprint {old.fingerprint!r})"
        )
    return None


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


def run_ingest(
    cfg: IngestConfig,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
    reuse: Sequence[str] = (),
) -> IngestResult:
    """List `cfg.source`, scan every file, write `<out>/manifest.zarr`; resumable.

    Every file is read and hashed; a file whose bytes an earlier manifest (the previous one
    of this dataset, or a `reuse` one) already probed is not decoded again. The new
    manifest is written beside the old one and swapped in (store.update).
    """
    return leased(
        [store_url(cfg.out, "manifest")],
        "ingest",
        execution,
        lambda: _ingest(cfg, execution, overwrite, progress, restart_on_change, reuse),
    )


def _ingest(
    cfg: IngestConfig,
    execution: ExecutionConfig,
    overwrite: bool,
    progress: bool,
    restart_on_change: bool,
    reuse: Sequence[str],
) -> IngestResult:
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
    start = time.perf_counter()
    sources = [e.source for e in entries]
    refused = [e.refused for e in entries]
    root = str(images.source_root(src))
    n = len(sources)
    manifest_url = store_url(cfg.out, "manifest")
    scan_url = store_url(cfg.out, SCAN_NAME)
    so = execution.storage()
    reuse_stores = [up.open_reuse(u, "manifest", so) for u in reuse]
    for rs in reuse_stores:
        why = _manifest_difference(rs, cfg)
        if why:
            raise up.ReuseRefused(f"--reuse {why}; nothing was written")
    notes: list[str] = []
    up.recover(manifest_url, so)
    if overwrite:
        for u in (manifest_url, up.next_url(manifest_url), scan_url):
            up.remove(u, so)
    old = RowStore.open(manifest_url, storage_options=so) if up.exists(manifest_url, so) else None
    if old is not None:
        why = _manifest_difference(old, cfg)
        if why and not restart_on_change:
            raise StoreError(
                f"{manifest_url}: cannot update it: {why}; rerun deltaedit ingest with "
                f"--overwrite (or --restart-on-change) to start over"
            )
        if why:
            notes.append(f"{manifest_url}: made with other settings, started over ({why})")
    previous = [old] if old is not None and not _manifest_difference(old, cfg) else []
    known = known_probes(previous + reuse_stores)
    scan_attrs = {
        "stage": "ingest",
        "fingerprint": _scan_fingerprint(cfg, sources, refused),
        "root": root,
        "max_pixels": cfg.max_pixels,
    }
    scan = create_output(
        scan_url, n, cfg.rows_per_shard, SCAN_ARRAYS, scan_attrs, False, True, [], so
    )
    task = _ScanTask(
        storefs.absolute(scan_url),
        root,
        tuple(sources),
        tuple(refused),
        cfg.max_pixels,
        decode_setting(cfg.decode_threads, execution),
        known,
        dict(so),
    )
    scan_summary = run_blocks(
        task, scan.pending_blocks(), execution, "ingest", scan.n_blocks, progress
    )
    scan.require_complete()
    sha = up.as_str(scan.read("sha256"))
    status = scan.status()
    reason = up.as_str(scan.read("reason")).astype(object)
    dup_of = find_duplicates(sha, status)
    for r in np.flatnonzero(dup_of >= 0).tolist():
        status[r] = Status.DUPLICATE
        reason[r] = f"same content as {sources[dup_of[r]]}"
    rows = {
        "ids": np.array(make_ids(sources), dtype=str),
        "source": np.array(sources, dtype=str),
        "sha256": sha,
        "size": scan.read("size"),
        "reason": np.array([str(x) for x in reason], dtype=str),
    }
    attrs = {
        "stage": "ingest",
        "fingerprint": _content_fingerprint(cfg, {**rows, "status": status}),
        "root": root,
        "max_pixels": cfg.max_pixels,
        up.CHECKSUM: up.checksum_attr(
            {"ids": rows["ids"], "source": rows["source"], "sha256": sha, "status": status}
        ),
    }
    probed = np.array([bool(h) and h not in known for h in sha.tolist()])
    counts = UpdateCounts(
        int((~probed & (sha != "")).sum()),
        int(probed.sum() + (sha == "").sum()),
        up.dropped_rows(previous, sha) if previous else (old.n_rows if old is not None else 0),
    )
    if old is not None and old.attrs == attrs and old.is_complete():
        manifest = old  # the folder did not change: nothing to write
        up.remove(up.next_url(manifest_url), so)
    else:
        n_url = up.next_url(manifest_url)
        nxt = create_output(
            n_url, n, cfg.rows_per_shard, MANIFEST_ARRAYS, attrs, False, True, [], so
        )
        for b in nxt.pending_blocks():
            sl = nxt.block_rows(b)
            nxt.write_block(b, {k: v[sl] for k, v in rows.items()}, status[sl])
        nxt.require_complete()
        up.swap_in(manifest_url, n_url, so)
        manifest = RowStore.open(manifest_url, storage_options=so)
    up.remove(scan_url, so)
    summary = manifest_summary(manifest, time.perf_counter() - start)
    summary.notes.extend(notes)
    return IngestResult(manifest_url, scan_summary, summary, summary.details(), counts)


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


def open_manifest(dataset: str, storage_options: dict | None = None) -> RowStore:
    """`<dataset>/manifest.zarr`, complete (an interrupted ingest is an error naming the fix)."""
    url = store_url(dataset, "manifest")
    return RowStore.open(url, require_complete=True, storage_options=storage_options)


def file_fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# --- import-official ---------------------------------------------------------------------------

# The published files are latents of the 1024 px config-f FFHQ generator: S either conv-only
# (6048 wide) or the full layout (9088), C = OpenAI ViT-B/32 image embeddings, W+ [N, 18, 512].


@dataclass(frozen=True)
class ImportOfficialConfig:
    """`import_official:` in params."""

    sspace: str = ""  # sspace_*_feat.npy [N, 6048] (conv-only S) or [N, D] (full S)
    cspace: str = ""  # cspace_*_feat.npy [N, 512] CLIP image embeddings
    wspace: str | None = None  # wspace_*_feat.npy [N, L, 512]: fills the toRGB styles
    out: str = "data/official"
    rows_per_shard: int = 1024
    full_s: bool = True  # map a conv-only S into the full layout (needs wspace + generator)
    keep_wplus: bool = False  # also store the W+ of wspace in s.zarr
    clip_model: str = "ViT-B-32-quickgelu"  # recorded in clip.zarr attrs (OpenAI ViT-B/32)
    clip_preprocessing: str = "deltaedit"  # recorded in clip.zarr attrs

    def validate(self) -> None:
        require(bool(self.sspace), "sspace", self.sspace, "the path of sspace_*_feat.npy")
        require(bool(self.cspace), "cspace", self.cspace, "the path of cspace_*_feat.npy")
        require(bool(self.out), "out", self.out, "a dataset folder or URL")
        require(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "an integer >= 1")
        require(
            self.clip_preprocessing in ("clip", "deltaedit"),
            "clip_preprocessing",
            self.clip_preprocessing,
            "clip or deltaedit",
        )


def _load_npy(path: str, what: str, ndim: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise IngestError(f"import_official.{what} {path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise IngestError(
            f"import_official.{what} {path}: not a plain .npy array ({exc})"
        ) from None
    if arr.ndim != ndim or arr.dtype.kind != "f":
        raise IngestError(
            f"import_official.{what} {path}: expected a float array with {ndim} axes, "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    return arr


def generator_layout(ref: GeneratorRef):
    """The S layout of a `generator:` section, without building weights when it is a config."""
    from model.layout import SLayout

    if ref.path is None:
        from model.stylegan2 import CONFIGS

        if ref.config not in CONFIGS:
            raise IngestError(
                f"generator.config {ref.config!r}: unknown (known: {', '.join(sorted(CONFIGS))})"
            )
        cfg = CONFIGS[ref.config]
        return SLayout.from_channels(cfg.resolution, cfg.channels)
    from stages.execution import load_generator_ref

    return load_generator_ref(ref, "cpu").layout


@dataclass(frozen=True)
class _ImportTask:
    urls: tuple[str, str, str]  # manifest, clip, s
    sspace: str
    cspace: str
    wspace: str | None
    tag: str
    generator: GeneratorRef | None  # set: conv-only S is mapped into the full layout
    keep_wplus: bool
    device: str  # as configured ('auto' resolves on the worker)
    storage_options: dict = field(default_factory=dict)

    def __call__(self, block: int) -> BlockReport:
        import torch

        from stages.common import resolve_device

        device = resolve_device(self.device)  # on the worker: auto = its own GPU if any

        from stages.execution import load_generator_ref

        start = time.perf_counter()
        so = self.storage_options
        manifest, clip_store, s_store = (RowStore.open(u, storage_options=so) for u in self.urls)
        rows = manifest.block_rows(block)
        n = rows.stop - rows.start
        s_in = np.array(np.load(self.sspace, mmap_mode="r")[rows], dtype=np.float32)
        c = np.array(np.load(self.cspace, mmap_mode="r")[rows], dtype=np.float32)
        data: dict[str, np.ndarray] = {}
        wplus = None
        if self.wspace:
            wplus = np.array(np.load(self.wspace, mmap_mode="r")[rows], dtype=np.float32)
        if self.generator is not None:
            G = load_generator_ref(self.generator, device)
            layout = G.layout
            s = np.zeros((n, layout.dim), dtype=np.float32)
            with torch.no_grad():
                s_w = G.w_to_s(torch.from_numpy(wplus).to(device)).float().cpu().numpy()
            s[:] = s_w  # toRGB styles from W+
            s[:, layout.conv_index()] = s_in  # conv styles exactly as published
        else:
            s = s_in
        data["s"] = s
        if self.keep_wplus:
            data["wplus"] = wplus
        status = np.full(n, Status.OK, dtype=np.uint8)
        bad = mark_non_finite(status, [*data.values(), c])
        reasons = tuple(f"NON_FINITE: official:{self.tag}#{rows.start + k}" for k in bad)
        report = BlockReport(block, n, counts_of(status), reasons, 0.0)
        # a store that already holds this block (another store of the set restarted) keeps it
        if not s_store.done_mask()[block]:
            s_store.write_block(block, data, status)
        if not clip_store.done_mask()[block]:
            clip_store.write_block(block, {"embed": c}, status)
        ids = range(rows.start, rows.stop)
        if manifest.done_mask()[block]:
            return replace(report, seconds=time.perf_counter() - start)
        manifest.write_block(
            block,
            {
                "ids": np.array([f"official-{r:06d}" for r in ids]),
                "source": np.array([f"official:{self.tag}#{r}" for r in ids]),
                "sha256": np.array([""] * n),
                "size": np.zeros((n, 2), np.int32),
                "reason": np.array([""] * n),
            },
            status,
        )
        return replace(report, seconds=time.perf_counter() - start)


@dataclass
class ImportResult:
    out: str
    summary: PassSummary
    conv_only: bool
    lines: list[str] = field(default_factory=list)


def run_import_official(
    cfg: ImportOfficialConfig,
    generator: GeneratorRef,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
) -> ImportResult:
    """DeltaEdit's published latents -> `<out>/{manifest,clip,s}.zarr`; resumable."""
    return leased(
        [store_url(cfg.out, n) for n in ("manifest", "clip", "s")],
        "import-official",
        execution,
        lambda: _import_official(cfg, generator, execution, overwrite, progress, restart_on_change),
    )


def _import_official(
    cfg: ImportOfficialConfig,
    generator: GeneratorRef,
    execution: ExecutionConfig,
    overwrite: bool,
    progress: bool,
    restart_on_change: bool,
) -> ImportResult:
    from stages.common import resolve_device

    s_arr = _load_npy(cfg.sspace, "sspace", 2)
    c_arr = _load_npy(cfg.cspace, "cspace", 2)
    w_arr = _load_npy(cfg.wspace, "wspace", 3) if cfg.wspace else None
    n = s_arr.shape[0]
    for what, arr in (("cspace", c_arr), ("wspace", w_arr)):
        if arr is not None and arr.shape[0] != n:
            raise IngestError(
                f"import_official.{what}: {arr.shape[0]} rows, but sspace has {n}; "
                f"the files must come from one dataset"
            )
    layout = generator_layout(generator)
    width = s_arr.shape[1]
    lines: list[str] = []
    map_full = False
    if width == layout.dim:
        conv_only = False
    elif width == layout.conv_dim:
        conv_only = not cfg.full_s
        map_full = cfg.full_s
    else:
        raise IngestError(
            f"import_official.sspace: S is {width} wide, but the generator "
            f"({generator.path or generator.config}) has {layout.dim} style channels "
            f"({layout.conv_dim} conv-only); set generator.path/config to the generator the "
            f"latents came from (ffhq-1024 for the published FFHQ files)"
        )
    device = resolve_device(execution.device)
    gen_fp = ""
    if map_full or cfg.keep_wplus:
        if w_arr is None:
            raise IngestError(
                "import_official.wspace is not set: a conv-only S gets its toRGB styles from "
                "w_to_s of the W+ codes (wspace_*_feat.npy); set wspace, or full_s=false to "
                "store the conv-only S with its layout recorded"
            )
    if map_full:
        from stages.execution import load_generator_ref

        G = load_generator_ref(generator, device)
        if tuple(w_arr.shape[1:]) != (G.n_latent, G.w_dim):
            raise IngestError(
                f"import_official.wspace: W+ rows are {list(w_arr.shape[1:])}, the generator "
                f"takes [{G.n_latent}, {G.w_dim}]"
            )
        gen_fp = G.fingerprint
        lines.append(_conv_check(G, s_arr, w_arr, device))
    files = [p for p in (cfg.sspace, cfg.cspace, cfg.wspace) if p]
    files_fp = file_fingerprint(files)
    tag = Path(cfg.sspace).name
    notes: list[str] = []
    so = execution.storage()
    how = (overwrite, restart_on_change, notes, so)
    rps = cfg.rows_per_shard
    common = {"stage": "import-official", "files": [Path(p).name for p in files]}
    s_tail = (layout.conv_dim if conv_only else layout.dim,)
    s_arrays = {"s": ArraySpec(s_tail, "float32")}
    if cfg.keep_wplus:
        s_arrays["wplus"] = ArraySpec(tuple(w_arr.shape[1:]), "float32")
    s_attrs = {
        **common,
        "fingerprint": hashlib.sha256(f"{files_fp}+{gen_fp}".encode()).hexdigest(),
        "generator": gen_fp,
        "layout": layout.to_dict(),
        "conv_only": conv_only,
    }
    head = np.asarray(c_arr[: min(n, 256)], dtype=np.float64)
    normalized = bool(np.all(np.abs(np.linalg.norm(head, axis=1) - 1) < 1e-3))
    c_attrs = {
        **common,
        "fingerprint": files_fp,
        "model": cfg.clip_model,
        "preprocessing": cfg.clip_preprocessing,
        "normalized": normalized,
    }
    m_attrs = {**common, "fingerprint": files_fp, "root": "", "max_pixels": 0}
    urls = tuple(store_url(cfg.out, name) for name in ("manifest", "clip", "s"))
    manifest = create_output(urls[0], n, rps, MANIFEST_ARRAYS, m_attrs, *how)
    clip_store = create_output(
        urls[1], n, rps, {"embed": ArraySpec((c_arr.shape[1],), "float32")}, c_attrs, *how
    )
    s_store = create_output(urls[2], n, rps, s_arrays, s_attrs, *how)
    pending = sorted(
        set(manifest.pending_blocks())
        | set(clip_store.pending_blocks())
        | set(s_store.pending_blocks())
    )
    task = _ImportTask(
        tuple(storefs.absolute(u) for u in urls),  # type: ignore[arg-type]
        storefs.absolute(cfg.sspace),
        storefs.absolute(cfg.cspace),
        storefs.absolute(cfg.wspace) if cfg.wspace else None,
        tag,
        generator if map_full else None,
        cfg.keep_wplus,
        execution.device,
        dict(so),
    )
    summary = run_blocks(task, pending, execution, "import-official", manifest.n_blocks, progress)
    summary.notes.extend(notes)
    return ImportResult(cfg.out, summary, conv_only, [*notes, *(x for x in lines if x)])


def _conv_check(G, s_arr: np.ndarray, w_arr: np.ndarray, device: str) -> str:
    """A warning line when w_to_s(W+) does not reproduce the published conv styles (the
    generator is not the one the latents came from), else ''."""
    import torch

    k = min(len(s_arr), 16)
    with torch.no_grad():
        wplus = torch.from_numpy(np.array(w_arr[:k], dtype=np.float32)).to(device)
        s_w = G.w_to_s(wplus).float().cpu().numpy()[:, G.layout.conv_index()]
    ref = np.asarray(s_arr[:k], dtype=np.float32)
    err = float(np.abs(s_w - ref).max() / max(float(np.abs(ref).max()), 1e-8))
    if err > 1e-3:
        return (
            f"warning: w_to_s(wspace) differs from sspace by {err:.3g} (relative) on the first "
            f"{k} rows: the generator is probably not the one these latents came from, so the "
            f"toRGB styles filled in from it are wrong"
        )
    return ""
