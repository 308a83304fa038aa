"""CLI commands: train.

`deltaedit train` reads the `train` and `execution` params sections, validates them
before any work, and turns bad input into a one-line error.
"""

from __future__ import annotations

import click

from model.checkpoint import CheckpointError
from pipeline.common import config, lease_option, load, os_error_line, params_options
from stages.common import ExecutionConfig
from stages.config import ConfigError

COMMANDS: list[click.Command] = []


@click.command("train")
@lease_option
@params_options
@click.option("--resume", is_flag=True, help="Continue from the training state beside the mapper.")
@click.option(
    "--retrain",
    is_flag=True,
    default=None,
    help="Train again even if the mapper was trained with these params (e.g. on stores that "
    "gained rows since) [params train.retrain].",
)
@click.option("--iterations", type=int, default=None, help="Override train.iterations.")
@click.option("--device", default=None, help="Override execution.device (auto, cpu, cuda).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train(
    params_path: str,
    sets: tuple[str, ...],
    resume: bool,
    retrain: bool | None,
    iterations: int | None,
    device: str | None,
    quiet: bool,
) -> None:
    """Train the Delta Mapper on random pairs of stored latents (no text).

    Pairs (i, j) come from every store in train.stores (clip.zarr + s.zarr each);
    the mapper learns delta_s = s_j - s_i from s_i and the CLIP image direction.
    Writes train.out (+ .json), the training state beside it, and dvclive metrics
    in train.metrics_dir. --resume continues an interrupted run exactly. A mapper already
    trained with these params is kept; if the stores' rows changed since, train says how
    many and keeps it (stale) unless --retrain or train.retrain.
    """
    from stages.train import TrainConfig, TrainError, run
    from store import StoreError

    flags = {"train.iterations": iterations, "execution.device": device, "train.retrain": retrain}
    params = load(params_path, sets, flags)
    cfg = config(params, "train", TrainConfig)
    execution = config(params, "execution", ExecutionConfig)
    try:
        run(cfg, execution, resume=resume, progress=not quiet, log=click.echo)
    except (TrainError, StoreError, CheckpointError, ConfigError) as exc:
        line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise click.ClickException(line) from None
    except OSError as exc:  # train.out where nothing can be written
        raise click.ClickException(os_error_line(exc)) from None


COMMANDS.append(train)
