"""The rooms' import rules (ARCHITECTURE.md), checked on the parsed source.

The shapes world (`stages/world/`) may import the pipeline stages; no pipeline stage
(a module of `stages/` outside `stages/world/`) may import the world, at module level or
inside a function. `model/` and `store/` import neither `stages` nor `pipeline`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports (relative imports resolved; `from a import b` gives
    both `a` and `a.b`, since b may be a submodule), wherever the import statement sits;
    plus string constants passed to importlib.import_module / __import__."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                found.add(str(arg.value))
    return found


def violations(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """`file: module` for every import of a forbidden module (or one of its submodules)."""
    out = []
    for path in files:
        for mod in sorted(imports_of(path, root)):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(root)}: imports {mod}")
    return out


def pipeline_stage_files(root: Path = ROOT) -> list[Path]:
    world = root / "stages" / "world"
    return [p for p in sorted((root / "stages").rglob("*.py")) if world not in p.parents]


def test_no_pipeline_stage_imports_the_world():
    files = pipeline_stage_files()
    assert len(files) >= 10  # the pipeline stages are there to be checked
    assert (ROOT / "stages" / "world" / "render.py").is_file()
    assert violations(files, ("stages.world",)) == []


def test_model_and_store_import_no_stage():
    files = sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "store").rglob("*.py"))
    assert files
    assert violations(files, ("stages", "pipeline")) == []


def test_the_check_catches_every_form_of_import(tmp_path):
    """Each way a pipeline stage could reach the world is reported."""
    (tmp_path / "stages" / "world").mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "world" / "__init__.py").write_text("")
    (tmp_path / "stages" / "world" / "render.py").write_text("from stages.render import x\n")
    forms = {
        "a.py": "from stages.world.render import WorldConfig\n",
        "b.py": "def f():\n    import stages.world.judge as j\n    return j\n",
        "c.py": "from stages import world\n",
        "d.py": "from .world import render\n",
        "e.py": "from . import world\n",
        "f.py": "import importlib\nm = importlib.import_module('stages.world.score')\n",
        "ok.py": "from stages.render import render_s\nfrom stages.worldly import x\n",
    }
    for name, text in forms.items():
        (tmp_path / "stages" / name).write_text(text)
    found = violations(pipeline_stage_files(tmp_path), ("stages.world",), tmp_path)
    flagged = {line.split(":")[0] for line in found}
    assert flagged == {f"stages/{n}.py" for n in "abcdef"}, found
    assert not any("ok.py" in line or "world/render.py" in line for line in found)
