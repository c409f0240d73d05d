"""Option parsing shared by the command-line faces (`latentlens`, `python -m reproduce`,
quickstart.py): one parser per kind of value, so every face reads them alike."""

from __future__ import annotations

import click


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
