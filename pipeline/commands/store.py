"""CLI commands: store (`deltaedit store info PATH`, `deltaedit store verify PATH`)."""

from __future__ import annotations

import json

import click
from tqdm import tqdm

from store import StoreError
from store.inspect import (
    describe,
    find_stores,
    format_info,
    open_for_check,
    verify_dataset,
    verify_store,
)

COMMANDS: list[click.Command] = []


@click.group(name="store")
def store_group() -> None:
    """Inspect and check Zarr stores (one .zarr group, or a dataset folder of them)."""


@store_group.command(name="info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def info_command(path: str, as_json: bool) -> None:
    """Arrays, shapes, dtypes, row status counts, blocks and provenance of the stores at PATH.

    PATH is a local path or fsspec URL of one `.zarr` group or a folder holding several.
    """
    try:
        urls = find_stores(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    infos, errors = [], []
    for url in urls:
        rs, reason = open_for_check(url)
        if rs is None:
            errors.append(reason)
        else:
            infos.append(describe(rs))
    if as_json:
        click.echo(json.dumps({"stores": infos, "errors": errors}, indent=2, default=str))
    else:
        for info in infos:
            click.echo("\n".join(format_info(info)))
        for reason in errors:
            click.echo(f"error: {reason}")
    if errors and not infos:
        raise SystemExit(1)


@store_group.command(name="verify")
@click.argument("path")
def verify_command(path: str) -> None:
    """Check the stores at PATH; exit 1 listing the reasons when one is not sound.

    Checks: shapes agree across arrays, shards match blocks, no pending blocks, done marks
    consistent with status, no NaN/Inf in ok rows, provenance on every array, and for a
    dataset folder that row counts agree across its stores.
    """
    try:
        urls = find_stores(path)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    failures: list[str] = []
    opened = []
    for url in urls:
        rs, reason = open_for_check(url)
        if rs is None:
            failures.append(reason or f"{url}: cannot be opened")
            continue
        opened.append(rs)
        with tqdm(
            total=rs.n_blocks, desc=f"verify {url}", unit="block", leave=False, disable=None
        ) as bar:
            reasons = verify_store(rs, progress=bar.update)
        failures.extend(f"{url}: {r}" for r in reasons)
        if not reasons:
            click.echo(f"ok: {url} ({rs.n_rows} rows, {len(rs.array_names)} arrays)")
    failures.extend(verify_dataset(opened))
    for reason in failures:
        click.echo(f"FAIL {reason}")
    if failures:
        click.echo(f"verify: {len(failures)} problem(s) in {path}", err=True)
        raise SystemExit(1)
    click.echo(f"verify: {len(urls)} store(s) sound in {path}")


COMMANDS.append(store_group)
