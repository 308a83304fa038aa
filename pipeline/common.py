"""What every CLI command shares: the params file, overrides, one-line errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from pipeline.params import (
    ParamError,
    apply_overrides,
    check_sections,
    load_params,
    parse_override,
    section,
)

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
        help="Params file read for this stage (without --params: params.yaml, or all defaults "
        "when there is none; a file named here must exist).",
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
        path = kwargs.get("params_path")
        source = click.get_current_context().get_parameter_source("params_path")
        if source is not ParameterSource.DEFAULT and path and not Path(path).exists():
            raise click.ClickException(
                f"--params {path}: no such file (leave out --params to use params.yaml)"
            )
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def lease_option(func: F) -> F:
    """Add `--break-lease` to a command writing stores (it sets execution.break_lease)."""

    @click.option(
        "--break-lease",
        is_flag=True,
        help="Take over the output stores' write lease even when its holder looks alive "
        "(when you know that pass is gone); a stale lease is taken over without it.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, break_lease: bool = False, **kwargs: Any) -> Any:
        if break_lease:
            kwargs["sets"] = (*kwargs.get("sets", ()), "execution.break_lease=true")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def os_error_line(exc: OSError) -> str:
    """One line for a file system error: the path and what went wrong."""
    what = exc.strerror or type(exc).__name__
    if exc.filename:
        return f"{exc.filename}: {what.lower()} ({type(exc).__name__})"
    return f"{what} ({type(exc).__name__})"


def load(params_path: str, sets: tuple[str, ...] = (), flags: dict[str, Any] | None = None) -> dict:
    """Params file, then `--set` overrides, then explicit flags (None = not given)."""
    try:
        params = load_params(params_path)
        check_sections(params, str(params_path))
        overrides = dict(parse_override(s) for s in sets)
        check_sections({k.split(".", 1)[0]: None for k in overrides if k}, "--set")
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
