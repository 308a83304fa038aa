"""CLI commands: generator (`deltaedit convert-checkpoint IN OUT`)."""

from __future__ import annotations

from pathlib import Path

import click

from model.checkpoint import CheckpointError

COMMANDS: list[click.Command] = []


@click.command(name="convert-checkpoint")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def convert_checkpoint(src: str, out: str) -> None:
    """Convert a StyleGAN2 generator to this project's format (safetensors + JSON).

    SRC: rosinality `.pt` (`g_ema`, optional `latent_avg`), a plain generator state
    dict (`netG.pth`), an NVIDIA stylegan2-ada / stylegan3 SG2 `.pkl` (read as data,
    no code from the file runs) or an existing `.safetensors`. OUT: the `.safetensors`
    path; its config is written beside it as OUT with suffix `.json`.
    """
    from model.stylegan2 import load_generator, save_generator

    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise click.ClickException(f"{out}: the output must end in .safetensors")
    try:
        G = load_generator(src)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    save_generator(G, out_path)
    cfg = G.config
    click.echo(
        f"{src} -> {out_path} (+ {out_path.with_suffix('.json').name}): "
        f"{cfg.resolution} px, W={cfg.style_dim}, L={G.n_latent}, S dim {G.layout.dim} "
        f"(conv {G.layout.conv_dim}), fingerprint {G.fingerprint}"
    )


COMMANDS.append(convert_checkpoint)
