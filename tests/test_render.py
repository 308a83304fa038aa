"""Render stage: contact sheets, the HTML gallery (opened in headless Chromium), the stage."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from stages.render import (
    GalleryRow,
    GallerySection,
    contact_sheet,
    edit_title,
    encode_image,
    to_uint8,
    write_gallery,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NEED_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed: `apt-get update && apt-get install -y chromium`",
)


def open_in_chromium(page) -> dict[str, str]:
    """Load a local page headless; return the data-* attributes its script set on <body>."""
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, out.stdout[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


def image(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_to_uint8_maps_minus_one_one_to_bytes():
    x = np.array([[[[-2.0, -1.0, 0.0, 1.0, 3.0]]] * 3])  # [1, 3, 1, 5]
    out = to_uint8(x)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_contact_sheet_writes_title_and_pairs():
    attrs = {
        "stage": "edit",
        "targets": ["smiling face"],
        "alphas": [1.5],
        "neutral": "face",
        "beta": 0.03,
        "levels": ["coarse", "fine"],
        "method": "mapper",
    }
    title = edit_title("smile", attrs)
    assert "smiling face" in title[0] and "1.5" in title[0] and "0.03" in title[1]
    before, after = [image(0), image(1)], [image(2), image(3)]
    sheet = contact_sheet(before, after, title, ["a", "b"], tile=64)
    blank = contact_sheet(before, after, [], [], tile=64)
    arr = np.asarray(sheet)
    assert sheet.width >= 2 * 64 and sheet.height > 2 * 64
    # the title block holds dark text pixels; the tiles hold the (upscaled) images
    assert (arr[:20].min(axis=2) < 100).any()
    assert sheet.height > blank.height
    tile_after = arr[-64 - 6 : -6]  # last row of tiles
    assert tile_after.std() > 30


@NEED_CHROMIUM
def test_gallery_opens_from_disk_and_every_image_loads(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "extra").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(encode_image(image(i), "png"))
        (tmp_path / "extra" / f"{i}.jpg").write_bytes(encode_image(image(i + 9), "jpeg"))
    sec = GallerySection(
        ["edit a: 'smiling <face>' & \"x\"", "beta 0.03"],
        ["after", "reference"],
        [GalleryRow(f"row {i}", [f"a/{i}.png", f"extra/{i}.jpg"]) for i in range(3)],
    )
    page = write_gallery(tmp_path, [sec], "test gallery")
    text = page.read_text()
    assert "file://" not in text and str(tmp_path) not in text  # relative links only
    assert "&lt;face&gt;" in text
    data = open_in_chromium(page)
    assert data.get("images-total") == "6"
    assert data.get("images-loaded") == "6"
    assert data.get("images-broken") == "0"
    assert "js-error" not in data


@NEED_CHROMIUM
def test_gallery_check_notices_a_missing_image(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode_image(image(0), "png"))
    sec = GallerySection(["x"], ["img"], [GalleryRow("r", ["ok.png"]), GalleryRow("s", ["no.png"])])
    data = open_in_chromium(write_gallery(tmp_path, [sec], "t"))
    assert data.get("images-loaded") == "1" and data.get("images-broken") == "1"
