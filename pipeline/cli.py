"""The `deltaedit` command: one subcommand per stage, plus store tools."""

from __future__ import annotations

import click

from pipeline.commands import edit, encode, generator, store, train, world


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltaedit")
def main() -> None:
    """deltaedit: text-driven editing of whole image datasets (DeltaEdit, CVPR 2023).

    Encode a dataset once into a Zarr store of CLIP embeddings and StyleGAN2 S
    codes, train the Delta Mapper on random pairs without text, then edit every
    row with any prompt from the cached latents. Every stage reads params.yaml
    (--params, --set KEY=VALUE); `dvc repro` runs them all.
    """


for _module in (store, generator, encode, train, edit, world):
    for _command in _module.COMMANDS:
        main.add_command(_command)
