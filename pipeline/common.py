"""What every CLI command shares: the params file, overrides, one-line errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pipeline.params import ParamError, apply_overrides, load_params, parse_override, section

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def params_options(func: F) -> F:
    """Add `--params FILE` and repeatable `--set KEY=VALUE` to a command."""

    @click.option(
        "--params",
        "params_path",
        default="params.yaml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Params file read for this stage (a missing file means all defaults).",
    )
    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one params key, e.g. --set train.iterations=200 (repeatable).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def load(params_path: str, sets: tuple[str, ...] = (), flags: dict[str, Any] | None = None) -> dict:
    """Params file, then `--set` overrides, then explicit flags (None = not given)."""
    try:
        params = load_params(params_path)
        overrides = dict(parse_override(s) for s in sets)
        overrides.update({k: v for k, v in (flags or {}).items() if v is not None})
        return apply_overrides(params, overrides)
    except ParamError as exc:
        raise click.ClickException(str(exc)) from None


def config(params: dict, name: str, cls: type[T]) -> T:
    """One validated section, or a one-line CLI error before any work starts."""
    try:
        return section(params, name, cls)
    except ParamError as exc:
        raise click.ClickException(f"params: {exc}") from None
