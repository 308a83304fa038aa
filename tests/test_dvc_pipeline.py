"""`dvc repro` end to end on a copy of the working tree (issue 7).

Runs the real pipeline with a smaller world (fewer rows, a short training) so it fits
the suite's time; the stage graph, commands and params are those of dvc.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "world.n_images": 96,
    "ingest.rows_per_shard": 32,
    "sample.n": 32,
    "sample.rows_per_shard": 32,
    "relevance.n_images": 2,
    "train.iterations": 60,
    "train.val_every": 30,
    "train.checkpoint_every": 30,
    "render.max_rows": None,  # every row: a row added at the end is drawn (32 px images)
    "evaluate.n_rows": 8,
}


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("repo")
    for rel in _tracked_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for dotted, value in SMALL.items():
        section, key = dotted.split(".")
        params.setdefault(section, {})[key] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "t")
    env.setdefault("GIT_AUTHOR_EMAIL", "t@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "t")
    env.setdefault("GIT_COMMITTER_EMAIL", "t@example.com")
    _run(["git", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "copy"], dst, env)
    return dst, env


def test_repro_runs_every_stage_then_nothing_then_only_what_a_prompt_touches(repo):
    dst, env = repo
    first = _run(["dvc", "repro"], dst, env)
    stages = set(yaml.safe_load((dst / "dvc.yaml").read_text())["stages"])
    assert _ran(first) == stages - {"world-train"}  # frozen: committed weights are used
    assert (dst / "data/render/index.html").exists()
    metrics = json.loads((dst / "data/metrics/edit/metrics.json").read_text())
    assert set(metrics["edits"]) >= {"blue", "triangle"}
    # the gallery marks the rows the world says already have each edit's target
    from stages.world.render import row_id

    info = json.loads((dst / "data/render/render.json").read_text())
    marks = json.loads((dst / "data/world_truth/row_marks.json").read_text())["edits"]
    page = (dst / "data/render/index.html").read_text()
    for name in ("blue", "triangle", "black_background", "large"):
        want = [r for r in info["rows_shown"] if row_id(r) in marks[name]]
        assert info["rows_marked"][name] == want, name
        assert f"<h2>{name}: target &#x27;" in page and ", neutral &#x27;" in page
    assert sum(map(len, info["rows_marked"].values())) >= 1
    assert page.count('<tr class="marked"') == sum(map(len, info["rows_marked"].values()))

    second = _run(["dvc", "repro"], dst, env)
    assert _ran(second) == set()

    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["edit"]["edits"][0]["target"] = "green shape"
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], dst, env)
    assert _ran(third) == {"edit", "world-evaluate", "render", "evaluate"}

    shown = _run(["dvc", "metrics", "show"], dst, env)
    assert "data/metrics/edit/metrics.json" in shown
    assert "data/metrics/train/metrics.json" in shown


def _store_bytes(path: Path) -> dict[str, bytes]:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    out = {"attrs": repr(sorted(dict(g.attrs).items())).encode()}
    for name in sorted(g.array_keys()):
        v = g[name][...]
        out[name] = (
            "\0".join(map(str, v.tolist())).encode() if v.dtype.kind in "UTO" else v.tobytes()
        )
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_repro_after_one_percent_more_images_computes_only_the_new_rows(repo):
    """The encoder stores and data/edits, data/render are `persist: true`: after the
    dataset grew by one image, the encoders and edit run their models on the new row only
    and render draws only its files; every output equals a from-scratch run on the grown
    dataset (the CLI into fresh folders)."""
    dst, env = repo
    _run(["dvc", "repro", "render"], dst, env)  # the pipeline as committed
    params = yaml.safe_load((dst / "params.yaml").read_text())
    n = params["world"]["n_images"]
    params["world"]["n_images"] = n + 1  # rows own their RNG: the first n images stay the same
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro", "render"], dst, env)
    assert _ran(out) == {
        *("world", "ingest", "encode-clip", "encode-s", "relevance", "train"),
        *("edit", "world-evaluate", "render"),
    }
    for stage in ("ingest", "encode-clip", "encode-s"):
        assert f"{stage}: rows reused {n}, computed 1, dropped 0" in out, out[-3000:]
    names = [e["name"] for e in params["edit"]["edits"]]
    for name in names:
        assert re.search(rf"edit {name}: rows reused \d+, computed 1, dropped 0", out), out[-3000:]
    for name in ["originals", *names]:  # render.max_rows null: the new last row is drawn
        done = (
            rf"render {name}: \d+ images \(rendered 1, reused \d+: kept \d+, moved 0\), removed 0"
        )
        assert re.search(done, out), out[-3000:]
    assert "started over" not in out
    for cmd in (
        ["deltaedit", "ingest", "--out", "data/fresh", "-q"],
        ["deltaedit", "encode-clip", "--dataset", "data/fresh", "-q"],
        ["deltaedit", "encode-s", "--dataset", "data/fresh", "-q"],
        ["deltaedit", "edit", "--set", "edit.out_dir=data/fresh_edits", "-q"],
        [
            "deltaedit",
            "render",
            "--set",
            "render.edits_dir=data/fresh_edits",
            "--out",
            "data/fresh_render",
            "-q",
        ],
    ):
        _run(cmd, dst, env)
    for name in ("manifest", "clip", "s"):
        a = _store_bytes(dst / "data/images" / f"{name}.zarr")
        b = _store_bytes(dst / "data/fresh" / f"{name}.zarr")
        assert a == b, f"{name}.zarr after dvc repro differs from a from-scratch store"
    edits, fresh = dst / "data/edits", dst / "data/fresh_edits"
    assert sorted(p.name for p in edits.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for name in names:
        a, b = _store_bytes(edits / f"{name}.zarr"), _store_bytes(fresh / f"{name}.zarr")
        assert a == b, f"edits/{name}.zarr after dvc repro differs from a from-scratch edit"
    a, b = _tree(dst / "data/render"), _tree(dst / "data/fresh_render")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == [], "data/render differs from a from-scratch render"
