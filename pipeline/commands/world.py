"""CLI commands: world (the shapes world: render, train its models, check the judge)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.common import config, load, params_options

COMMANDS: list[click.Command] = []
SUMMARY_KEYS = (
    "iterations",
    "seconds",
    "heldout_psnr",
    "zero_shot",
    "zero_shot_held_out_synonyms",
    "zero_shot_held_out_phrasings",
    "judge_on_reconstructions",
)


@click.group("world")
def world() -> None:
    """The shapes world: procedural images with known attributes, models trained on them,
    and an independent judge that reads attributes from pixels."""


@world.command("render")
@params_options
@click.option("--out", "out_dir", default=None, help="Output folder (default: world.out_dir).")
@click.option("--n-images", type=int, default=None, help="Rows to render (world.n_images).")
@click.option("--seed", type=int, default=None, help="World seed (world.seed).")
def render_cmd(
    params_path: str,
    sets: tuple[str, ...],
    out_dir: str | None,
    n_images: int | None,
    seed: int | None,
) -> None:
    """Render the world into a folder: {id}.png per row + labels.json (deterministic by seed)."""
    from stages.world import WorldConfig, run

    params = load(
        params_path,
        sets,
        {"world.out_dir": out_dir, "world.n_images": n_images, "world.seed": seed},
    )
    cfg = config(params, "world", WorldConfig)
    try:
        run(cfg)
    except OSError as exc:
        raise click.ClickException(f"world render: cannot write {cfg.out_dir}: {exc}") from None


@world.command("train")
@params_options
@click.option(
    "--only",
    type=click.Choice(["all", "autoencoder", "clip"]),
    default="all",
    show_default=True,
    help="Train the generator + encoder, the CLIP, or both.",
)
@click.option(
    "--out", "out_dir", default=None, help="Where weights + metrics go (world_train.out_dir)."
)
def train_cmd(params_path: str, sets: tuple[str, ...], only: str, out_dir: str | None) -> None:
    """Train the world's generator + e4e encoder (autoencoder) and its tiny CLIP."""
    from model.checkpoint import CheckpointError
    from stages.world import WorldConfig
    from stages.world_train import WorldTrainConfig, run

    params = load(params_path, sets, {"world_train.out_dir": out_dir})
    world_cfg = config(params, "world", WorldConfig)
    cfg = config(params, "world_train", WorldTrainConfig)
    try:
        metrics = run(cfg, world_cfg, only=only)
    except (CheckpointError, ValueError, OSError) as exc:
        raise click.ClickException(f"world train: {exc}") from None
    summary = {
        k: {m: v for m, v in metrics[k].items() if m in SUMMARY_KEYS}
        for k in ("autoencoder", "clip", "clip_lit")
        if k in metrics
    }
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"world train: weights and metrics.json in {cfg.out_dir}")


@world.command("judge-check")
@params_options
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the report to this JSON file.",
)
def judge_check_cmd(params_path: str, sets: tuple[str, ...], out_path: str | None) -> None:
    """Measure the independent judge's accuracy on fresh clean renders (fails below the
    required accuracy)."""
    from stages.world import WorldConfig
    from stages.world_judge import JudgeCheckConfig, judge_check

    params = load(params_path, sets)
    world_cfg = config(params, "world", WorldConfig)
    cfg = config(params, "world_judge", JudgeCheckConfig)
    report = judge_check(cfg, world_cfg)
    text = json.dumps(report, indent=1)
    click.echo(text)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(text)
    if not report["passes"]:
        raise click.ClickException(
            f"judge accuracy {report['min_accuracy']:.4f} is below the required "
            f"{cfg.min_accuracy} on clean renders"
        )


COMMANDS.append(world)


@world.command("evaluate")
@params_options
@click.option("--n-rows", type=int, default=None, help="Held-out rows per edit (n_rows).")
@click.option("--out", "out_dir", default=None, help="Metrics folder (world_evaluate.out).")
def evaluate_cmd(
    params_path: str, sets: tuple[str, ...], n_rows: int | None, out_dir: str | None
) -> None:
    """Score the edits against the world's truth (judge, counterfactual renders) with the
    no-edit, oracle image-delta, global-direction and truth-reconstruction baselines."""
    from model.checkpoint import CheckpointError
    from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef
    from stages.world_evaluate import WorldEvaluateConfig, family_table, run
    from store import StoreError

    params = load(
        params_path, sets, {"world_evaluate.n_rows": n_rows, "world_evaluate.out": out_dir}
    )
    cfg = config(params, "world_evaluate", WorldEvaluateConfig)
    generator = config(params, "generator", GeneratorRef)
    clip = config(params, "clip", ClipRef)
    e4e = config(params, "e4e", E4ERef)
    execution = config(params, "execution", ExecutionConfig)
    try:
        metrics = run(cfg, generator, clip, e4e, execution, log=click.echo)
    except (StoreError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise click.ClickException(f"world evaluate: {line}") from None
    click.echo(family_table(metrics["families"]))
