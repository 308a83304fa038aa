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

import numpy as np

from model.checkpoint import sha256_file
from stages import images
from stages.common import ExecutionConfig, GeneratorRef
from stages.config import require
from stages.execution import BlockReport, PassSummary, create_output, prefetch_map, run_blocks
from store import ArraySpec, RowStore, Status, store_url
from store import fs as storefs

SCAN_NAME = ".ingest-scan"


@dataclass(frozen=True)
class IngestConfig:
    """`ingest:` in params."""

    source: str = "data/raw"  # a folder of images / .tar shards, or one .tar shard
    out: str = "data/images"  # dataset folder (or fsspec URL): manifest.zarr goes there
    max_pixels: int = 40_000_000  # images whose header claims more are TOO_LARGE, undecoded
    rows_per_shard: int = 1024
    extensions: tuple[str, ...] = images.IMAGE_EXTENSIONS
    decode_threads: int = 2  # threads reading + decode-checking files, per block task

    def validate(self) -> None:
        require(bool(self.source), "source", self.source, "a folder or .tar path")
        require(self.decode_threads >= 0, "decode_threads", self.decode_threads, "an integer >= 0")
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
    threads: int
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
                got = images.probe(data, self.max_pixels)
                return Status[got.outcome], got.reason, got

            todo = range(rows.start, rows.stop)
            for k, (st, why, got) in enumerate(
                prefetch_map(check, todo, self.threads, ahead=4 * max(self.threads, 1))
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


def run_ingest(
    cfg: IngestConfig,
    execution: ExecutionConfig,
    overwrite: bool = False,
    progress: bool = True,
    restart_on_change: bool = False,
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
    notes: list[str] = []
    how = (overwrite, restart_on_change, notes)
    so = execution.storage_options
    how = (*how, so)
    storefs.check_reachable(cfg.out, so)
    manifest_url = store_url(cfg.out, "manifest")
    scan_url = store_url(cfg.out, SCAN_NAME)
    manifest = create_output(manifest_url, n, cfg.rows_per_shard, MANIFEST_ARRAYS, attrs, *how)
    scan_summary = PassSummary("ingest scan", manifest.n_blocks)
    pending = manifest.pending_blocks()
    if pending:
        scan = create_output(scan_url, n, cfg.rows_per_shard, SCAN_ARRAYS, attrs, *how)
        task = _ScanTask(
            storefs.absolute(scan_url),
            root,
            tuple(sources),
            tuple(refused),
            cfg.max_pixels,
            cfg.decode_threads,
            dict(so),
        )
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
    storefs.remove(scan_url, so)
    summary = manifest_summary(manifest, scan_summary.seconds)
    summary.notes.extend(notes)
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
        # a store that already holds this block (another store of the set restarted) keeps it
        if not s_store.done_mask()[block]:
            s_store.write_block(block, data, status)
        if not clip_store.done_mask()[block]:
            clip_store.write_block(block, {"embed": c}, status)
        ids = range(rows.start, rows.stop)
        if manifest.done_mask()[block]:
            return BlockReport(block, n, {"OK": n}, (), time.perf_counter() - start)
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
        return BlockReport(block, n, {"OK": n}, (), time.perf_counter() - start)


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
    so = execution.storage_options
    storefs.check_reachable(cfg.out, so)
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
