"""Option parsing shared by the command-line faces (`latentlens`, `python -m reproduce`,
quickstart.py): one parser per kind of value, so every face reads them alike; and the one
way a command reports a user's mistake."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from latentlens.errors import LatentLensError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn user mistakes (bad input, settings, files) into one line on stderr and exit 1.

    Set ``LATENTLENS_DEBUG=1`` to see the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LatentLensError, ValueError, OSError) as e:
            if os.environ.get("LATENTLENS_DEBUG"):
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def parse_int_list(value: str | None) -> list[int] | None:
    """``"1,2,8"`` → ``[1, 2, 8]``; ``None``/``""`` → ``None``; anything else is a usage error."""
    if value is None or not value.strip():
        return None
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def parse_layers(value: str | None) -> list[int] | None:
    """Like :func:`parse_int_list`, with ``"all"``/``"auto"`` (any case) meaning the default."""
    if value is not None and value.strip().lower() in ("all", "auto"):
        return None
    return parse_int_list(value)
