"""Stage `ingest` and `import-official`: every bad input is a row, resume, CLI."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_images import make_image_files, make_tar

from model.stylegan2 import create_generator
from pipeline.cli import main
from stages import images
from stages.common import ExecutionConfig, GeneratorRef
from stages.ingest import (
    ImportOfficialConfig,
    IngestConfig,
    IngestError,
    make_ids,
    run_import_official,
    run_ingest,
)
from store import RowStore, Status, StoreError

EXEC = ExecutionConfig(workers=2)


def _folder(tmp_path: Path) -> tuple[Path, dict[str, Status]]:
    """A folder with every kind of file; returns it and {source: expected status}."""
    src = tmp_path / "src"
    expect = {k: Status[v] for k, v in make_image_files(src).items()}
    shutil.copy(src / "good/a.jpg", src / "good/z_copy_of_a.jpg")
    expect["good/z_copy_of_a.jpg"] = Status.DUPLICATE
    (src / "locked").mkdir()
    shutil.copy(src / "good/b.png", src / "locked/secret.png")
    (src / "locked/secret.png").write_bytes(b"\x89PNG different bytes")  # not a duplicate
    expect["locked/secret.png"] = Status.UNREADABLE
    make_tar(src / "shards.tar")
    expect["shards.tar::s001.jpg"] = Status.OK
    expect["shards.tar::s002.png"] = Status.OK
    for bad in ("/abs/evil.png", "../up.png", "link.png"):
        expect[f"shards.tar::{bad}"] = Status.UNREADABLE
    os.symlink(src, src / "good" / "loop")  # a directory symlink back to the root
    return src, expect


def _deny(monkeypatch, name: str) -> None:
    """Make reading one file fail with EACCES (chmod alone does not stop root)."""
    real_open = open

    def guarded(path, *args, **kwargs):
        if str(path).endswith(name):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", guarded, raising=False)


def test_ingest_gives_every_bad_file_a_status_and_loses_no_row(tmp_path, monkeypatch):
    src, expect = _folder(tmp_path)
    (src / "locked/secret.png").chmod(0)
    _deny(monkeypatch, "locked/secret.png")
    cfg = IngestConfig(source=str(src), out=str(tmp_path / "ds"), rows_per_shard=4)
    result = run_ingest(cfg, EXEC, progress=False)
    m = RowStore.open(result.manifest, require_complete=True)
    sources = m.read("source").tolist()
    assert sources == sorted(expect)  # every file once (loop walked once), sorted
    status = m.status()
    got = {s: Status(int(v)) for s, v in zip(sources, status, strict=True)}
    assert got == expect
    reasons = dict(zip(sources, m.read("reason").tolist(), strict=True))
    for s, st in expect.items():
        assert (reasons[s] == "") == (st == Status.OK), s
    assert "good/a.jpg" in reasons["good/z_copy_of_a.jpg"]
    assert "max_pixels" in reasons["bad/huge.png"] or "bomb" in reasons["bad/huge.png"]
    assert "Permission denied" in reasons["locked/secret.png"]
    sizes = dict(zip(sources, m.read("size").tolist(), strict=True))
    assert sizes["good/b.png"] == [20, 20]
    sha = dict(zip(sources, m.read("sha256").tolist(), strict=True))
    assert sha["good/a.jpg"] == sha["good/z_copy_of_a.jpg"] != sha["good/b.png"]
    # the summary: counts + one line per problem row
    line = result.summary.line()
    assert f"ok {sum(v == Status.OK for v in expect.values())}" in line
    assert "DUPLICATE 1" in line and "TOO_LARGE 1" in line
    problems = [s for s, st in expect.items() if st != Status.OK]
    assert len(result.lines) == len(problems)
    for s in problems:
        assert any(s in ln for ln in result.lines), s
    # the scratch store is gone and nothing was extracted anywhere
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["manifest.zarr"]
    (src / "locked/secret.png").chmod(0o644)


def test_color_modes_are_kept_not_rejected(tmp_path):
    src, expect = _folder(tmp_path)
    result = run_ingest(IngestConfig(source=str(src), out=str(tmp_path / "ds")), EXEC, False)
    m = RowStore.open(result.manifest)
    got = dict(zip(m.read("source").tolist(), m.status().tolist(), strict=True))
    for name in ("cmyk.jpg", "gray.png", "palette.png", "rgba.png", "gray16.png"):
        assert got[f"modes/{name}"] == Status.OK


def test_rerun_reuses_probes_and_a_grown_folder_updates_in_place(tmp_path):
    src, _ = _folder(tmp_path)
    cfg = IngestConfig(source=str(src), out=str(tmp_path / "ds"), rows_per_shard=4)
    first = run_ingest(cfg, EXEC, progress=False)
    before = RowStore.open(first.manifest).read("sha256")
    again = run_ingest(cfg, EXEC, progress=False)
    assert again.counts.reused == int((before != "").sum()) and again.counts.dropped == 0
    assert np.array_equal(RowStore.open(again.manifest).read("sha256"), before)
    (src / "new.png").write_bytes((src / "good/b.png").read_bytes())
    grown = run_ingest(cfg, EXEC, progress=False)  # no error: the change is in the rows
    assert not any("started over" in ln for ln in grown.lines)
    assert grown.counts.dropped == 0 and grown.counts.reused == again.counts.reused + 1
    m = RowStore.open(grown.manifest)
    assert "new.png" in m.read("source").tolist()
    st = dict(zip(m.read("source").tolist(), m.status().tolist(), strict=True))
    assert st["new.png"] == Status.DUPLICATE  # same bytes as good/b.png, which sorts first
    with pytest.raises(StoreError, match="max_pixels"):
        run_ingest(dataclasses.replace(cfg, max_pixels=10), EXEC, progress=False)
    redone = run_ingest(
        dataclasses.replace(cfg, max_pixels=10), EXEC, progress=False, restart_on_change=True
    )
    assert any("started over" in ln for ln in redone.lines)


def test_ingest_of_one_tar_shard_reads_members_in_place(tmp_path):
    make_tar(tmp_path / "shard.tar")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cfg = IngestConfig(source=str(tmp_path / "shard.tar"), out=str(tmp_path / "ds"))
    m = RowStore.open(run_ingest(cfg, EXEC, progress=False).manifest)
    assert m.read("ids").tolist() == ["shard/../up", "shard/abs/evil", "shard/link"] + [
        "shard/s001",
        "shard/s002",
    ]
    assert m.status().tolist() == [Status.UNREADABLE] * 3 + [Status.OK] * 2
    after = sorted(str(p) for p in tmp_path.rglob("*") if "ds" not in Path(p).parts[-10:])
    assert [p for p in after if not p.startswith(str(tmp_path / "ds"))] == before


def test_empty_or_missing_source_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no images found"):
        run_ingest(IngestConfig(source=str(tmp_path / "empty"), out=str(tmp_path)), EXEC, False)
    runner = CliRunner()
    res = runner.invoke(main, ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "no such folder" in res.output
    assert "Traceback" not in res.output


def test_ids_drop_extensions_unless_ambiguous():
    assert make_ids(["a/b.jpg", "a/c.png", "s.tar::k1.jpg"]) == ["a/b", "a/c", "s/k1"]
    assert make_ids(["x.jpg", "x.png"]) == ["x.jpg", "x.png"]


def test_ingest_cli_prints_summary_and_problem_lines(tmp_path):
    src, expect = _folder(tmp_path)
    res = CliRunner().invoke(
        main,
        ["ingest", str(src), "--out", str(tmp_path / "ds"), "-q", "--params", os.devnull],
    )
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(f"ingest: {len(expect)} rows")
    assert "DUPLICATE: good/z_copy_of_a.jpg" in res.output
    assert "refused" in res.output


# --- import-official ---------------------------------------------------------------------------


def _official(tmp_path: Path, n: int = 10, conv_only: bool = True):
    """Fake published files made with the tiny generator's layout."""
    G = create_generator("tiny-64", seed=0)
    z = torch.randn(n, G.config.in_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wplus = G.wplus(G.mapping(z))
        s = G.w_to_s(wplus).numpy()
    paths = {
        "sspace": tmp_path / "sspace_t_feat.npy",
        "cspace": tmp_path / "cspace_t_feat.npy",
        "wspace": tmp_path / "wspace_t_feat.npy",
    }
    np.save(paths["sspace"], s[:, G.layout.conv_index()] if conv_only else s)
    np.save(paths["cspace"], np.random.default_rng(0).standard_normal((n, 16)).astype("f4"))
    np.save(paths["wspace"], wplus.numpy())
    return G, s, {k: str(v) for k, v in paths.items()}


def test_import_official_maps_conv_only_s_into_the_full_layout(tmp_path):
    G, s, paths = _official(tmp_path)
    cfg = ImportOfficialConfig(**paths, out=str(tmp_path / "ds"), rows_per_shard=4)
    result = run_import_official(cfg, GeneratorRef(), EXEC, progress=False)
    assert not result.conv_only and result.lines == []
    s_store = RowStore.open(str(tmp_path / "ds/s.zarr"), require_complete=True)
    assert np.array_equal(s_store.read("s"), s)  # conv from sspace, toRGB from w_to_s(W+)
    assert s_store.attrs["conv_only"] is False
    assert s_store.attrs["layout"] == G.layout.to_dict()
    c_store = RowStore.open(str(tmp_path / "ds/clip.zarr"))
    assert np.array_equal(c_store.read("embed"), np.load(paths["cspace"]))
    assert c_store.attrs["normalized"] is False
    m = RowStore.open(str(tmp_path / "ds/manifest.zarr"))
    assert m.read("ids")[:2].tolist() == ["official-000000", "official-000001"]
    assert (m.status() == Status.OK).all()


def test_import_official_stores_conv_only_with_layout_when_asked(tmp_path):
    G, s, paths = _official(tmp_path)
    del paths["wspace"]
    cfg = ImportOfficialConfig(**paths, out=str(tmp_path / "ds"), full_s=False)
    result = run_import_official(cfg, GeneratorRef(), EXEC, progress=False)
    assert result.conv_only
    s_store = RowStore.open(str(tmp_path / "ds/s.zarr"))
    assert s_store.attrs["conv_only"] is True
    assert s_store.read("s").shape == (10, G.layout.conv_dim)
    assert np.array_equal(s_store.read("s"), s[:, G.layout.conv_index()])


def test_import_official_explains_what_is_missing(tmp_path):
    G, s, paths = _official(tmp_path)
    no_w = {k: v for k, v in paths.items() if k != "wspace"}
    with pytest.raises(IngestError, match="wspace is not set"):
        run_import_official(
            ImportOfficialConfig(**no_w, out=str(tmp_path / "a")), GeneratorRef(), EXEC, False
        )
    with pytest.raises(IngestError, match="style channels"):
        run_import_official(
            ImportOfficialConfig(**paths, out=str(tmp_path / "b")),
            GeneratorRef(config="world-32"),
            EXEC,
            False,
        )
    np.save(paths["cspace"], np.zeros((3, 16), "f4"))
    with pytest.raises(IngestError, match="rows"):
        run_import_official(
            ImportOfficialConfig(**paths, out=str(tmp_path / "c")), GeneratorRef(), EXEC, False
        )
    res = CliRunner().invoke(
        main, ["import-official", "--sspace", str(tmp_path / "nope.npy"), "--cspace", "x.npy"]
    )
    assert res.exit_code != 0 and "no such file" in res.output and "Traceback" not in res.output


def test_import_official_warns_when_the_generator_does_not_match(tmp_path):
    _, _, paths = _official(tmp_path)
    cfg = ImportOfficialConfig(**paths, out=str(tmp_path / "ds"))
    result = run_import_official(cfg, GeneratorRef(seed=5), EXEC, progress=False)
    assert any("not the one these latents came from" in ln for ln in result.lines)
