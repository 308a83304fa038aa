"""CLI commands: relevance, edit, render, evaluate.

Each reads its params section (+ `generator`, `clip`, `execution` where needed),
validates it before any work and turns bad input into a one-line error.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import click

from model.checkpoint import CheckpointError
from pipeline.common import config, lease_option, load, os_error_line, params_options
from stages.common import ClipRef, ExecutionConfig, GeneratorRef
from stages.config import ConfigError

COMMANDS: list[click.Command] = []

_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def _run(func: Callable[[], Any]) -> Any:
    """Run a stage: its warnings go to stderr as 'warning: ...', bad input is one line."""
    from stages.edit import EditError
    from stages.evaluate import EvaluateError
    from stages.relevance import RelevanceError
    from store import StoreError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            result = func()
        except (
            StoreError,
            EditError,
            EvaluateError,
            RelevanceError,
            ConfigError,
            CheckpointError,
            ValueError,
        ) as exc:
            _flush(caught)
            line = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise click.ClickException(line) from None
        except OSError as exc:  # an output path that cannot be written, a file gone missing
            _flush(caught)
            raise click.ClickException(os_error_line(exc)) from None
    _flush(caught)
    return result


def _flush(caught: list) -> None:
    seen = set()
    for w in caught:
        if issubclass(w.category, UserWarning) and str(w.message) not in seen:
            seen.add(str(w.message))
            click.echo(f"warning: {w.message}", err=True)


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str | None, flag: str) -> list[float] | None:
    items = _csv(text)
    if items is None:
        return None
    try:
        return [float(t) for t in items]
    except ValueError:
        raise click.ClickException(f"{flag}: got {text!r}, expected numbers like 0.5,1,2") from None


# --- relevance ------------------------------------------------------------------------


@click.command("relevance")
@click.option(
    "--method",
    type=click.Choice(["finite-difference", "jacobian"]),
    help="How directions are computed [relevance.method].",
)
@click.option("--store", help="Dataset root holding s.zarr [relevance.store].")
@click.option("--out", help="Output relevance.zarr [relevance.out].")
@click.option("--n-images", type=int, help="Base images per channel [relevance.n_images].")
@click.option("--fs3", "fs3_path", help="Import a published fs3.npy [relevance.fs3_path].")
@click.option("--overwrite", is_flag=True, default=None, help="Start over (default: resume).")
@_quiet
@lease_option
@params_options
def relevance_cmd(
    method, store, out, n_images, fs3_path, overwrite, quiet: bool, params_path: str, sets
) -> None:
    """Per conv channel, the CLIP direction it moves (StyleCLIP fs3) + S mean/std.

    Needed for the beta mask of `deltaedit edit` and the global-direction method.
    """
    from stages.relevance import RelevanceConfig, run

    flags = {
        "relevance.method": method,
        "relevance.store": store,
        "relevance.out": out,
        "relevance.n_images": n_images,
        "relevance.fs3_path": fs3_path,
        "relevance.overwrite": overwrite,
    }
    params = load(params_path, sets, flags)
    cfg = config(params, "relevance", RelevanceConfig)
    generator = config(params, "generator", GeneratorRef)
    clip = config(params, "clip", ClipRef)
    execution = config(params, "execution", ExecutionConfig)
    rel = _run(lambda: run(cfg, generator, clip, execution, progress=not quiet, log=click.echo))
    d = rel.directions
    click.echo(f"wrote {cfg.out}: directions {tuple(d.shape)} ({rel.attrs.get('method')})")


# --- edit -----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "edit"


@click.command("edit")
@click.option("--target", "targets", multiple=True, help="Target prompt (repeat to compose).")
@click.option("--neutral", help="Neutral prompt (default by edit.dataset_kind: face/cat/shape).")
@click.option("--name", help="Edit name: writes <edit.out_dir>/<name>.zarr (default from target).")
@click.option("--alpha", help="Strength, or one per target: 1 or 1,0.5 (finite, |alpha| <= 10).")
@click.option("--alphas", help="Alpha sweep, one edit per value: 0.5,1,2 (names get _a<value>).")
@click.option("--beta", type=float, help="Relevance threshold in [0, 1); 0 = no mask.")
@click.option("--levels", help="Levels edited: coarse,medium,fine (default all).")
@click.option(
    "--method",
    type=click.Choice(["mapper", "global-direction"]),
    help="Delta Mapper or StyleCLIP global direction [edit.method].",
)
@click.option(
    "--antisymmetric/--no-antisymmetric",
    default=None,
    help="Mapper delta as (M(d) - M(-d)) / 2: cancels the pull toward the dataset mean "
    "that random-pair training builds in [edit.antisymmetric].",
)
@click.option(
    "--mean-pull",
    type=float,
    help="With --antisymmetric: share in [0, 1] of that pull kept (0 = none, 1 = plain).",
)
@click.option("--store", help="Dataset root with s.zarr + clip.zarr [edit.store].")
@click.option("--ids", help="Edit only these manifest ids (comma separated).")
@click.option("--range", "row_range", help="Edit only rows START:STOP.")
@click.option("--sample", type=int, help="Edit a random sample of this many ok rows.")
@click.option("--seed", type=int, help="Seed of --sample [edit.select.seed].")
@_quiet
@lease_option
@params_options
def edit_cmd(
    targets,
    neutral,
    name,
    alpha,
    alphas,
    beta,
    levels,
    method,
    antisymmetric,
    mean_pull,
    store,
    ids,
    row_range,
    sample,
    seed,
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """Edit every (selected) ok row with a prompt, from cached latents only.

    Edits come from edit.edits in params, or one from the command line:
    deltaedit edit --target "smiling face" --neutral face --name smile --alpha 1 --beta 0.03
    """
    from stages.edit import EditConfig, run

    flags: dict[str, Any] = {
        "edit.method": method,
        "edit.antisymmetric": antisymmetric,
        "edit.store": store,
        "edit.select.seed": seed,
        "edit.select.sample": sample,
        "edit.select.ids": _csv(ids),
    }
    if row_range is not None:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", row_range)
        if not m:
            raise click.ClickException(f"--range: got {row_range!r}, expected START:STOP")
        flags["edit.select.range"] = [int(m.group(1)), int(m.group(2))]
    if targets:
        spec: dict[str, Any] = {
            "name": name or _slug("_".join(targets)),
            "target": list(targets) if len(targets) > 1 else targets[0],
        }
        a = _floats(alpha, "--alpha")
        if a is not None:
            spec["alpha"] = a[0] if len(a) == 1 else a
        for key, value in (
            ("neutral", neutral),
            ("beta", beta),
            ("levels", _csv(levels)),
            ("alphas", _floats(alphas, "--alphas")),
            ("mean_pull", mean_pull),
        ):
            if value is not None:
                spec[key] = value
        flags["edit.edits"] = [spec]
        flags["edit.prune"] = False  # one edit by hand: the params' edits in out_dir stay
    elif any(v is not None for v in (neutral, name, alpha, alphas, beta, levels, mean_pull)):
        raise click.ClickException(
            "--neutral/--name/--alpha/--alphas/--beta/--levels/--mean-pull describe a "
            "command-line edit: "
            "give --target too (or set them under edit.edits in params)"
        )
    params = load(params_path, sets, flags)
    cfg = config(params, "edit", EditConfig)
    if not cfg.edits:
        raise click.ClickException(
            'no edits: pass --target "a smiling face" or list them under edit.edits in params'
        )
    clip = config(params, "clip", ClipRef)
    execution = config(params, "execution", ExecutionConfig)
    results = _run(lambda: run(cfg, execution, clip, progress=not quiet, log=click.echo))
    for r in results:
        click.echo(f"wrote {r.url}")


# --- render ---------------------------------------------------------------------------


@click.command("render")
@click.option("--edit", "edits", multiple=True, help="Edit name to render (repeat; default all).")
@click.option("--out", help="Output folder [render.out_dir].")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), help="[render.format]")
@click.option("--shards/--files", default=None, help="Tar shards instead of loose files.")
@click.option("--extra-dir", help="Extra gallery column: <dir>/<edit>/<row>.png.")
@_quiet
@params_options
def render_cmd(edits, out, fmt, shards, extra_dir, quiet: bool, params_path: str, sets) -> None:
    """Edits (and the originals) to images, before/after contact sheets and index.html."""
    from stages.render import RenderConfig, run

    flags = {
        "render.edits": list(edits) or None,
        "render.out_dir": out,
        "render.format": fmt,
        "render.shards": shards,
        "render.extra_dir": extra_dir,
    }
    params = load(params_path, sets, flags)
    cfg = config(params, "render", RenderConfig)
    generator = config(params, "generator", GeneratorRef)
    execution = config(params, "execution", ExecutionConfig)
    _run(lambda: run(cfg, generator, execution, progress=not quiet, log=click.echo))
    click.echo(f"open {cfg.out_dir}/index.html")


# --- evaluate -------------------------------------------------------------------------


@click.command("evaluate")
@click.option("--edit", "edits", multiple=True, help="Edit name to score (repeat; default all).")
@click.option("--out", help="Metrics folder [evaluate.out].")
@params_options
def evaluate_cmd(edits, out, params_path: str, sets) -> None:
    """CLIP directional similarity, target similarity, pixel and S change per edit."""
    from stages.evaluate import EvaluateConfig, run

    params = load(params_path, sets, {"evaluate.edits": list(edits) or None, "evaluate.out": out})
    cfg = config(params, "evaluate", EvaluateConfig)
    generator = config(params, "generator", GeneratorRef)
    clip = config(params, "clip", ClipRef)
    execution = config(params, "execution", ExecutionConfig)
    _run(lambda: run(cfg, generator, clip, execution, log=click.echo))
    click.echo(f"wrote {cfg.out}/metrics.json")


COMMANDS.extend([relevance_cmd, edit_cmd, render_cmd, evaluate_cmd])
