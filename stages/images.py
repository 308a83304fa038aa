"""Untrusted image files: listing, safe reading, bounded decoding.

Everything here treats image files as data from strangers:

- a folder is listed with `os.walk(followlinks=True)` and a set of visited
  (device, inode) pairs, so a symlink loop is walked once, never forever;
- tar shards (webdataset layout) are read member by member and never extracted
  to disk; members with an absolute path, `..`, or that are links or devices are
  refused (a row with a reason, never a crash);
- a header is read first and an image whose header claims more than
  `max_pixels` is refused before any pixel is decoded (`TOO_LARGE`);
  Pillow's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) stays on and
  its error maps to `TOO_LARGE` too;
- every other mode (CMYK, L, P, RGBA, LA, 1, 16-bit I;16, 32-bit I/F) converts
  to 8-bit RGB; alpha is composited over white.

A row's `source` is a path relative to the ingest root (`a/b.jpg`) or a tar
member (`shard-000.tar::key.jpg`).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SEP = "::"
MAX_FILE_BYTES = 1 << 30  # a single image file larger than 1 GiB is refused unread

# row outcomes of a probe (names match store.Status members)
OK, UNREADABLE, TOO_LARGE, UNSUPPORTED_MODE = "OK", "UNREADABLE", "TOO_LARGE", "UNSUPPORTED_MODE"


@dataclass(frozen=True)
class Entry:
    """One listed row: its source string and, for refused tar members, why."""

    source: str
    refused: str = ""  # non-empty: refused at listing time (unsafe tar member), the reason


@dataclass(frozen=True)
class Probe:
    """What decoding one file found: an outcome name, (width, height), sha256, reason."""

    outcome: str
    size: tuple[int, int] = (0, 0)
    sha256: str = ""
    reason: str = ""


# --- listing ---------------------------------------------------------------------------------


def _has_ext(name: str, extensions: Iterable[str]) -> bool:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext in {e.lower().lstrip(".") for e in extensions}


def scan_folder(root: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative POSIX paths of image files and `.tar` shards under `root`, sorted.

    Follows directory symlinks but visits each real directory once (loop-safe).
    """
    root = Path(root)
    exts = tuple(extensions)
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a symlink back to a directory already walked
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if _has_ext(name, exts) or name.lower().endswith(".tar"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(Path(rel).as_posix())
    return sorted(found)


def unsafe_member_reason(info: tarfile.TarInfo) -> str:
    """Why a tar member may not be read ('' when it is a plain, relative, in-tree file)."""
    name = info.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
        return f"tar member {name!r}: absolute path refused"
    parts = posixpath.normpath(name).split("/")
    if ".." in name.split("/") or parts[0] == "..":
        return f"tar member {name!r}: '..' in path refused"
    if info.issym() or info.islnk():
        return f"tar member {name!r}: link refused"
    if not info.isreg():
        return f"tar member {name!r}: not a regular file"
    return ""


def scan_tar(
    tar_path: str | Path, rel: str, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[Entry]:
    """Rows of one webdataset shard: members grouped by key (path up to the first dot of
    the basename); the image member of a group is the first with an image extension.
    Unsafe members with an image extension become refused rows."""
    exts = tuple(extensions)
    groups: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(tar_path, mode="r:") as tf:
        for info in tf:
            if info.isdir():
                continue
            base = posixpath.basename(info.name)
            key = posixpath.join(posixpath.dirname(info.name), base.split(".", 1)[0])
            groups.setdefault(key, []).append(info)
    entries: list[Entry] = []
    for key in sorted(groups):
        images = [m for m in groups[key] if _has_ext(m.name, exts)]
        if not images:
            continue
        member = sorted(images, key=lambda m: m.name)[0]
        entries.append(Entry(f"{rel}{TAR_SEP}{member.name}", unsafe_member_reason(member)))
    return entries


def list_sources(path: str | Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Entry]:
    """Every row an ingest of `path` (a folder, or one `.tar` shard) will hold, sorted."""
    path = Path(path)
    if path.is_file():
        if not path.name.lower().endswith(".tar"):
            raise ValueError(f"{path}: expected a folder of images or a .tar shard")
        return scan_tar(path, path.name, extensions)
    entries: list[Entry] = []
    for rel in scan_folder(path, extensions):
        if rel.lower().endswith(".tar"):
            try:
                entries.extend(scan_tar(path / rel, rel, extensions))
            except (tarfile.TarError, OSError) as exc:
                entries.append(Entry(rel, f"unreadable tar shard: {exc}"))
        else:
            entries.append(Entry(rel))
    entries.sort(key=lambda e: e.source)
    return entries


def source_root(path: str | Path) -> Path:
    """The folder sources are relative to (the folder itself, or the tar's folder)."""
    path = Path(path).resolve()
    return path.parent if path.is_file() else path


# --- reading ---------------------------------------------------------------------------------


class SourceReader:
    """Reads the bytes of many sources, opening each tar shard once.

    Use as a context manager; `read(source)` raises OSError / ValueError for a
    source that cannot be read (the caller turns that into a row status).
    """

    def __init__(self, root: str | Path, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self._lock = threading.Lock()  # tar members share one file handle across threads

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for tf, _ in self._tars.values():
            tf.close()
        self._tars.clear()

    def _tar(self, rel: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if rel not in self._tars:
            tf = tarfile.open(self._path(rel), mode="r:")
            self._tars[rel] = (tf, {m.name: m for m in tf.getmembers()})
        return self._tars[rel]

    def _path(self, rel: str) -> Path:
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"{rel!r}: source outside the ingest root refused")
        return self.root / p

    def read(self, source: str) -> bytes:
        if TAR_SEP in source:
            with self._lock:
                return self._read_member(source)
        path = self._path(source)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise ValueError(f"{source}: {size} bytes, over the {self.max_bytes} limit")
        with open(path, "rb") as f:
            return f.read(self.max_bytes + 1)

    def _read_member(self, source: str) -> bytes:
        rel, member = source.split(TAR_SEP, 1)
        tf, members = self._tar(rel)
        info = members.get(member)
        if info is None:
            raise OSError(f"{source}: member not in the shard")
        reason = unsafe_member_reason(info)
        if reason:
            raise ValueError(reason)
        if info.size > self.max_bytes:
            raise ValueError(f"{source}: {info.size} bytes, over the {self.max_bytes} limit")
        f = tf.extractfile(info)
        if f is None:
            raise OSError(f"{source}: no data")
        return f.read()


# --- decoding --------------------------------------------------------------------------------


class _TooLarge(ValueError):
    def __init__(self, message: str, size: tuple[int, int]) -> None:
        super().__init__(message)
        self.size = size


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse an image whose header claims more than max_pixels."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise _TooLarge(f"{w}x{h} = {w * h} pixels, over max_pixels={max_pixels}", (w, h))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16/32-bit integer images scale to 8 bits; alpha over white."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            hi = 65535.0 if a.max(initial=0) <= 65535 else float(a.max())
            a = a * (255.0 / hi)
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> fully decoded 8-bit RGB image. Raises on anything not decodable."""
    img = _open_checked(data, max_pixels)
    img.load()
    return to_rgb(img)


def probe(data: bytes, max_pixels: int) -> Probe:
    """Decode-verify one file's bytes: outcome, size and sha256; never raises."""
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return Probe(UNREADABLE, sha256=sha, reason="empty file")
    try:
        img = _open_checked(data, max_pixels)
        size = img.size
        img.load()  # the whole decode: catches truncation
    except _TooLarge as exc:
        return Probe(TOO_LARGE, exc.size, sha, str(exc))
    except Image.DecompressionBombError as exc:
        return Probe(
            TOO_LARGE, sha256=sha, reason=f"refused by the decompression-bomb guard: {exc}"
        )
    except UnidentifiedImageError:
        return Probe(UNREADABLE, sha256=sha, reason="not an image")
    except Exception as exc:  # noqa: BLE001 - plugins raise many types on hostile input
        return Probe(UNREADABLE, sha256=sha, reason=f"cannot decode: {exc}")
    try:
        to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        return Probe(UNSUPPORTED_MODE, size, sha, f"mode {img.mode}: {exc}")
    return Probe(OK, size, sha)


def load_rgb_images(
    reader: SourceReader, sources: Iterable[str], max_pixels: int
) -> Iterator[Image.Image | None]:
    """Decoded RGB images in order; None for a source that no longer decodes."""
    for source in sources:
        try:
            yield decode_rgb(reader.read(source), max_pixels)
        except Exception:  # noqa: BLE001 - any failure of untrusted input is a row status
            yield None
