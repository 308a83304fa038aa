"""Render stage: contact sheets, the HTML gallery (opened in headless Chromium), the stage."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    assert "antisymmetric" not in title[1]
    anti = edit_title("smile", attrs | {"antisymmetric": True})
    assert "method mapper (antisymmetric)" in anti[1]
    pulled = edit_title("smile", attrs | {"antisymmetric": True, "mean_pull": 0.25})
    assert "method mapper (antisymmetric, mean pull 0.25)" in pulled[1]
    assert "method mapper, chord 0.2" in edit_title("smile", attrs | {"chord": 0.2})[1]
    assert "chord" not in title[1]
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
    page = Path(write_gallery(tmp_path, [sec], "test gallery"))
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
    data = open_in_chromium(Path(write_gallery(tmp_path, [sec], "t")))
    assert data.get("images-loaded") == "1" and data.get("images-broken") == "1"


# --- the stage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """The shared tiny dataset plus one edit over rows 0..11 (a sample of them)."""
    from test_edit import BAD_ROWS, edit_config, shared_dataset

    from stages.common import ExecutionConfig
    from stages.edit import EditSpec, Selection
    from stages.edit import run as run_edit

    ds = shared_dataset(tmp_path_factory)
    out = tmp_path_factory.mktemp("edits")
    spec = EditSpec("smile", "smiling face", alpha=2.0, beta=0.0)
    cfg = edit_config(ds, out, edits=(spec,), select=Selection(range=(0, 12)))
    run_edit(
        cfg, ExecutionConfig(device="cpu"), clip=ds["clip"], progress=False, log=lambda _: None
    )
    return ds, out / "edits", BAD_ROWS


def render_config(ds, edits_dir, out, **kw):
    from stages.render import RenderConfig

    base = {
        "edits_dir": str(edits_dir),
        "store": str(ds["root"]),
        "out_dir": str(out),
        "sheet_rows": 3,
        "gallery_rows": 4,
        "sheet_tile": 64,
    }
    return RenderConfig(**(base | kw))


def test_render_writes_images_sheet_and_gallery(edited, tmp_path):
    from stages.common import ExecutionConfig
    from stages.render import run, to_uint8
    from store import RowStore

    ds, edits_dir, bad = edited
    out = tmp_path / "render"
    extra = tmp_path / "truth" / "smile"  # e.g. the world's ground-truth counterparts
    extra.mkdir(parents=True)
    for r in range(20):
        Image.fromarray(image(r, 16)).save(extra / f"{r:08d}.png")
    cfg = render_config(ds, edits_dir, out, extra_dir=str(tmp_path / "truth"), extra_label="truth")
    res = run(
        cfg,
        execution=ExecutionConfig(device="cpu"),
        generator=ds["G"],
        progress=False,
        log=lambda _: None,
    )
    assert [r.name for r in res] == ["originals", "smile"]
    n_ok = 20 - len(bad)
    assert len(list((out / "originals").glob("*.png"))) == n_ok
    edited_rows = sorted(int(p.stem) for p in (out / "smile").glob("*.png"))
    assert edited_rows == [r for r in range(12) if r not in bad]
    # the file is the generator's render of the edited code
    s2 = RowStore.open(f"{edits_dir}/smile.zarr").read("s", rows=np.array([0]))
    import torch

    with torch.no_grad():
        want = to_uint8(ds["G"].synthesize(torch.as_tensor(s2)))[0]
    got = np.asarray(Image.open(out / "smile" / "00000000.png"))
    assert np.array_equal(got, want)
    sheet = Image.open(out / "sheets" / "smile.png")
    assert sheet.height > 3 * 64
    page = (out / "index.html").read_text()
    assert "smiling face" in page and "alpha 2" in page and "img-0" in page
    assert "<th>truth</th>" in page and "extra/smile/" in page
    if CHROMIUM:
        data = open_in_chromium(out / "index.html")
        assert data["images-loaded"] == data["images-total"] and data["images-broken"] == "0"
        # originals section + (before, after, truth) per row of the edit's section
        assert int(data["images-total"]) == 4 + 3 * 4
        assert "js-error" not in data


def test_render_tar_shards_jpeg_and_extra_column(edited, tmp_path):
    from stages.common import ExecutionConfig
    from stages.render import run

    ds, edits_dir, bad = edited
    out = tmp_path / "render"
    cfg = render_config(ds, edits_dir, out, shards=True, format="jpeg", originals=False)

    def extra(name, row):  # e.g. the world's ground-truth counterpart
        return None if row % 2 else np.full((16, 16, 3), 200, np.uint8)

    run(
        cfg,
        execution=ExecutionConfig(device="cpu"),
        generator=ds["G"],
        extra=extra,
        progress=False,
        log=lambda _: None,
    )
    shards = sorted((out / "smile").glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-00000.tar", "shard-00001.tar"]  # 8-row blocks
    names = [n for p in shards for n in tarfile.open(p).getnames()]
    assert len(names) == 12 - len([r for r in bad if r < 12])
    assert all(n.endswith(".jpg") for n in names)
    assert not list((out / "originals").glob("*.tar"))  # only the shown "before" rows
    page = (out / "index.html").read_text()
    assert "reference" in page and "extra/smile/" in page
    if CHROMIUM:
        data = open_in_chromium(out / "index.html")
        assert data["images-loaded"] == data["images-total"] and data["images-broken"] == "0"


# --- row labels and marks: data saying what each row is -----------------------------------


def _marked_rows(page: str) -> dict[int, str]:
    """{row index: mark text} of the gallery rows drawn as marked (label cell "<row>: <id>")."""
    return {
        int(row): mark
        for mark, row in re.findall(r'<tr class="marked" data-mark="([^"]*)"><td>(\d+):', page)
    }


def _row_band(sheet: np.ndarray, n_rows: int, i: int, tile: int = 64, pad: int = 6) -> np.ndarray:
    """Row i of a contact sheet (label column and tiles, frame included)."""
    head = sheet.shape[0] - n_rows * (tile + pad) - pad
    y = head + i * (tile + pad)
    return sheet[y - 2 : y + tile + 2]


def test_render_marks_exactly_the_rows_the_marks_file_names(edited, tmp_path):
    """A dataset's own labels: every row gets its caption, the rows named for an edit are
    framed and say why, on the sheet and in the gallery; the title names target and neutral."""
    import json

    from stages.common import ExecutionConfig
    from stages.render import MARK_RGB, run

    ds, edits_dir, bad = edited
    ok_rows = [r for r in range(12) if r not in bad]
    labels = {f"img-{r:03d}": f"caption of row {r}" for r in range(20)}
    marked = {ok_rows[0], ok_rows[2], ok_rows[3]}  # some shown, maybe some not
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    marks = {
        "legend": "already smiling: the edit does not apply",
        "edits": {"smile": {f"img-{r:03d}": "already smiling" for r in marked}},
    }
    (tmp_path / "marks.json").write_text(json.dumps(marks))
    common = {"gallery_rows": 12, "sheet_rows": 12, "row_labels": str(tmp_path / "labels.json")}
    runs = {}
    for name, extra in (("plain", {}), ("marked", {"row_marks": str(tmp_path / "marks.json")})):
        out = tmp_path / name
        cfg = render_config(ds, edits_dir, out, **(common | extra))
        run(cfg, execution=ExecutionConfig(device="cpu"), generator=ds["G"], progress=False,
            log=lambda _: None)  # fmt: skip
        info = json.loads((out / "render.json").read_text())
        page = (out / "index.html").read_text()
        sheet = np.asarray(Image.open(out / "sheets" / "smile.png").convert("RGB"))
        runs[name] = (info, page, sheet)
    info, page, sheet = runs["marked"]
    shown = info["rows_shown"]
    want = sorted(marked & set(shown))
    assert want  # the sample shows at least one marked row
    assert info["rows_marked"]["smile"] == want
    assert _marked_rows(page) == {r: "already smiling" for r in want}
    assert "already smiling: the edit does not apply" in page
    assert _marked_rows(runs["plain"][1]) == {} and "legend" not in runs["plain"][1]
    for r in shown:  # every row says what it is, with or without marks
        assert f"caption of row {r}" in page and f"caption of row {r}" in runs["plain"][1]
    # the sheet: an orange frame around exactly the marked rows; unmarked rows unchanged
    plain_sheet = runs["plain"][2]
    assert sheet.shape[1] == plain_sheet.shape[1] and sheet.shape[0] > plain_sheet.shape[0]
    n = len(shown)
    for i, r in enumerate(shown):
        band, before = _row_band(sheet, n, i), _row_band(plain_sheet, n, i)
        frame = (band == np.array(MARK_RGB, np.uint8)).all(axis=2).sum()
        if r in want:
            assert frame > 2 * 2 * 64 and not np.array_equal(band, before), r
        else:
            assert frame == 0 and np.array_equal(band, before), r
    # every sheet title (and gallery header) names target and neutral
    assert "<h2>smile: target &#x27;smiling face&#x27; (alpha 2), neutral &#x27;face&#x27;" in page


def test_row_label_files_bad_input_is_one_line(edited, tmp_path):
    from stages.common import ExecutionConfig
    from stages.render import run

    ds, edits_dir, _ = edited
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text('["a", "b"]')
    (tmp_path / "marks.json").write_text('{"edits": {"smile": {"img-000": 3}}}')
    cases = [
        ({"row_labels": str(tmp_path / "none.json")}, "render.row_labels: .*none.json not found"),
        ({"row_labels": str(tmp_path / "bad.json")}, "render.row_labels: .*is not JSON"),
        ({"row_labels": str(tmp_path / "list.json")}, "must map row ids to text"),
        ({"row_marks": str(tmp_path / "list.json")}, "render.row_marks: .*expected"),
        ({"row_marks": str(tmp_path / "marks.json")}, "edits.smile must map row ids to text"),
    ]
    for kw, msg in cases:
        cfg = render_config(ds, edits_dir, tmp_path / "out", **kw)
        with pytest.raises(ValueError, match=msg) as exc:
            run(cfg, execution=ExecutionConfig(device="cpu"), generator=ds["G"], progress=False,
                log=lambda _: None)  # fmt: skip
        assert "\n" not in str(exc.value)


def test_sheet_title_wraps_instead_of_cutting_the_neutral():
    from PIL import ImageDraw

    from stages.render import _font, _wrap

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "black_background: target 'black background' (alpha 1), neutral 'white background'"
    lines = _wrap(draw, text, 200, _font())
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(draw.textlength(ln, font=_font()) <= 200 for ln in lines)
    long = contact_sheet([image(0)], [image(1)], [text], ["a"], tile=64)
    short = contact_sheet([image(0)], [image(1)], ["x"], ["a"], tile=64)
    assert long.height > short.height  # the whole title is there, on more lines


def test_render_prunes_what_it_made_for_an_edit_gone_and_keeps_user_files(edited, tmp_path):
    """An edit removed (and its store pruned by the edit stage): the next render removes
    its folder, sheet, gallery and extra images, and the folder equals a render from
    scratch but for the user's files, which stay."""
    from dataclasses import replace

    from test_edit import edit_config
    from test_incremental import tree

    from stages.common import ExecutionConfig
    from stages.edit import EditSpec, Selection
    from stages.edit import run as run_edit
    from stages.render import run

    ds = edited[0]
    ex = ExecutionConfig(device="cpu", batch_size=4)
    smile = EditSpec("smile", "smiling face", alpha=2.0, beta=0.0)
    frown = EditSpec("frown", "frowning face", alpha=2.0, beta=0.0)
    ecfg = edit_config(ds, tmp_path, edits=(smile, frown), select=Selection(range=(0, 6)))
    run_edit(ecfg, ex, clip=ds["clip"], progress=False, log=lambda _: None)
    out, truth = tmp_path / "render", tmp_path / "truth"
    for name in ("smile", "frown"):
        (truth / name).mkdir(parents=True)
        for r in range(6):
            Image.fromarray(image(r, 16)).save(truth / name / f"{r:08d}.png")

    def render(out, **kw) -> list[str]:
        lines: list[str] = []
        cfg = render_config(ds, tmp_path / "edits", out, extra_dir=str(truth), **kw)
        run(cfg, execution=ex, generator=ds["G"], progress=False, log=lines.append)
        return lines

    render(out, shards=True)  # gallery/<edit>/ too
    assert (out / "frown" / "shard-00000.tar").exists() and (out / "gallery" / "frown").is_dir()
    lines = render(out)  # loose files now: the tar shards and the gallery copies go
    assert f"render: removed {out / 'gallery' / 'frown'} (no longer rendered)" in lines
    assert not (out / "gallery").exists() and not list(out.rglob("*.tar"))
    assert (out / "sheets" / "frown.png").exists() and (out / "extra" / "frown").is_dir()
    user = {
        "notes.txt": b"mine",
        "mine/00000001.png": encode_image(image(1), "png"),  # no record: not render's
        "frown/keep.txt": b"mine too",
        "sheets/README": b"sheets of mine",
    }
    for rel, data in user.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    run_edit(replace(ecfg, edits=(smile,)), ex, clip=ds["clip"], progress=False, log=lambda _: None)
    lines = render(out)
    assert f"render: removed {out / 'frown'} (no longer rendered; other files in it kept)" in lines
    assert f"render: removed {out / 'sheets' / 'frown.png'} (no longer rendered)" in lines
    assert f"render: removed {out / 'extra' / 'frown'} (no longer rendered)" in lines
    assert any("render smile: 5 images (rendered 0, reused 5" in ln for ln in lines), lines
    got = tree(out)
    assert {k: got.pop(k) for k in user} == user  # the user's files are all there
    render(tmp_path / "scratch")
    assert got == tree(tmp_path / "scratch")
