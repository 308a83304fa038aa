"""CLI commands: encode (ingest, import-official, encode-clip, encode-s, sample).

Each command reads its params section (+ `execution` and the model references it
needs), validates them before any work, runs the stage (resumable: a rerun redoes
only pending blocks; --overwrite starts over) and prints a summary line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from model.checkpoint import CheckpointError
from pipeline.common import config, lease_option, load, os_error_line, params_options
from stages.common import ClipRef, E4ERef, ExecutionConfig, GeneratorRef
from store import StoreError

# The stage modules (torch, open_clip) are imported inside each command, so a command
# that finds nothing to do (`deltaedit ingest` over an unchanged folder) starts fast.

COMMANDS: list[click.Command] = []

_overwrite = click.option(
    "--overwrite", is_flag=True, help="Discard existing outputs and start over (default: resume)."
)
_restart = click.option(
    "--restart-on-change",
    is_flag=True,
    help="Start over when the output was made with other models or preprocessing (for dvc "
    "repro after a params change; default: stop with an error naming the change). A changed "
    "folder never needs it: unchanged rows are reused, new or changed ones computed.",
)
_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
_reuse = click.option(
    "--reuse",
    multiple=True,
    metavar="STORE",
    help="Also reuse rows (by source bytes) of this store or dataset folder, made with the "
    "same models and preprocessing (repeatable; refused otherwise).",
)


def _run(func: Callable[[], Any], *errors: type[Exception]) -> Any:
    """Run a stage; bad input (`errors`: the stage's own error classes) and store problems
    become one-line CLI errors."""
    try:
        return func()
    except (StoreError, CheckpointError, *errors) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    except OSError as exc:  # an output path that cannot be written, a file gone missing
        raise click.ClickException(os_error_line(exc)) from None


def _echo_summary(summary, details: list[str] | None = None, counts=None) -> None:
    click.echo(summary.line())
    if counts is not None:
        click.echo(counts.line(summary.name))
    for line in details if details is not None else summary.details():
        click.echo(f"  {line}")


@click.command("ingest")
@click.argument("source", required=False)
@click.option("--out", help="Dataset folder for manifest.zarr [params ingest.out].")
@_overwrite
@_restart
@_reuse
@_quiet
@lease_option
@params_options
def ingest_cmd(
    source: str | None,
    out: str | None,
    overwrite: bool,
    restart_on_change: bool,
    reuse: tuple[str, ...],
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """Index a folder of images (or webdataset .tar shards) into <out>/manifest.zarr.

    Every file is hashed and decode-checked; bad files become rows with a status
    (unreadable, too large, duplicate ...) listed in the summary, never a crash.
    """
    from stages.ingest import IngestConfig, IngestError, run_ingest

    params = load(params_path, sets, {"ingest.source": source, "ingest.out": out})
    cfg = config(params, "ingest", IngestConfig)
    execution = config(params, "execution", ExecutionConfig)
    result = _run(
        lambda: run_ingest(cfg, execution, overwrite, not quiet, restart_on_change, reuse),
        IngestError,
    )
    _echo_summary(result.summary, result.lines, result.counts)
    click.echo(f"wrote {result.manifest}")


@click.command("import-official")
@click.option("--sspace", help="sspace_*_feat.npy [params import_official.sspace].")
@click.option("--cspace", help="cspace_*_feat.npy [params import_official.cspace].")
@click.option("--wspace", help="wspace_*_feat.npy [params import_official.wspace].")
@click.option("--out", help="Dataset folder [params import_official.out].")
@_overwrite
@_restart
@_quiet
@lease_option
@params_options
def import_official_cmd(
    sspace: str | None,
    cspace: str | None,
    wspace: str | None,
    out: str | None,
    overwrite: bool,
    restart_on_change: bool,
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """Import DeltaEdit's published latents (S, CLIP, W+ .npy files) as a dataset."""
    flags = {
        "import_official.sspace": sspace,
        "import_official.cspace": cspace,
        "import_official.wspace": wspace,
        "import_official.out": out,
    }
    from stages.ingest import ImportOfficialConfig, IngestError, run_import_official

    params = load(params_path, sets, flags)
    cfg = config(params, "import_official", ImportOfficialConfig)
    generator = config(params, "generator", GeneratorRef)
    execution = config(params, "execution", ExecutionConfig)
    result = _run(
        lambda: run_import_official(
            cfg, generator, execution, overwrite, not quiet, restart_on_change
        ),
        IngestError,
    )
    _echo_summary(result.summary, result.lines)
    kind = "conv-only S (layout recorded)" if result.conv_only else "full S"
    click.echo(f"wrote {result.out}/{{manifest,clip,s}}.zarr ({kind})")


@click.command("encode-clip")
@click.option("--dataset", help="Dataset folder holding manifest.zarr [encode_clip.dataset].")
@_overwrite
@_restart
@_reuse
@_quiet
@lease_option
@params_options
def encode_clip_cmd(
    dataset: str | None,
    overwrite: bool,
    restart_on_change: bool,
    reuse: tuple[str, ...],
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """CLIP image embeddings of every OK manifest row -> <dataset>/clip.zarr."""
    from stages.encode_clip import EncodeClipConfig, run_encode_clip

    params = load(params_path, sets, {"encode_clip.dataset": dataset})
    cfg = config(params, "encode_clip", EncodeClipConfig)
    clip_ref = config(params, "clip", ClipRef)
    execution = config(params, "execution", ExecutionConfig)
    result = _run(
        lambda: run_encode_clip(
            cfg, clip_ref, execution, overwrite, not quiet, restart_on_change, reuse
        )
    )
    _echo_summary(result.summary, counts=result.counts)
    click.echo(f"wrote {result.out}")


@click.command("encode-s")
@click.option("--dataset", help="Dataset folder holding manifest.zarr [encode_s.dataset].")
@_overwrite
@_restart
@_reuse
@_quiet
@lease_option
@params_options
def encode_s_cmd(
    dataset: str | None,
    overwrite: bool,
    restart_on_change: bool,
    reuse: tuple[str, ...],
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """e4e inversion of every OK manifest row -> W+ -> S -> <dataset>/s.zarr."""
    from stages.encode_s import EncodeSConfig, EncodeSError, run_encode_s

    params = load(params_path, sets, {"encode_s.dataset": dataset})
    cfg = config(params, "encode_s", EncodeSConfig)
    generator = config(params, "generator", GeneratorRef)
    e4e = config(params, "e4e", E4ERef)
    execution = config(params, "execution", ExecutionConfig)
    result = _run(
        lambda: run_encode_s(
            cfg, generator, e4e, execution, overwrite, not quiet, restart_on_change, reuse
        ),
        EncodeSError,
    )
    _echo_summary(result.summary, counts=result.counts)
    click.echo(f"wrote {result.out}")


@click.command("sample")
@click.option("--n", "n", type=int, help="Rows to sample [params sample.n].")
@click.option("--seed", type=int, help="Seed [params sample.seed].")
@click.option("--out", help="Dataset folder [params sample.out].")
@_overwrite
@_restart
@_quiet
@lease_option
@params_options
def sample_cmd(
    n: int | None,
    seed: int | None,
    out: str | None,
    overwrite: bool,
    restart_on_change: bool,
    quiet: bool,
    params_path: str,
    sets,
) -> None:
    """Synthetic rows: z -> W+ -> S -> render -> CLIP, into <out>/{manifest,clip,s}.zarr."""
    from stages.sample import SampleConfig, run_sample

    params = load(params_path, sets, {"sample.n": n, "sample.seed": seed, "sample.out": out})
    cfg = config(params, "sample", SampleConfig)
    generator = config(params, "generator", GeneratorRef)
    clip_ref = config(params, "clip", ClipRef)
    execution = config(params, "execution", ExecutionConfig)
    result = _run(
        lambda: run_sample(
            cfg, generator, clip_ref, execution, overwrite, not quiet, restart_on_change
        )
    )
    _echo_summary(result.summary)
    click.echo(f"wrote {result.out}/{{manifest,clip,s}}.zarr")


COMMANDS.extend([ingest_cmd, import_official_cmd, encode_clip_cmd, encode_s_cmd, sample_cmd])
