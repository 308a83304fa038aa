"""A changed image folder re-encodes only what changed (issue 15).

ingest + encode-clip + encode-s over a folder, then files added / removed / changed /
renamed: the rerun computes only the new or changed rows, reuses the rest by the sha256
of their bytes, and ends bitwise-equal to a from-scratch run on the new folder, also
after a SIGKILL at any step of the update.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image
from test_store_resume import snapshot

from pipeline.cli import main
from stages import encode_clip, encode_s
from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef
from stages.encode_clip import EncodeClipConfig, run_encode_clip
from stages.encode_s import EncodeSConfig, run_encode_s
from stages.ingest import IngestConfig, run_ingest
from store import RowStore, Status
from store.inspect import verify_store
from store.update import ReuseRefused

ROOT = Path(__file__).resolve().parents[1]
EXEC = ExecutionConfig(workers=2, batch_size=4)
N = 12
RPS = 4


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def make_folder(root: Path) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(N):
        _image(src / f"img{i:02d}.png", i)
    return src


def change_folder(src: Path) -> None:
    """+1 new, -1 removed, 1 changed bytes under its name, 1 renamed (same bytes)."""
    _image(src / "new.png", 100)
    (src / "img03.png").unlink()
    _image(src / "img05.png", 105)
    (src / "img07.png").rename(src / "zz_renamed.png")


def run_all(src: Path, ds: Path, **kw) -> dict:
    out = {}
    out["ingest"] = run_ingest(
        IngestConfig(source=str(src), out=str(ds), rows_per_shard=RPS), EXEC, progress=False, **kw
    )
    out["clip"] = run_encode_clip(
        EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False, **kw
    )
    out["s"] = run_encode_s(
        EncodeSConfig(dataset=str(ds)), GeneratorRef(), E4ERef(), EXEC, progress=False, **kw
    )
    return out


def assert_same_dataset(a: Path, b: Path) -> None:
    for name in ("manifest", "clip", "s"):
        sa, sb = snapshot(a / f"{name}.zarr"), snapshot(b / f"{name}.zarr")
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key] == sb[key], f"{name}.zarr {key} differs from the from-scratch store"


@pytest.fixture()
def spy(monkeypatch):
    """The sources each model pass was run on (the real encode_image_block, recorded)."""
    seen: dict[str, list[str]] = {"clip": [], "s": []}
    real = encode_clip.encode_image_block

    def wrap(kind):
        def run(sources, *args, **kwargs):
            seen[kind].extend(str(s) for s in sources)
            return real(sources, *args, **kwargs)

        return run

    monkeypatch.setattr(encode_clip, "encode_image_block", wrap("clip"))
    monkeypatch.setattr(encode_s, "encode_image_block", wrap("s"))
    return seen


def test_changed_folder_computes_only_new_rows_and_equals_a_fresh_run(tmp_path, spy):
    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    run_all(src, ds)
    assert len(spy["clip"]) == N and len(spy["s"]) == N
    m = RowStore.open(str(ds / "manifest.zarr"))
    old_ids = dict(zip(m.read("source").tolist(), m.read("ids").tolist(), strict=True))
    change_folder(src)
    spy["clip"].clear()
    spy["s"].clear()
    again = run_all(src, ds)
    for kind in ("ingest", "clip", "s"):
        c = again[kind].counts
        assert (c.reused, c.computed, c.dropped) == (N - 2, 2, 2), kind
    # the models ran on exactly the new and the changed file
    assert sorted(spy["clip"]) == ["img05.png", "new.png"]
    assert sorted(spy["s"]) == ["img05.png", "new.png"]
    m = RowStore.open(str(ds / "manifest.zarr"))
    sources = m.read("source").tolist()
    assert sources == sorted(sources) and "img03.png" not in sources
    # ids of unchanged files stay (ids come from the path: a renamed file gets its new name)
    ids = dict(zip(sources, m.read("ids").tolist(), strict=True))
    assert all(ids[k] == v for k, v in old_ids.items() if k in ids)
    assert ids["zz_renamed.png"] == "zz_renamed"

    fresh = tmp_path / "fresh"
    spy["clip"].clear()
    run_all(src, fresh)
    assert len(spy["clip"]) == N
    assert_same_dataset(ds, fresh)
    for name in ("manifest", "clip", "s"):
        assert verify_store(RowStore.open(str(ds / f"{name}.zarr"))) == []
    assert not any(p.name.endswith((".next", ".prev", ".compute")) for p in ds.iterdir())

    spy["clip"].clear()
    same = run_all(src, ds)  # unchanged folder: nothing computed, nothing written
    assert same["clip"].counts.computed == 0 and same["clip"].summary.blocks_run == 0
    assert spy["clip"] == [] and same["s"].counts.computed == 0
    assert same["s"].summary.blocks_run == 0  # not even copied again


def test_cli_prints_reuse_counts_and_duplicates_are_computed_once(tmp_path, spy):
    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    runner = CliRunner()
    base = ["--params", os.devnull, "-q"]
    for args in (
        ["ingest", str(src), "--out", str(ds), "--set", f"ingest.rows_per_shard={RPS}"],
        ["encode-clip", "--dataset", str(ds)],
    ):
        res = runner.invoke(main, [*args, *base])
        assert res.exit_code == 0, res.output
    shutil.copy(src / "img02.png", src / "img02_copy.png")  # same bytes, new name
    _image(src / "zz_new.png", 200)
    spy["clip"].clear()
    res = runner.invoke(
        main,
        ["ingest", str(src), "--out", str(ds), "--set", f"ingest.rows_per_shard={RPS}", *base],
    )
    assert res.exit_code == 0, res.output
    assert f"ingest: rows reused {N + 1}, computed 1, dropped 0" in res.output
    res = runner.invoke(main, ["encode-clip", "--dataset", str(ds), "--restart-on-change", *base])
    assert res.exit_code == 0, res.output
    assert f"encode-clip: rows reused {N}, computed 1, dropped 0" in res.output
    assert spy["clip"] == ["zz_new.png"]
    m = RowStore.open(str(ds / "manifest.zarr"))
    st = dict(zip(m.read("source").tolist(), m.status().tolist(), strict=True))
    assert st["img02_copy.png"] == Status.DUPLICATE and st["img02.png"] == Status.OK


def test_reuse_store_of_another_dataset_and_refusal_of_other_models(tmp_path, spy):
    src = make_folder(tmp_path)
    run_all(src, tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    for i in (1, 4, 9):
        shutil.copy(src / f"img{i:02d}.png", other / f"copy{i}.png")
    _image(other / "own.png", 300)
    b = tmp_path / "b"
    run_ingest(
        IngestConfig(source=str(other), out=str(b), rows_per_shard=RPS), EXEC, progress=False
    )
    # a store made with another CLIP: refused, naming both fingerprints, nothing written
    odd = tmp_path / "odd"
    run_ingest(
        IngestConfig(source=str(src), out=str(odd), rows_per_shard=RPS), EXEC, progress=False
    )
    odd_clip = run_encode_clip(
        EncodeClipConfig(dataset=str(odd)), ClipRef(seed=1), EXEC, progress=False
    )
    want = RowStore.open(str(tmp_path / "a" / "clip.zarr")).fingerprint
    have = RowStore.open(odd_clip.out).fingerprint
    with pytest.raises(ReuseRefused) as err:
        run_encode_clip(
            EncodeClipConfig(dataset=str(b)), ClipRef(), EXEC, progress=False, reuse=[str(odd)]
        )
    assert want in str(err.value) and have in str(err.value)
    assert not (b / "clip.zarr").exists() and not (b / "clip.zarr.compute").exists()
    res = CliRunner().invoke(
        main,
        ["encode-clip", "--dataset", str(b), "--reuse", str(odd), "-q", "--params", os.devnull],
    )
    assert res.exit_code != 0 and "--reuse" in res.output and "Traceback" not in res.output
    # the same models: the three shared images are copied, only own.png is encoded
    spy["clip"].clear()
    got = run_encode_clip(
        EncodeClipConfig(dataset=str(b)),
        ClipRef(),
        EXEC,
        progress=False,
        reuse=[str(tmp_path / "a")],
    )
    assert (got.counts.reused, got.counts.computed) == (3, 1)
    assert spy["clip"] == ["own.png"]
    fresh = tmp_path / "fresh"
    run_ingest(
        IngestConfig(source=str(other), out=str(fresh), rows_per_shard=RPS), EXEC, progress=False
    )
    run_encode_clip(EncodeClipConfig(dataset=str(fresh)), ClipRef(), EXEC, progress=False)
    assert snapshot(b / "clip.zarr") == snapshot(fresh / "clip.zarr")


def test_hand_edited_manifest_is_reported_by_verify(tmp_path):
    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    run_ingest(IngestConfig(source=str(src), out=str(ds), rows_per_shard=RPS), EXEC, progress=False)
    m = RowStore.open(str(ds / "manifest.zarr"))
    assert verify_store(m) == []
    arr = zarr.open_array(str(ds / "manifest.zarr" / "source"), mode="r+")
    arr[2] = "someone/else.png"
    reasons = verify_store(RowStore.open(str(ds / "manifest.zarr")))
    assert any("edited" in r for r in reasons), reasons


KILLER = r"""
import os, signal, sys
import numpy as np
from stages.common import ClipRef, ExecutionConfig
from stages.encode_clip import EncodeClipConfig, run_encode_clip
import stages.encode_clip as ec
import store.update as up

ds, where = sys.argv[1], sys.argv[2]
calls = {"n": 0}
if where == "compute":
    real = ec.encode_image_block
    def hook(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    ec.encode_image_block = hook
elif where == "assemble":
    real = up.assemble_block
    def hook(out, block, *a, **k):
        if block == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(out, block, *a, **k)
    up.assemble_block = hook
elif where == "swap":
    from fsspec.implementations.local import LocalFileSystem
    real_mv = LocalFileSystem.mv
    def mv(self, a, b, **k):
        real_mv(self, a, b, **k)
        if str(b).endswith(".prev"):
            os.kill(os.getpid(), signal.SIGKILL)
    LocalFileSystem.mv = mv
run_encode_clip(EncodeClipConfig(dataset=ds), ClipRef(), ExecutionConfig(workers=1, batch_size=4),
                progress=False)
"""


@pytest.mark.parametrize("where", ["compute", "assemble", "swap"])
def test_sigkill_mid_update_then_rerun_ends_in_the_same_state(tmp_path, where):
    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    run_all(src, ds)
    for i in range(5):  # enough new rows for two compute blocks
        _image(src / f"new{i}.png", 400 + i)
    (src / "img03.png").unlink()
    run_ingest(IngestConfig(source=str(src), out=str(ds), rows_per_shard=RPS), EXEC, progress=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(ds), where], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    again = run_encode_clip(EncodeClipConfig(dataset=str(ds)), ClipRef(), EXEC, progress=False)
    assert again.counts.dropped in (0, 1)
    fresh = tmp_path / "fresh"
    run_ingest(
        IngestConfig(source=str(src), out=str(fresh), rows_per_shard=RPS), EXEC, progress=False
    )
    run_encode_clip(EncodeClipConfig(dataset=str(fresh)), ClipRef(), EXEC, progress=False)
    assert snapshot(ds / "clip.zarr") == snapshot(fresh / "clip.zarr")
    assert not any(p.name.endswith((".next", ".prev", ".compute")) for p in ds.iterdir())


def save_mapper_for(tmp_path: Path):
    """A random-weight mapper for the default tiny generator and CLIP: (path, clip)."""
    from model.clip import load_clip
    from model.mapper import DeltaMapper, save_mapper
    from model.stylegan2 import create_generator

    G, clip = create_generator("tiny-64", seed=0), load_clip("deltaedit-tiny", seed=0)
    torch.manual_seed(0)
    path = tmp_path / "mapper.safetensors"
    save_mapper(
        DeltaMapper(G.layout, clip.embed_dim), path, extra={"clip_fingerprint": clip.fingerprint}
    )
    return path, clip


def edit_smile(store: Path, out: Path, mapper: Path, clip) -> list[str]:
    """The edit stage's 'smile' edit of `store` into `out`: its printed lines."""
    from stages import edit as edit_stage
    from stages.edit import EditConfig, EditSpec

    lines: list[str] = []
    cfg = EditConfig(
        store=str(store),
        mapper=str(mapper),
        out_dir=str(out),
        dataset_kind="faces",
        edits=(EditSpec("smile", "smiling face", alpha=1.0, beta=0.0),),
    )
    edit_stage.run(cfg, EXEC, clip=clip, progress=False, log=lines.append)
    return lines


def test_edit_after_rows_were_added_computes_only_the_new_rows(tmp_path, monkeypatch):
    from stages import edit as edit_stage

    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    run_all(src, ds)
    mapper, clip = save_mapper_for(tmp_path)
    seen: list[int] = []
    real = edit_stage.edit_rows

    def spy(s, *args, **kwargs):
        seen.append(len(s))
        return real(s, *args, **kwargs)

    monkeypatch.setattr(edit_stage, "edit_rows", spy)
    edit_smile(ds, tmp_path / "edits", mapper, clip)
    assert sum(seen) == N
    change_folder(src)
    run_all(src, ds)
    seen.clear()
    lines = edit_smile(ds, tmp_path / "edits", mapper, clip)
    assert sum(seen) == 2, lines  # the new and the changed file only
    assert f"edit smile: rows reused {N - 2}, computed 2, dropped 2" in lines
    fresh = tmp_path / "fresh"
    run_all(src, fresh)
    edit_smile(fresh, tmp_path / "fresh_edits", mapper, clip)
    a = snapshot(tmp_path / "edits" / "smile.zarr")
    b = snapshot(tmp_path / "fresh_edits" / "smile.zarr")
    assert a["s"] == b["s"] and a["status"] == b["status"] and a["sha256"] == b["sha256"]


# --- render follows: only new or changed rows are rendered ------------------------------


def render(ds: Path, edits: Path, out: Path, execution: ExecutionConfig = EXEC, **kw):
    """The render stage over `ds` and its edits into `out`: ({folder: RenderResult}, lines)."""
    from stages.render import RenderConfig
    from stages.render import run as run_render

    lines: list[str] = []
    cfg = RenderConfig(
        edits_dir=str(edits),
        store=str(ds),
        out_dir=str(out),
        sheet_rows=3,
        gallery_rows=4,
        sheet_tile=32,
        **kw,
    )
    res = run_render(cfg, GeneratorRef(), execution, progress=False, log=lines.append)
    return {r.name: r for r in res}, lines


def tree(out: Path) -> dict[str, bytes]:
    """Every file under `out` (the record included): relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.png")}


def counts(r) -> tuple[int, int, int, int, int]:
    return r.n_images, r.rendered, r.kept, r.moved, r.removed


def test_render_after_rows_were_added_renders_only_the_new_rows(tmp_path):
    src = make_folder(tmp_path)
    ds, edits, out = tmp_path / "ds", tmp_path / "edits", tmp_path / "render"
    run_all(src, ds)
    mapper, clip = save_mapper_for(tmp_path)
    edit_smile(ds, edits, mapper, clip)
    first, _ = render(ds, edits, out)
    assert {n: counts(r) for n, r in first.items()} == {
        "originals": (N, N, 0, 0, 0),
        "smile": (N, N, 0, 0, 0),
    }
    before = {n: stats(out / n) for n in first}

    # two files added at the end of the sorted folder: two rows rendered, the rest untouched
    _image(src / "zz_a.png", 300)
    _image(src / "zz_b.png", 301)
    run_all(src, ds)
    edit_smile(ds, edits, mapper, clip)
    grown, lines = render(ds, edits, out)
    for name in ("originals", "smile"):
        assert counts(grown[name]) == (N + 2, 2, N, 0, 0), name
        now = stats(out / name)
        assert {k: now[k] for k in before[name]} == before[name]  # same inode, same mtime
    assert any("rendered 2, reused 12: kept 12, moved 0), removed 0 files" in ln for ln in lines)
    render(ds, edits, tmp_path / "scratch-1")  # the same stores, an empty folder
    assert tree(out) == tree(tmp_path / "scratch-1")

    # +1 -2 files, one changed, one renamed: rows shift, their files follow them
    change_folder(src)  # new.png, img03 removed, img05 changed, img07 -> zz_renamed.png
    (src / "img10.png").unlink()
    run_all(src, ds)
    edit_smile(ds, edits, mapper, clip)
    changed, _ = render(ds, edits, out)
    # rows: img00-02 kept; img04 img06 img08 img09 img11 zz_renamed zz_a zz_b moved down;
    # img05 (new bytes) and new.png rendered; the last index's file removed
    for name in ("originals", "smile"):
        assert counts(changed[name]) == (N + 1, 2, 3, 8, 1), name
    assert not (out / "smile" / "00000013.png").exists()
    assert not (out / "smile" / ".moving").exists()
    scratch = tmp_path / "scratch-2"
    render(ds, edits, scratch)
    assert tree(out) == tree(scratch)

    # another format: every file rendered again, the old ones removed
    jpeg, _ = render(ds, edits, out, format="jpeg")
    assert counts(jpeg["smile"]) == (N + 1, N + 1, 0, 0, N + 1)
    assert (
        not list((out / "smile").glob("*.png"))
        and len(list((out / "smile").glob("*.jpg"))) == N + 1
    )
    again, _ = render(ds, edits, out, format="jpeg")
    assert counts(again["smile"]) == (N + 1, 0, N + 1, 0, 0)


@pytest.mark.parametrize("shards", [False, True])
@pytest.mark.parametrize("where", ["render", "move"])
def test_render_killed_mid_way_then_rerun_equals_a_render_from_scratch(
    tmp_path, monkeypatch, where, shards
):
    from store import fs as storefs

    src = make_folder(tmp_path)
    ds, edits, out = tmp_path / "ds", tmp_path / "edits", tmp_path / "render"
    run_all(src, ds)
    mapper, clip = save_mapper_for(tmp_path)
    edit_smile(ds, edits, mapper, clip)
    one = ExecutionConfig(workers=1, batch_size=4)  # blocks one after another
    if where == "move":
        render(ds, edits, out, shards=shards, execution=one)
        (src / "img00.png").unlink()  # every later row moves down one index
        _image(src / "zz_new.png", 500)
        run_all(src, ds)
        edit_smile(ds, edits, mapper, clip)
    # the 6th write of an image (loose), of a tar or record (shards), or the 6th move
    name = "write_bytes_atomic" if shards else {"render": "write_bytes", "move": "move_file"}[where]
    real = getattr(storefs, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 6:
            if name == "write_bytes":  # killed half-way through the file
                real(args[0], args[1][: len(args[1]) // 2], *args[2:], **kwargs)
            raise OSError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(storefs, name, dying)
    with pytest.raises(OSError, match="killed"):
        render(ds, edits, out, shards=shards, execution=one)
    monkeypatch.setattr(storefs, name, real)
    rerun, _ = render(ds, edits, out, shards=shards, execution=one)
    if where == "render":
        assert 0 < rerun["originals"].rendered < N  # the blocks the killed run finished stay
    render(ds, edits, tmp_path / "scratch", shards=shards, execution=one)
    assert tree(out) == tree(tmp_path / "scratch")


def test_render_to_s3_through_a_cluster_moves_the_files_there(tmp_path, s3_server, dask_cluster):
    """Render's files on object storage, its blocks on `dask worker` processes: the rows
    that moved are copied there, the removed row's file deleted, the rest kept."""
    from test_scale_out import files_under

    src = make_folder(tmp_path)
    ds, edits = tmp_path / "ds", tmp_path / "edits"
    run_all(src, ds)
    mapper, clip = save_mapper_for(tmp_path)
    edit_smile(ds, edits, mapper, clip)
    so = s3_server.options
    root = f"s3://{s3_server.make_bucket('render-incremental')}/out"
    cluster = ExecutionConfig(
        batch_size=4, scheduler_address=dask_cluster.address, storage_options=so
    )
    first, _ = render(ds, edits, root, execution=cluster)
    assert counts(first["smile"]) == (N, N, 0, 0, 0)
    (src / "img00.png").unlink()  # every other row moves down one index
    run_all(src, ds)
    edit_smile(ds, edits, mapper, clip)
    moved, _ = render(ds, edits, root, execution=cluster)
    assert counts(moved["smile"]) == (N - 1, 0, 0, N - 1, 1)
    render(ds, edits, tmp_path / "scratch")  # local disk, in this process
    assert files_under(root, so) == tree(tmp_path / "scratch")


def test_train_says_the_mapper_is_stale_and_retrains_only_when_asked(tmp_path):
    from stages.train import TrainConfig
    from stages.train import run as train

    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    run_all(src, ds)
    kw = dict(
        stores=(str(ds),),
        out=str(tmp_path / "mapper.safetensors"),
        metrics_dir=str(tmp_path / "metrics"),
        iterations=4,
        batch_size=4,
        val_every=2,
        val_pairs=4,
        checkpoint_every=2,
        holdout_fraction=0.2,
    )
    first = train(TrainConfig(**kw), progress=False, log=lambda _: None)
    assert first.step == 4 and len(first.losses) == 4
    mapper = Path(kw["out"]).read_bytes()
    lines: list[str] = []
    same = train(TrainConfig(**kw), progress=False, log=lines.append)
    assert same.losses == [] and "up to date" in lines[-1]
    change_folder(src)
    run_all(src, ds)
    lines.clear()
    stale = train(TrainConfig(**kw), progress=False, log=lines.append)
    assert stale.losses == [] and Path(kw["out"]).read_bytes() == mapper
    assert "stale: 2 rows added, 2 removed since it was trained on 12 rows" in lines[-1]
    again = train(TrainConfig(**kw, retrain=True), progress=False, log=lambda _: None)
    assert len(again.losses) == 4 and Path(kw["out"]).read_bytes() != mapper
    lines.clear()
    train(TrainConfig(**kw), progress=False, log=lines.append)
    assert "up to date" in lines[-1]
    res = CliRunner().invoke(
        main,
        ["train", "--params", os.devnull, "-q", "--retrain"]
        + [f"--set=train.{k}={v}" for k, v in kw.items() if k != "stores"]
        + [f"--set=train.stores=[{ds}]"],
    )
    assert res.exit_code == 0, res.output
    assert "up to date" not in res.output and "train: 4 steps" in res.output


def test_unchanged_rerun_loads_no_model(tmp_path):
    """With model files, a rerun over an unchanged folder neither imports torch's model
    libraries nor loads a model: the store records the files' sha256 and the manifest."""
    src = make_folder(tmp_path)
    ds = tmp_path / "ds"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    params = ["--params", str(ROOT / "params.yaml"), "-q"]

    def cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
        flags = ["-X", "importtime"] if importtime else []
        proc = subprocess.run(
            [sys.executable, *flags, "-m", "pipeline", *args, *params],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    cli("ingest", str(src), "--out", str(ds), "--set", f"ingest.rows_per_shard={RPS}")
    cli("encode-clip", "--dataset", str(ds))
    cli("encode-s", "--dataset", str(ds))
    before = snapshot(ds / "clip.zarr")
    for stage in ("encode-clip", "encode-s"):
        again = cli(stage, "--dataset", str(ds), importtime=True)
        assert f"{stage}: rows reused {N}, computed 0, dropped 0" in again.stdout
        imported = {ln.split("|")[-1].strip() for ln in again.stderr.splitlines() if "|" in ln}
        assert "torch" not in imported and "open_clip" not in imported
    assert snapshot(ds / "clip.zarr") == before
    _image(src / "img04.png", 404)  # changed bytes: the manifest changes, the pass runs
    cli("ingest", str(src), "--out", str(ds), "--set", f"ingest.rows_per_shard={RPS}")
    changed = cli("encode-clip", "--dataset", str(ds))
    assert f"encode-clip: rows reused {N - 1}, computed 1, dropped 1" in changed.stdout
