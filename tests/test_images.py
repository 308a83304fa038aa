"""Safe listing, reading and decoding of untrusted image files and tar shards."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import images
from stages.images import (
    OK,
    TOO_LARGE,
    UNREADABLE,
    SourceReader,
    decode_rgb,
    list_sources,
    probe,
    scan_folder,
    to_rgb,
)


def _rgb(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds almost nothing."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))


def make_image_files(root: Path) -> dict[str, str]:
    """Every kind of file an ingest meets; returns {relative path: expected outcome}."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[rel] = outcome

    base = _rgb(16, 1)
    put("good/a.jpg", _bytes(base, "JPEG", quality=90), OK)
    put("good/b.png", _bytes(_rgb(20, 2), "PNG"), OK)
    put("good/c.webp", _bytes(_rgb(12, 3), "WEBP"), OK)
    put("good/d.bmp", _bytes(_rgb(8, 4), "BMP"), OK)
    put("good/e.gif", _bytes(_rgb(8, 5).convert("P"), "GIF"), OK)
    put("good/f.TIFF", _bytes(_rgb(8, 6), "TIFF"), OK)
    put("modes/cmyk.jpg", _bytes(_rgb(16, 7).convert("CMYK"), "JPEG"), OK)
    put("modes/gray.png", _bytes(_rgb(16, 8).convert("L"), "PNG"), OK)
    put("modes/palette.png", _bytes(_rgb(16, 9).convert("P"), "PNG"), OK)
    rgba = _rgb(16, 10).convert("RGBA")
    rgba.putalpha(128)
    put("modes/rgba.png", _bytes(rgba, "PNG"), OK)
    g16 = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 256)
    put("modes/gray16.png", _bytes(g16, "PNG"), OK)
    put("bad/empty.jpg", b"", UNREADABLE)
    full = _bytes(_rgb(64, 11), "JPEG", quality=95)
    put("bad/truncated.jpg", full[: len(full) // 2], UNREADABLE)
    png = _bytes(_rgb(64, 12), "PNG")
    put("bad/truncated.png", png[: len(png) // 2], UNREADABLE)
    put("bad/text.png", b"this is not an image at all\n" * 10, UNREADABLE)
    put("bad/huge.png", huge_png_header(50_000, 50_000), TOO_LARGE)
    put("notes.txt", b"not listed", "")  # wrong extension: not a row
    del expect["notes.txt"]
    return expect


def test_scan_folder_is_sorted_recursive_and_filters_extensions(tmp_path):
    expect = make_image_files(tmp_path / "imgs")
    listed = scan_folder(tmp_path / "imgs")
    assert listed == sorted(expect)
    assert "notes.txt" not in listed


def test_scan_folder_survives_a_symlink_loop(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    _rgb().save(root / "sub" / "x.png")
    os.symlink(root, root / "sub" / "loop")  # sub/loop -> root: a cycle
    listed = scan_folder(root)
    assert listed == ["sub/x.png"]


def test_probe_outcomes_for_every_kind_of_file(tmp_path):
    expect = make_image_files(tmp_path / "imgs")
    with SourceReader(tmp_path / "imgs") as reader:
        for rel, outcome in expect.items():
            got = probe(reader.read(rel), max_pixels=10_000_000)
            assert got.outcome == outcome, (rel, got)
            assert len(got.sha256) == 64
            if outcome == OK:
                assert got.size[0] > 0 and got.size[1] > 0


def test_too_large_is_refused_before_decoding(monkeypatch):
    data = _bytes(_rgb(64), "PNG")
    calls = []
    monkeypatch.setattr(Image.Image, "load", lambda self: calls.append(1))
    got = probe(data, max_pixels=64 * 64 - 1)
    assert got.outcome == TOO_LARGE and "max_pixels" in got.reason
    assert calls == []  # the header alone decided
    with pytest.raises(ValueError):
        decode_rgb(data, max_pixels=100)


def test_modes_convert_to_8bit_rgb():
    g16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    out = to_rgb(g16)
    assert out.mode == "RGB" and np.asarray(out).min() == 255  # full scale, not clipped wrong
    mid = to_rgb(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)))
    assert abs(int(np.asarray(mid)[0, 0, 0]) - 128) <= 1
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white
    assert np.asarray(to_rgb(rgba)).min() == 255
    cmyk = to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() == 255
    for mode in ("L", "P", "1", "LA", "I", "F"):
        assert to_rgb(Image.new(mode, (4, 4))).mode == "RGB"


def test_unreadable_file_is_an_error_the_caller_can_catch(tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    _rgb().save(p)
    p.chmod(0)
    if os.access(p, os.R_OK):  # root ignores permissions: make open() refuse like the OS would

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(p))

        monkeypatch.setattr(images, "open", refuse, raising=False)
    try:
        with SourceReader(tmp_path) as reader, pytest.raises(PermissionError):
            reader.read("locked.png")
    finally:
        p.chmod(0o644)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        _tar_add(tf, "s001.jpg", _bytes(_rgb(16, 1), "JPEG"))
        _tar_add(tf, "s001.json", b"{}")
        _tar_add(tf, "s002.png", _bytes(_rgb(16, 2), "PNG"))
        _tar_add(tf, "s002.txt", b"caption")
        _tar_add(tf, "s003.cls", b"3")  # no image member: not a row
        _tar_add(tf, "/abs/evil.png", _bytes(_rgb(8), "PNG"))
        _tar_add(tf, "../up.png", _bytes(_rgb(8), "PNG"))
        link = tarfile.TarInfo("link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)


def test_tar_shard_rows_and_refusals(tmp_path):
    make_tar(tmp_path / "shard-000.tar")
    entries = list_sources(tmp_path / "shard-000.tar")
    by_source = {e.source: e.refused for e in entries}
    assert by_source["shard-000.tar::s001.jpg"] == ""
    assert by_source["shard-000.tar::s002.png"] == ""
    assert "absolute" in by_source["shard-000.tar::/abs/evil.png"]
    assert ".." in by_source["shard-000.tar::../up.png"]
    assert "link" in by_source["shard-000.tar::link.png"]
    assert not any("s003" in s for s in by_source)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with SourceReader(tmp_path) as reader:
        img = decode_rgb(reader.read("shard-000.tar::s001.jpg"), 1_000_000)
        assert img.size == (16, 16)
        for bad in ("shard-000.tar::../up.png", "shard-000.tar::link.png"):
            with pytest.raises(ValueError):
                reader.read(bad)
        with pytest.raises(ValueError):
            reader.read("../outside.png")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted


def test_folder_with_tar_shards_lists_both(tmp_path):
    make_tar(tmp_path / "shards" / "a.tar") if (tmp_path / "shards").mkdir() is None else None
    _rgb().save(tmp_path / "z.png")
    sources = [e.source for e in list_sources(tmp_path)]
    assert sources == sorted(sources)
    assert "z.png" in sources and "shards/a.tar::s001.jpg" in sources


def test_corrupt_tar_is_one_refused_row(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 100)
    entries = list_sources(tmp_path)
    assert len(entries) == 1 and entries[0].refused


def test_image_extensions_cover_the_common_formats():
    assert set(images.IMAGE_EXTENSIONS) >= {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif"}


def test_a_mode_that_cannot_convert_is_unsupported_mode(monkeypatch):
    def refuse(img):
        raise ValueError(f"conversion from {img.mode} not supported")

    monkeypatch.setattr(images, "to_rgb", refuse)
    got = probe(_bytes(_rgb(8), "PNG"), max_pixels=1000)
    assert got.outcome == images.UNSUPPORTED_MODE and "not supported" in got.reason
    assert got.size == (8, 8)


def test_decode_at_encode_time_is_bounded_too():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_rgb(huge_png_header(5000, 5000), max_pixels=1_000_000)
