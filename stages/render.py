"""Render stage: edits (or the originals) to image files, contact sheets and an HTML gallery.

Output under `render.out_dir`:

    originals/<row>.png          the source rows rendered from s (when render.originals)
    <edit>/<row>.png             one file per ok row (or <edit>/shard-<block>.tar when shards)
    gallery/<edit>/<row>.png     the gallery sample, when the edit is written as tar shards
    extra/<edit>/<row>.png       the optional extra column (e.g. a ground-truth counterpart)
    sheets/<edit>.png            before/after contact sheet; its title names target, neutral, alpha
    index.html                   static gallery, relative links: opens from disk

Files are named by row index (`00000042.png`); the gallery shows the manifest id.

Rows can say what they are, from data (no stage knows what a dataset holds):
`render.row_labels` names a JSON file `{row id: text}` (a caption under every row, e.g.
"red small circle on white"); `render.row_marks` a JSON file
`{"legend": text, "edits": {edit name: {row id: text}}}`: the rows to mark in that edit's
sheet and gallery section (a coloured frame, the text under the row, the legend in the
title), e.g. "already triangle" where the source already has the edit's target. A row id
is the manifest id (the ingest's id), or the row index for a store without ids. The
shapes world writes both files (`world evaluate`); any dataset's own labels can do the same.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.common import ExecutionConfig, GeneratorRef, autocast, resolve_device, to_device
from stages.config import require
from stages.execution import Staged
from store import fs as storefs

ORIGINALS = "originals"
ExtraFn = Callable[[str, int], "Image.Image | np.ndarray | None"]


@dataclass(frozen=True)
class RenderConfig:
    """`render:` in params."""

    edits: tuple[str, ...] = ()  # edit names; empty = every edit found in edits_dir
    edits_dir: str = "data/edits"
    store: str = "data/images"  # the dataset whose s.zarr the edits were made from
    originals: bool = True  # also render the source rows (the "before" images)
    out_dir: str = "data/render"
    format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 92
    shards: bool = False  # write <edit>/shard-<block>.tar instead of loose files
    max_rows: int | None = None  # render at most this many ok rows per edit (None = all)
    sheet_rows: int = 8  # rows on each contact sheet
    sheet_tile: int = 128  # tile size on the sheet (images are upscaled, nearest)
    gallery_rows: int = 16  # rows per edit in index.html
    seed: int = 0  # which rows the sheets and the gallery show
    extra_dir: str | None = None  # extra column: <extra_dir>/<edit>/<row>.png if present
    extra_label: str = "reference"
    row_labels: str | None = None  # JSON {row id: caption} (path or URL), shown with each row
    row_marks: str | None = None  # JSON {"legend": .., "edits": {edit: {row id: text}}}
    noise_mode: Literal["const", "random"] = "const"

    def validate(self) -> None:
        from stages.edit import check_name

        for i, name in enumerate(self.edits):
            check_name(name, f"edits[{i}]")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", self.jpeg_quality, "1..100")
        if self.max_rows is not None:
            require(self.max_rows >= 1, "max_rows", self.max_rows, "an integer >= 1 or null")
        require(self.sheet_rows >= 1, "sheet_rows", self.sheet_rows, "an integer >= 1")
        require(16 <= self.sheet_tile <= 1024, "sheet_tile", self.sheet_tile, "16..1024")
        require(self.gallery_rows >= 1, "gallery_rows", self.gallery_rows, "an integer >= 1")

    @property
    def suffix(self) -> str:
        return ".png" if self.format == "png" else ".jpg"


# --- pixels ---------------------------------------------------------------------------


def to_uint8(img: Any) -> np.ndarray:
    """Generator output [B, 3, H, W] in about [-1, 1] (tensor or array) -> uint8 [B, H, W, 3]."""
    x = img.detach().float().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    x = np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def render_s(
    generator: Any,
    s: np.ndarray,
    batch_size: int = 16,
    device: str = "cpu",
    noise_mode: str = "const",
    precision: str = "fp32",
) -> np.ndarray:
    """Images uint8 [n, H, W, 3] for S codes [n, D] (`precision`: the synthesis dtype).

    The generator always sees `batch_size` rows (the last batch padded with copies of its
    last row), so a row's file is the same whichever rows share its batch: an incremental
    render of a few new rows writes the bytes a from-scratch render writes."""
    import torch

    out = []
    with torch.no_grad(), autocast(device, precision):
        for i in range(0, len(s), batch_size):
            part = np.asarray(s[i : i + batch_size], dtype=np.float32)
            n = len(part)
            if n < batch_size:  # every call on batch_size rows: a row's pixels never depend
                part = np.concatenate([part, np.repeat(part[-1:], batch_size - n, axis=0)])
            sb = to_device(np.ascontiguousarray(part), device)
            out.append(to_uint8(generator.synthesize(sb, noise_mode=noise_mode))[:n])
    if not out:
        r = generator.resolution
        return np.zeros((0, r, r, 3), dtype=np.uint8)
    return np.concatenate(out)


def encode_image(img: np.ndarray, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def row_file(row: int, suffix: str) -> str:
    return f"{row:08d}{suffix}"


# --- contact sheet --------------------------------------------------------------------


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """Cut text to fit `width` pixels (with an ellipsis)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> list[str]:
    """Break text into lines of at most `width` pixels (at spaces; an overlong word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, width, font))
    return lines or [""]


MARK_RGB = (230, 120, 0)  # the frame and text of a marked row (sheet and gallery)


def contact_sheet(
    before: Sequence[np.ndarray],
    after: Sequence[np.ndarray],
    title: Sequence[str],
    labels: Sequence[str] = (),
    tile: int = 128,
    extra: Sequence[np.ndarray | None] | None = None,
    extra_label: str = "reference",
    notes: Sequence[str] = (),
    marks: Sequence[str] = (),
    legend: str = "",
) -> Image.Image:
    """One sheet: a title block (prompt, alpha ...), then per row `before | after [| extra]`.

    before/after: uint8 [H, W, 3] images. labels: one caption per row (e.g. the id);
    notes: a second caption per row (e.g. what the row shows); marks: per row, "" or the
    text of a mark (the row gets a coloured frame and the text); legend: what a mark means,
    written in the title block when a row is marked. Long lines wrap.
    """
    font = _font()
    n = len(before)
    cols = 3 if extra is not None else 2
    pad, line = 6, 14
    label_w = 120
    width = label_w + cols * (tile + pad) + pad
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head_lines = [w for t in title for w in _wrap(draw, t, width - 2 * pad, font)]
    marked = any(m for m in marks[:n])
    legend_lines = _wrap(draw, legend, width - 3 * pad - 10, font) if marked and legend else []
    rows_text = []
    for i in range(n):
        text = [_fit(draw, labels[i], label_w - pad, font)] if i < len(labels) else []
        if i < len(notes) and notes[i]:
            text += _wrap(draw, notes[i], label_w - pad, font)
        if i < len(marks) and marks[i]:
            text += _wrap(draw, marks[i], label_w - pad, font)
        rows_text.append(text[: max(1, tile // line)])
    head = pad + line * (len(head_lines) + len(legend_lines) + 1) + pad
    height = head + n * (tile + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(head_lines):
        draw.text((pad, pad + i * line), text, fill=(0, 0, 0), font=font)
    y_legend = pad + line * len(head_lines)
    if legend_lines:
        draw.rectangle([pad, y_legend + 1, pad + 9, y_legend + 10], outline=MARK_RGB, width=3)
        for i, text in enumerate(legend_lines):
            draw.text((2 * pad + 10, y_legend + i * line), text, fill=MARK_RGB, font=font)
    names = ["before", "after"] + ([extra_label] if extra is not None else [])
    y0 = y_legend + line * len(legend_lines)
    for j, name in enumerate(names):
        draw.text((label_w + pad + j * (tile + pad), y0), name, fill=(80, 80, 80), font=font)
    for i in range(n):
        y = head + i * (tile + pad)
        is_marked = i < len(marks) and bool(marks[i])
        text = rows_text[i]
        n_plain = len(text) - (len(_wrap(draw, marks[i], label_w - pad, font)) if is_marked else 0)
        y_text = y + max(0, (tile - line * len(text)) // 2)
        for k, t in enumerate(text):
            colour = MARK_RGB if k >= n_plain else ((0, 0, 0) if k == 0 else (90, 90, 90))
            draw.text((pad, y_text + k * line), t, fill=colour, font=font)
        if is_marked:
            draw.rectangle([label_w + 2, y - 2, width - 3, y + tile + 1], outline=MARK_RGB, width=2)
        row = [before[i], after[i]] + ([extra[i]] if extra is not None else [])
        for j, img in enumerate(row):
            x = label_w + pad + j * (tile + pad)
            if img is None:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline=(200, 200, 200))
                continue
            im = Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(im, (x, y))
    return sheet


def edit_title(name: str, attrs: dict) -> list[str]:
    """Lines written on a sheet / gallery header: the first names the target(s) with their
    alphas and the neutral prompt; the second beta, levels and method."""
    if not attrs or attrs.get("stage") != "edit":
        return [name]
    targets = attrs.get("targets", [])
    alphas = attrs.get("alphas", [])
    prompt = " + ".join(f"'{t}' (alpha {a:g})" for t, a in zip(targets, alphas, strict=False))
    method = attrs.get("method")
    if attrs.get("antisymmetric"):
        pull = attrs.get("mean_pull") or 0.0
        method = f"{method} (antisymmetric{f', mean pull {pull:g}' if pull else ''})"
    if attrs.get("chord"):
        method = f"{method}, chord {attrs['chord']:g}"
    return [
        f"{name}: target {prompt}, neutral '{attrs.get('neutral')}'",
        f"beta {attrs.get('beta')}, levels {'/'.join(attrs.get('levels', []))}, method {method}",
    ]


# --- gallery --------------------------------------------------------------------------


@dataclass
class GalleryRow:
    label: str
    images: list[str | None]  # relative paths, one per column (None = empty cell)
    note: str = ""  # a second caption (render.row_labels)
    mark: str = ""  # non-empty: the row is marked, with this text (render.row_marks)


@dataclass
class GallerySection:
    title: list[str]
    columns: list[str]
    rows: list[GalleryRow] = field(default_factory=list)
    sheet: str | None = None  # relative path of the contact sheet
    legend: str = ""  # what a mark means (shown when a row is marked)


GALLERY_SCRIPT = """
window.addEventListener('error', function (e) {
  document.body.dataset.jsError = String(e.message || e.type);
}, true);
function deltaeditCount() {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = ok.length;
  document.body.dataset.imagesBroken = imgs.filter(function (i) {
    return i.complete && i.naturalWidth === 0; }).length;
}
window.addEventListener('load', deltaeditCount);
"""

GALLERY_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 2em; }
td, th { border: 1px solid #ccc; padding: 4px; text-align: center; }
td img { width: 128px; height: 128px; image-rendering: pixelated; }
h2 { margin-bottom: 0.2em; } p.sub { margin-top: 0; color: #555; }
span.note { color: #555; font-size: small; }
tr.marked td { background: #ffe3c2; } tr.marked td img { outline: 3px solid #e67800; }
.mark { color: #b35c00; font-weight: bold; font-size: small; }
span.swatch { display: inline-block; width: 0.8em; height: 0.8em; border: 3px solid #e67800; }
"""


def write_gallery(
    out_dir: str | Path,
    sections: Sequence[GallerySection],
    title: str,
    storage_options: dict | None = None,
) -> str:
    """`out_dir/index.html` (a path or URL): one table per section; every link relative to
    out_dir. Returns where it was written."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{GALLERY_STYLE}</style>",
        f"<script>{GALLERY_SCRIPT}</script></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{e(sec.title[0])}</h2>")
        for sub in sec.title[1:]:
            parts.append(f'<p class="sub">{e(sub)}</p>')
        if sec.sheet:
            parts.append(f'<p><a href="{e(sec.sheet)}">contact sheet</a></p>')
        if sec.legend and any(r.mark for r in sec.rows):
            parts.append(
                f'<p class="legend"><span class="swatch"></span> '
                f'<span class="mark">marked</span>: {e(sec.legend)}</p>'
            )
        parts.append("<table><tr><th>row</th>")
        parts.extend(f"<th>{e(c)}</th>" for c in sec.columns)
        parts.append("</tr>")
        for row in sec.rows:
            cell = e(row.label)
            if row.note:
                cell += f'<br><span class="note">{e(row.note)}</span>'
            if row.mark:
                cell += f'<br><span class="mark">{e(row.mark)}</span>'
            tr = f'<tr class="marked" data-mark="{e(row.mark)}">' if row.mark else "<tr>"
            parts.append(f"{tr}<td>{cell}</td>")
            for col, src in zip(sec.columns, row.images, strict=True):
                if src is None:
                    parts.append("<td>-</td>")
                else:
                    alt = e(f"{row.label} {col}")
                    parts.append(f'<td><img src="{e(src)}" alt="{alt}" loading="eager"></td>')
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = storefs.join(str(out_dir), "index.html")
    storefs.write_text_atomic(path, "\n".join(parts), storage_options)
    return path


# --- row labels and marks (data from whoever knows the rows) ------------------------


def _read_json(key: str, url: str, storage_options: dict | None) -> Any:
    if not storefs.exists(url, storage_options):
        raise ValueError(f"render.{key}: {url} not found (set render.{key}: null for none)")
    try:
        return json.loads(storefs.read_text(url, storage_options))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"render.{key}: {url} is not JSON ({exc})") from None


def _text_map(key: str, url: str, value: Any, where: str) -> dict[str, str]:
    ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if not ok:
        raise ValueError(f"render.{key}: {url}: {where} must map row ids to text")
    return {str(k): v for k, v in value.items()}


def load_row_labels(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """`render.row_labels`: a JSON object {row id: caption}."""
    return _text_map("row_labels", url, _read_json("row_labels", url, storage_options), "it")


@dataclass(frozen=True)
class RowMarks:
    """`render.row_marks`: per edit, the rows to mark and each one's text; what a mark means."""

    legend: str = ""
    edits: dict[str, dict[str, str]] = field(default_factory=dict)


def load_row_marks(url: str, storage_options: dict | None = None) -> RowMarks:
    """A JSON object {"legend": text, "edits": {edit name: {row id: text}}}."""
    data = _read_json("row_marks", url, storage_options)
    if not isinstance(data, dict) or not isinstance(data.get("edits"), dict):
        raise ValueError(f'render.row_marks: {url}: expected {{"legend": ..., "edits": {{...}}}}')
    legend = data.get("legend", "")
    if not isinstance(legend, str):
        raise ValueError(f"render.row_marks: {url}: legend must be text")
    edits = {
        str(name): _text_map("row_marks", url, rows, f"edits.{name}")
        for name, rows in data["edits"].items()
    }
    return RowMarks(legend, edits)


# --- what each rendered file was made from (incremental renders) --------------------


RECORD_DIR = ".record"  # <out>/<name>/.record/block-<b>.json: {file name: recipe}
MOVING_DIR = ".moving"  # copies of moved files on their way to their new names
_ROW_NAME = re.compile(r"^(\d{8,})\.(png|jpg)$")
_SHARD_NAME = re.compile(r"^shard-(\d{5,})\.tar$")
OWN_DIRS = ("gallery", "sheets", "extra", RECORD_DIR, MOVING_DIR)  # render's own folders


def shard_file(block: int) -> str:
    return f"shard-{block:05d}.tar"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_recipe(producer: str, generator: str, cfg: RenderConfig, precision: str) -> str:
    """What every file of one rendered folder shares: the producer of its rows (the edit's
    fingerprint, or the s store's for the originals), the generator's fingerprint and the
    settings that change the bytes. A change of any of them re-renders the whole folder."""
    settings = {
        "format": cfg.format,
        "jpeg_quality": cfg.jpeg_quality if cfg.format == "jpeg" else None,
        "noise_mode": cfg.noise_mode,
        "precision": precision,
        "shards": cfg.shards,
    }
    spec = {"producer": producer, "generator": generator, "settings": settings}
    return _sha256(json.dumps(spec, sort_keys=True))


def producer_of(store: Any) -> str:
    """A store's producer fingerprint (its attrs' hash when it records none)."""
    from store import update as up

    if store.fingerprint:
        return str(store.fingerprint)
    return _sha256(json.dumps(up.producer_attrs(store.attrs), sort_keys=True, default=str))


def folder_files(
    rows: np.ndarray,
    keys: np.ndarray,
    recipe: str,
    rows_per_shard: int,
    shards: bool,
    suffix: str,
) -> dict[str, str]:
    """{file name: what it is made from} for a folder holding `rows` (keys: their row keys):
    per row (loose files) the recipe and the row's key; per tar, those of all its rows and
    their positions (a tar is reused only if every row in it is unchanged at its index)."""
    names = [row_file(int(r), suffix) for r in rows]
    per_row = [_sha256(f"{recipe}/{k}") for k in keys.tolist()]
    if not shards:
        return dict(zip(names, per_row, strict=True))
    out: dict[str, str] = {}
    blocks = np.asarray(rows, dtype=np.int64) // rows_per_shard
    for b in np.unique(blocks).tolist():
        members = [f"{names[i]}={per_row[i]}" for i in np.flatnonzero(blocks == b).tolist()]
        out[shard_file(int(b))] = _sha256("\n".join(members))
    return out


def file_block(name: str, rows_per_shard: int) -> int:
    """The block whose record lists `name` (a row file or a tar shard)."""
    m = _SHARD_NAME.match(name)
    if m:
        return int(m.group(1))
    m = _ROW_NAME.match(name)
    if m is None:
        raise ValueError(f"{name} is not a rendered file name")
    return int(m.group(1)) // rows_per_shard


def _record_file(block: int) -> str:
    return f"block-{block:05d}.json"


def write_block_record(
    folder: str, block: int, entries: dict[str, str], storage_options: dict | None = None
) -> None:
    """One block's record, atomically: call it only once the files it names are written."""
    text = json.dumps({"files": dict(sorted(entries.items()))}, indent=0)
    storefs.write_text_atomic(
        storefs.join(folder, RECORD_DIR, _record_file(block)), text, storage_options
    )


@dataclass
class FolderRecord:
    """What each file of a rendered folder was made from, as `.record/` holds it: per
    record file (one per block) its entries {file name: recipe}."""

    folder: str
    parts: dict[str, dict[str, str]]

    @classmethod
    def read(cls, folder: str, storage_options: dict | None = None) -> FolderRecord:
        """The record on disk; an unreadable part counts as empty (its files re-render)."""
        where = storefs.join(folder, RECORD_DIR)
        parts: dict[str, dict[str, str]] = {}
        for name in storefs.listdir(where, storage_options):
            if not (name.startswith("block-") and name.endswith(".json")):
                continue
            try:
                files = json.loads(storefs.read_text(storefs.join(where, name), storage_options))
                parts[name] = {str(k): str(v) for k, v in files["files"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                parts[name] = {}
        return cls(folder, parts)

    def entries(self) -> dict[str, str]:
        return {k: v for part in self.parts.values() for k, v in part.items()}

    def save(
        self, entries: dict[str, str], rows_per_shard: int, storage_options: dict | None = None
    ) -> None:
        """Make the record say `entries`: each changed block's file rewritten atomically,
        the files of blocks without entries removed."""
        grouped: dict[str, dict[str, str]] = {}
        blocks: dict[str, int] = {}
        for name, recipe in entries.items():
            b = file_block(name, rows_per_shard)
            blocks[_record_file(b)] = b
            grouped.setdefault(_record_file(b), {})[name] = recipe
        for fname, files in grouped.items():
            if self.parts.get(fname) != files:
                write_block_record(self.folder, blocks[fname], files, storage_options)
                self.parts[fname] = files
        for fname in [f for f in self.parts if f not in grouped]:
            storefs.remove(storefs.join(self.folder, RECORD_DIR, fname), storage_options)
            del self.parts[fname]


@dataclass(frozen=True)
class FolderPlan:
    """What a rerun does to one rendered folder."""

    todo: np.ndarray  # rows to render
    blocks: list[int]  # the blocks holding them
    kept: dict[str, str]  # files already right (name -> recipe)
    moves: list[tuple[str, str]]  # (new name, an existing file of the same recipe)
    removed: list[str]  # rendered files no longer wanted
    kept_rows: int  # rows whose file (or tar) is kept
    valid: dict[str, str]  # the record's entries whose file is present


def plan_folder(
    want: dict[str, str],
    have: dict[str, str],
    present: set[str],
    rows: np.ndarray,
    rows_per_shard: int,
    shards: bool,
    suffix: str,
) -> FolderPlan:
    """Compare the files wanted with those the record names (and that are present)."""
    have = {n: r for n, r in have.items() if n in present}
    kept = {n: r for n, r in want.items() if have.get(n) == r}
    by_recipe: dict[str, str] = {}
    for name, recipe in sorted(have.items()):
        by_recipe.setdefault(recipe, name)
    moves: list[tuple[str, str]] = []
    if not shards:  # a tar is right only at its own index: never moved
        moves = [(n, by_recipe[r]) for n, r in want.items() if n not in kept and r in by_recipe]
    done = set(kept) | {n for n, _ in moves}
    if shards:
        todo = np.array([r for r in rows.tolist() if shard_file(r // rows_per_shard) not in done])
    else:
        todo = np.array([r for r in rows.tolist() if row_file(r, suffix) not in done])
    todo = todo.astype(np.int64)
    ours = {n for n in present if _ROW_NAME.match(n) or _SHARD_NAME.match(n)}
    kept_rows = len(rows) - len(todo) - len(moves)
    return FolderPlan(
        todo,
        np.unique(todo // rows_per_shard).tolist(),
        kept,
        moves,
        sorted(ours - set(want)),
        kept_rows,
        have,
    )


def prepare_folder(
    plan: FolderPlan,
    record: FolderRecord,
    want: dict[str, str],
    rows_per_shard: int,
    storage_options: dict | None = None,
) -> None:
    """Before rendering: moved rows' files copied to their new names, files of rows no
    longer present removed, the record saying only what is on disk at every step (a
    killed render, rerun, never trusts a file the record does not match)."""
    so = storage_options
    d = record.folder
    moving = storefs.join(d, MOVING_DIR)
    storefs.remove(moving, so)  # left by a killed render
    for new, old in plan.moves:
        storefs.copy_file(storefs.join(d, old), storefs.join(moving, new), so)
    # names about to be written lose their claim first; removed files keep theirs until gone
    keep = {n: r for n, r in plan.valid.items() if n in plan.kept or n not in want}
    record.save(keep, rows_per_shard, so)
    for new, _ in plan.moves:
        storefs.move_file(storefs.join(moving, new), storefs.join(d, new), so)
    ready = {**plan.kept, **{new: want[new] for new, _ in plan.moves}}
    record.save(ready, rows_per_shard, so)
    for name in plan.removed:
        storefs.remove(storefs.join(d, name), so)
    storefs.remove(moving, so)


# --- stage --------------------------------------------------------------------------


@dataclass
class RenderResult:
    """One rendered folder: `n_images` files (rows) it holds, of which `rendered` were
    rendered by this run, `kept` were already right and `moved` were copied from the file
    of the same row at its old index; `removed`: files of rows no longer there."""

    name: str
    n_images: int
    seconds: float
    sheet: str | None
    rendered: int = 0
    kept: int = 0
    moved: int = 0
    removed: int = 0


def discover_edits(edits_dir: str, storage_options: dict | None = None) -> list[str]:
    """Names of the `<name>.zarr` stores under `edits_dir` (a folder or URL), sorted."""
    return [
        n[: -len(".zarr")]
        for n in storefs.listdir(edits_dir, storage_options)
        if n.endswith(".zarr")
    ]


# --- what a rerun removes: the outputs of edits no longer rendered ------------------------


@dataclass(frozen=True)
class RenderedNames:
    """The names this run wrote, per kind of output under render.out_dir."""

    folders: set[str]  # <out>/<name>/ (with its .record)
    gallery: set[str]  # gallery/<name>/
    extra: set[str]  # extra/<name>/
    sheets: set[str]  # sheets/<name>.png


def rendered_before(out: str, storage_options: dict | None = None) -> set[str]:
    """The names an earlier render wrote into `out`: those its render.json lists and the
    folders holding a render record (only these are ever pruned)."""
    from stages.edit import NAME_RE

    names: set[str] = set()
    info = storefs.join(out, "render.json")
    if storefs.exists(info, storage_options):
        try:
            listed = json.loads(storefs.read_text(info, storage_options)).get("edits", [])
            names |= {n for n in listed if isinstance(n, str)}
        except (ValueError, AttributeError):
            pass
    for entry in storefs.listdir(out, storage_options):
        if storefs.exists(storefs.join(out, entry, RECORD_DIR), storage_options):
            names.add(entry)
    return {n for n in names if n not in OWN_DIRS and NAME_RE.match(n)}


def _remove_rendered(folder: str, storage_options: dict | None = None) -> bool:
    """Remove the files render writes in `folder` (row files, tar shards, the record) and
    the folder once empty; any other file stays. True: something was removed."""
    entries = storefs.listdir(folder, storage_options)
    ours = [
        e
        for e in entries
        if _ROW_NAME.match(e) or _SHARD_NAME.match(e) or e in (RECORD_DIR, MOVING_DIR)
    ]
    for e in ours:
        storefs.remove(storefs.join(folder, e), storage_options)
    if len(ours) == len(entries):
        storefs.remove(folder, storage_options)
    return bool(ours)


def prune_render(
    out: str,
    previous: set[str],
    now: RenderedNames,
    storage_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Remove what an earlier render wrote for names this one did not write (an edit
    removed, render.edits narrowed, originals or shards turned off), so `out` holds what a
    render from scratch writes. Returns the paths removed (a folder holding other files:
    only render's files in it)."""
    so = storage_options
    removed: list[str] = []
    for name in sorted(previous):
        places = [
            (storefs.join(out, name), name in now.folders),
            (storefs.join(out, "gallery", name), name in now.gallery),
            (storefs.join(out, "extra", name), name in now.extra),
        ]
        for folder, current in places:
            if not current and _remove_rendered(folder, so):
                removed.append(folder)
        sheet = storefs.join(out, "sheets", f"{name}.png")
        if name not in now.sheets and storefs.exists(sheet, so):
            storefs.remove(sheet, so)
            removed.append(sheet)
    for own in ("gallery", "extra", "sheets"):  # left empty: gone, as from scratch
        d = storefs.join(out, own)
        if removed and storefs.isdir(d, so) and not storefs.listdir(d, so):
            storefs.remove(d, so)
    kept = [p for p in removed if storefs.exists(p, so)]
    for path in removed:
        left = "; other files in it kept" if path in kept else ""
        log(f"render: removed {path} (no longer rendered{left})")
    return removed


def _ids(store_root: str, n_rows: int, storage_options: dict | None = None) -> np.ndarray | None:
    from stages.edit import _manifest_ids, dataset_urls

    return _manifest_ids(dataset_urls(store_root)["manifest"], n_rows, storage_options)


def _extra_image(
    cfg: RenderConfig,
    extra: ExtraFn | None,
    name: str,
    row: int,
    storage_options: dict | None = None,
) -> np.ndarray | None:
    img: Any = None
    if extra is not None:
        img = extra(name, row)
    elif cfg.extra_dir:
        for cand in (
            storefs.join(cfg.extra_dir, name, row_file(row, ".png")),
            storefs.join(cfg.extra_dir, row_file(row, ".png")),
        ):
            if storefs.exists(cand, storage_options):
                img = _read_bounded(cand, storage_options)
                break
    if img is None:
        return None
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    return np.asarray(img, dtype=np.uint8)


def _read_bounded(
    path: str, storage_options: dict | None = None, max_pixels: int = 4096 * 4096
) -> np.ndarray:
    with Image.open(io.BytesIO(storefs.read_bytes(path, storage_options))) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"{path}: {im.width}x{im.height} is larger than {max_pixels} pixels")
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class _RenderTask(Staged):
    """Render the rows `todo` of one shard-aligned block of one store, write their files
    straight to `out_dir` (a Dask task: the image bytes never travel back), then the
    block's record: what each wanted file of the block (`rows`) is made from.

    The client decides what to render (it sees the whole folder, so it can move a row's
    file to its new index, which no block task could); the task only renders and records.
    With shards, `todo` holds every row of a block whose tar is rewritten."""

    store_url: str
    rows: np.ndarray  # every row the folder holds, sorted
    todo: np.ndarray  # the rows to render now, sorted (a subset of rows)
    recipe: str  # render_recipe of the folder
    out_dir: str  # <render.out_dir>/<name>: absolute path or URL
    generator: GeneratorRef
    device: str  # as configured ('auto' resolves on the worker)
    batch_size: int
    fmt: str
    quality: int
    shards: bool
    noise_mode: str
    storage_options: dict = field(default_factory=dict)
    model: Any = None  # a generator object the caller passed in (instead of the ref)
    precision: str = "fp32"  # execution.precision: the synthesis dtype
    compile: bool = False  # execution.compile: synthesis through torch.compile

    def read(self, block: int) -> tuple[float, np.ndarray, np.ndarray | None, dict[str, str]]:
        """(start, the block's rows to render, their S codes, the block's record)."""
        from stages.edit import row_keys
        from store import RowStore

        t0 = time.perf_counter()
        st = RowStore.open(self.store_url, storage_options=self.storage_options)
        sl = st.block_rows(block)
        in_block = lambda a: a[np.searchsorted(a, sl.start) : np.searchsorted(a, sl.stop)]  # noqa: E731
        rows, wanted = in_block(self.todo), in_block(self.rows)
        keys = row_keys(st, sl)[wanted - sl.start]
        suffix = ".png" if self.fmt == "png" else ".jpg"
        record = folder_files(wanted, keys, self.recipe, st.rows_per_shard, self.shards, suffix)
        s = st.read("s", rows=sl)[rows - sl.start] if len(rows) else None
        return t0, rows, s, record

    def compute(self, block: int, data: tuple) -> tuple:
        from stages.execution import compiled_generator, load_generator_ref

        t0, rows, s, record = data
        if not len(rows):
            return t0, rows, None, record
        device = resolve_device(self.device)
        G = self.model if self.model is not None else load_generator_ref(self.generator, device)
        if self.compile:
            G = compiled_generator(G, device)
        imgs = render_s(G, s, self.batch_size, device, self.noise_mode, self.precision)
        return t0, rows, imgs, record

    def write(self, block: int, result: tuple) -> Any:
        from stages.execution import BlockReport

        t0, rows, imgs, record = result
        so = self.storage_options
        if len(rows):
            suffix = ".png" if self.fmt == "png" else ".jpg"
            files = [
                (row_file(int(r), suffix), encode_image(im, self.fmt, self.quality))
                for r, im in zip(rows, imgs, strict=True)
            ]
            if self.shards:
                shard = storefs.join(self.out_dir, shard_file(block))
                storefs.write_bytes_atomic(shard, tar_bytes(files), so)
            else:
                for fname, data in files:
                    storefs.write_bytes(storefs.join(self.out_dir, fname), data, so)
        write_block_record(self.out_dir, block, record, so)  # only now: its files are there
        n = len(rows)
        return BlockReport(block, n, {"OK": n}, (), time.perf_counter() - t0)


def _render_folder(
    cfg: RenderConfig,
    name: str,
    st: Any,
    rows: np.ndarray,
    d: str,
    generator: Any,
    generator_ref: GeneratorRef,
    model: Any,
    execution: ExecutionConfig,
    progress: bool,
) -> RenderResult:
    """Bring the folder `d` to the files of `rows` of the store `st`: files whose record
    matches kept, rows moved to another index copied, the rest rendered block-wise."""
    from stages.edit import row_keys
    from stages.execution import for_workers, run_blocks

    so = execution.storage()
    storefs.makedirs(d, so)
    recipe = render_recipe(producer_of(st), generator.fingerprint, cfg, execution.precision)
    rps = st.rows_per_shard
    keys = row_keys(st)[rows]
    want = folder_files(rows, keys, recipe, rps, cfg.shards, cfg.suffix)
    record = FolderRecord.read(d, so)
    present = set(storefs.listdir(d, so))
    plan = plan_folder(want, record.entries(), present, rows, rps, cfg.shards, cfg.suffix)
    prepare_folder(plan, record, want, rps, so)
    task = _RenderTask(
        storefs.absolute(st.url),
        np.asarray(rows, dtype=np.int64),
        plan.todo,
        recipe,
        storefs.absolute(d),
        for_workers(generator_ref),
        execution.device,
        execution.batch_size,
        cfg.format,
        cfg.jpeg_quality,
        cfg.shards,
        cfg.noise_mode,
        dict(so),
        model,
        execution.precision,
        execution.compile,
    )
    run_blocks(
        task,
        plan.blocks,
        execution,
        f"render {name}",
        st.n_blocks,
        progress=progress,
        resources=execution.model_resources(),
    )
    return RenderResult(
        name,
        len(rows),
        0.0,
        None,
        rendered=len(plan.todo),
        kept=plan.kept_rows,
        moved=len(plan.moves),
        removed=len(plan.removed),
    )


def run(
    cfg: RenderConfig,
    generator_ref: GeneratorRef | None = None,
    execution: ExecutionConfig | None = None,
    *,
    generator: Any | None = None,
    extra: ExtraFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[RenderResult]:
    """Render the chosen edits (and the originals), their sheets and index.html.

    Image files (or tar shards) are written by one block task per shard-aligned block
    through the executor (`execution.scheduler_address`: on the cluster's workers); the
    sheets, the gallery's sample images and index.html are written once at the end."""
    from model.layout import SLayout
    from stages.edit import dataset_urls
    from stages.execution import load_generator_ref
    from store import RowStore

    execution = execution or ExecutionConfig()
    so = execution.storage()
    storefs.check_reachable(cfg.out_dir, so)
    device = resolve_device(execution.device)
    names = list(cfg.edits) or discover_edits(cfg.edits_dir, so)
    edit_stores = {
        n: RowStore.open(storefs.join(cfg.edits_dir, f"{n}.zarr"), storage_options=so)
        for n in names
    }
    src = RowStore.open(dataset_urls(cfg.store)["s"], storage_options=so)
    layout = src.attrs.get("layout")
    for n, st in edit_stores.items():
        if st.n_rows != src.n_rows or st.attrs.get("layout", layout) != layout:
            raise ValueError(
                f"edit {n} was made from another store ({st.attrs.get('source')}), "
                f"not {src.url}; set render.store to its dataset"
            )
    generator_ref = generator_ref or GeneratorRef()
    model = generator
    if generator is None:
        generator = load_generator_ref(generator_ref, device)
    recorded = src.attrs.get("generator")
    if isinstance(recorded, str) and recorded != generator.fingerprint:
        raise ValueError(
            f"{src.url} was made with generator {recorded[:12]}, params name "
            f"{generator.fingerprint[:12]}; set generator: to the one that made the store"
        )
    if layout is not None and SLayout.from_dict(layout).dim != generator.layout.dim:
        raise ValueError(
            f"the generator's S has {generator.layout.dim} channels, {src.url} has "
            f"{SLayout.from_dict(layout).dim}; set generator: to the one that made the store"
        )
    out = cfg.out_dir
    storefs.makedirs(out, so)
    previous = rendered_before(out, so)
    ids = _ids(cfg.store, src.n_rows, so)
    rng = np.random.default_rng(cfg.seed)

    jobs: list[tuple[str, Any]] = [(ORIGINALS, src)] + list(edit_stores.items())
    rows_of: dict[str, np.ndarray] = {ORIGINALS: src.ok_rows()}
    for name, st in edit_stores.items():
        rows_of[name] = np.intersect1d(st.ok_rows(), rows_of[ORIGINALS])
    if cfg.max_rows is not None:
        rows_of = {n: r[: cfg.max_rows] for n, r in rows_of.items()}
    # rows shown on sheets and in the gallery: ok in every edit shown
    common = rows_of[ORIGINALS]
    for name in edit_stores:
        common = np.intersect1d(common, rows_of[name])
    k = min(len(common), max(cfg.sheet_rows, cfg.gallery_rows))
    shown = np.sort(rng.choice(common, size=k, replace=False)) if k else common[:0]
    if not cfg.originals and edit_stores:
        rows_of[ORIGINALS] = shown  # only the "before" images the sheets and gallery show

    results = []
    shown_imgs: dict[str, dict[int, np.ndarray]] = {}
    gallery_only = {ORIGINALS} if not cfg.originals and edit_stores else set()
    in_gallery = set(gallery_only) | ({n for n, _ in jobs} if cfg.shards else set())
    for name, st in jobs:
        t0 = time.perf_counter()
        rows = rows_of[name]
        d = storefs.join(out, name)
        res = RenderResult(name, len(rows), 0.0, None, rendered=len(rows))
        if name not in gallery_only:
            res = _render_folder(
                cfg, name, st, rows, d, generator, generator_ref, model, execution, progress
            )
        # the sample the sheets and the gallery show, rendered once more here (few rows)
        picked = shown[np.isin(shown, rows)]
        imgs = render_s(
            generator,
            st.read("s", rows=picked),
            execution.batch_size,
            device,
            cfg.noise_mode,
            execution.precision,
        )
        keep = {int(r): im for r, im in zip(picked, imgs, strict=True)}
        if name in in_gallery:
            g = storefs.join(out, "gallery", name)
            storefs.remove(g, so)  # the gallery is made afresh every run
            for r, im in keep.items():
                data = encode_image(im, cfg.format, cfg.jpeg_quality)
                storefs.write_bytes(storefs.join(g, row_file(r, cfg.suffix)), data, so)
        shown_imgs[name] = keep
        res.seconds = time.perf_counter() - t0
        where = storefs.join(out, "gallery", name) if name in gallery_only else d
        log(
            f"render {name}: {res.n_images} images (rendered {res.rendered}, reused "
            f"{res.kept + res.moved}: kept {res.kept}, moved {res.moved}), removed "
            f"{res.removed} files, {st.n_rows - res.n_images} rows not rendered (not ok, not "
            f"edited, or past render.max_rows), {res.rendered / max(res.seconds, 1e-9):.1f} "
            f"img/s -> {where}"
        )
        results.append(res)

    # --- sheets and gallery ---
    sheets = storefs.join(out, "sheets")
    label = (lambda r: f"{r}: {ids[r]}") if ids is not None else (lambda r: f"row {r}")
    row_id = {int(r): str(ids[r]) if ids is not None else str(r) for r in shown.tolist()}
    labels_of = load_row_labels(cfg.row_labels, so) if cfg.row_labels else {}
    note = {r: labels_of.get(i, "") for r, i in row_id.items()}
    row_marks = load_row_marks(cfg.row_marks, so) if cfg.row_marks else RowMarks()
    marked_shown: dict[str, list[int]] = {}
    sections = []
    before_name = ORIGINALS if ORIGINALS in shown_imgs else None
    extras_dir = storefs.join(out, "extra")
    for res in results:
        name = res.name
        attrs = edit_stores[name].attrs if name in edit_stores else {}
        title = edit_title(name, attrs) if name != ORIGINALS else ["originals (rendered from s)"]
        marks_of = row_marks.edits.get(name, {})
        mark = {r: marks_of.get(i, "") for r, i in row_id.items()}
        sheet_rows = [int(r) for r in shown[: cfg.sheet_rows]]
        extra_imgs = None
        storefs.remove(storefs.join(extras_dir, name), so)  # made afresh every run
        if name != ORIGINALS and (extra is not None or cfg.extra_dir):
            extra_imgs = [_extra_image(cfg, extra, name, r, so) for r in shown]
        if name != ORIGINALS and before_name is not None:
            b = [shown_imgs[before_name][r] for r in sheet_rows]
            a = [shown_imgs[name][r] for r in sheet_rows]
            ex = extra_imgs[: len(sheet_rows)] if extra_imgs is not None else None
            sheet = contact_sheet(
                b,
                a,
                title,
                [label(r) for r in sheet_rows],
                cfg.sheet_tile,
                ex,
                cfg.extra_label,
                notes=[note[r] for r in sheet_rows],
                marks=[mark[r] for r in sheet_rows],
                legend=row_marks.legend,
            )
            res.sheet = storefs.join(sheets, f"{name}.png")
            storefs.write_bytes_atomic(res.sheet, png_bytes(sheet), so)
        img_dir = lambda n: f"gallery/{n}" if n in in_gallery else n  # noqa: E731
        columns = ([ORIGINALS] if before_name and name != ORIGINALS else []) + [name]
        if extra_imgs is not None:
            columns.append(cfg.extra_label)
        sec = GallerySection(
            title,
            columns,
            sheet=f"sheets/{name}.png" if res.sheet else None,
            legend=row_marks.legend,
        )
        for i, r in enumerate(shown[: cfg.gallery_rows].tolist()):
            cells: list[str | None] = []
            if before_name and name != ORIGINALS:
                cells.append(f"{img_dir(before_name)}/{row_file(r, cfg.suffix)}")
            cells.append(f"{img_dir(name)}/{row_file(r, cfg.suffix)}")
            if extra_imgs is not None:
                im = extra_imgs[i]
                if im is None:
                    cells.append(None)
                else:
                    dst = storefs.join(extras_dir, name, row_file(r, ".png"))
                    storefs.write_bytes(dst, encode_image(im, "png"), so)
                    cells.append(f"extra/{name}/{row_file(r, '.png')}")
            sec.rows.append(GalleryRow(label(r), cells, note[r], mark[r]))
        sections.append(sec)
        marked_shown[name] = [r for r in row_id if mark[r]]
    page = write_gallery(out, sections, "deltaedit gallery", so)
    now = RenderedNames(
        folders={r.name for r in results if r.name not in gallery_only},
        gallery=set(in_gallery),
        extra={r.name for r in results},
        sheets={r.name for r in results if r.sheet},
    )
    prune_render(out, previous, now, so, log)
    info = {
        "edits": [r.name for r in results],
        "rows_shown": shown.tolist(),
        "rows_marked": marked_shown,  # per edit: the shown rows render.row_marks marks
        "format": cfg.format,
        "shards": cfg.shards,
    }
    storefs.write_text_atomic(storefs.join(out, "render.json"), json.dumps(info, indent=2), so)
    log(f"render: {sum(r.n_images for r in results)} images, gallery {page}")
    return results


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(files: Sequence[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes) members, mtime 0 (the same bytes every run)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
