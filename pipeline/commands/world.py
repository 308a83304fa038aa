"""CLI commands: world (the shapes world: render, train its models, check the judge)."""

from __future__ import annotations

import json
from collections.abc import Callable
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
    from stages.world.render import WorldConfig, run

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
    from stages.world.render import WorldConfig
    from stages.world.train import WorldTrainConfig, run

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


def chunk_options(section: str) -> Callable:
    """--params/--set, --minutes and --out of a chunked training command."""

    def wrap(f: Callable) -> Callable:
        f = click.option("--out", "out_dir", default=None, help=f"Run folder ({section}.out_dir).")(
            f
        )
        f = click.option(
            "--minutes",
            type=float,
            default=None,
            help=f"Time box of this chunk ({section}.chunk_minutes; 0 = until "
            f"{section}.iterations).",
        )(f)
        return params_options(f)

    return wrap


def _train_chunk(
    section: str,
    cls: type,
    train_chunk: Callable[..., dict],
    params_path: str,
    sets: tuple[str, ...],
    minutes: float | None,
    out_dir: str | None,
) -> None:
    """One time-boxed chunk of a resumable world training run (`section` of params)."""
    from model.checkpoint import CheckpointError
    from stages.world.render import WorldConfig

    name = "world train-" + section.split("_")[1]
    params = load(
        params_path, sets, {f"{section}.chunk_minutes": minutes, f"{section}.out_dir": out_dir}
    )
    world_cfg = config(params, "world", WorldConfig)
    cfg = config(params, section, cls)
    try:
        summary = train_chunk(cfg, world_cfg, log=click.echo)
    except (CheckpointError, ValueError, OSError) as exc:
        raise click.ClickException(f"{name}: {exc}") from None
    if not summary["done"]:
        left = cfg.iterations - summary["step"]
        click.echo(f"{name}: {left} iterations left; rerun to continue")


@world.command("train-gan")
@chunk_options("world_gan")
def train_gan_cmd(
    params_path: str, sets: tuple[str, ...], minutes: float | None, out_dir: str | None
) -> None:
    """Train the world generator the StyleGAN2 way (mapping network, style mixing,
    non-saturating loss, lazy R1, EMA) for one time-boxed chunk; rerun to continue
    from the run folder's state (bitwise the same as one long run)."""
    from stages.world.gan import GanConfig, train_chunk

    _train_chunk("world_gan", GanConfig, train_chunk, params_path, sets, minutes, out_dir)


@world.command("train-e4e")
@chunk_options("world_e4e")
def train_e4e_cmd(
    params_path: str, sets: tuple[str, ...], minutes: float | None, out_dir: str | None
) -> None:
    """Train the world encoder the e4e way into the (frozen) GAN generator: latent loss
    on generated samples with known W+, image loss on samples and world renders; one
    time-boxed chunk, rerun to continue."""
    from stages.world.e4e import EncoderTrainConfig, train_chunk

    _train_chunk("world_e4e", EncoderTrainConfig, train_chunk, params_path, sets, minutes, out_dir)


@world.command("sspace")
@params_options
@click.option("--n-rows", type=int, default=256, show_default=True, help="Held-out rows.")
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the report to this JSON file.",
)
def sspace_cmd(params_path: str, sets: tuple[str, ...], n_rows: int, out_path: str | None) -> None:
    """Test the generator's S space before any mapper: the oracle conv-only S delta
    (encoder of the counterfactual minus encoder of the source) per edit family, per
    level, and how many channels carry each attribute. Rows are inverted as encode-s
    does (e4e, refined by encode_s.refine_steps)."""
    from model.checkpoint import CheckpointError
    from model.e4e import load_e4e
    from model.stylegan2 import load_generator
    from stages.common import E4ERef, GeneratorRef
    from stages.encode_s import EncodeSConfig
    from stages.world.render import WorldConfig
    from stages.world.sspace import s_space_report

    params = load(params_path, sets)
    world_cfg = config(params, "world", WorldConfig)
    gref = config(params, "generator", GeneratorRef)
    eref = config(params, "e4e", E4ERef)
    enc = config(params, "encode_s", EncodeSConfig)
    try:
        G = load_generator(gref.path)
        E = load_e4e(eref.path)
    except (CheckpointError, OSError, TypeError) as exc:
        raise click.ClickException(f"world sspace: {exc}") from None
    refine = (enc.refine_steps, enc.refine_lr)
    report = s_space_report(G, E, world_cfg, n_rows=n_rows, refine=refine)
    text = json.dumps(report, indent=1)
    for fam, r in report["families"].items():
        o = r["oracle_conv"]
        click.echo(
            f"{fam:22s} oracle conv: target {o['target_reached']:.2f}, others kept "
            f"{o['all_others_kept']:.2f}, {o['psnr_vs_counterfactual']:.1f} dB; "
            f"channels for 80% {r['channels_for_energy']['80%']}"
        )
    click.echo(f"judge on reconstructions: {report['judge_on_reconstructions']}")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(text)


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
    from stages.world.judge import JudgeCheckConfig, judge_check
    from stages.world.render import WorldConfig

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
    from stages.world.evaluate import WorldEvaluateConfig, family_table, run
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
