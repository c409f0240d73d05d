"""Token × layer grids of a lens's top word per cell, coloured by its score."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from latentlens.results import InterpretResult

_CELL_W, _CELL_H = 0.95, 0.36  # inches per token column / layer row
_MAX_W, _MAX_H = 60.0, 40.0


def cell_label(token: str, max_chars: int = 9) -> str:
    """A token as it fits in a grid cell: surrounding spaces dropped, newlines shown."""
    s = token.replace("\n", "\\n").replace("\t", "\\t").strip()
    if not s:
        return repr(token) if token else "∅"
    return s if len(s) <= max_chars else s[: max_chars - 1] + "…"


def _size(n_pos: int, n_layers: int, n_panels: int) -> tuple[float, float]:
    w = min(_MAX_W, n_panels * (1.6 + _CELL_W * max(n_pos, 2)) + 0.5)
    h = min(_MAX_H, 1.6 + _CELL_H * max(n_layers, 2))
    return w, h


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend
    return fig


def draw_grid(
    fig: Figure,
    ax: Axes,
    result: InterpretResult,
    lens: str,
    *,
    cmap: str = "viridis",
    max_chars: int = 9,
    show_ylabel: bool = True,
) -> None:
    """Draw one lens's grid on ``ax``: columns = positions, rows = layers (0 at the bottom).

    The image data is the top-1 score ``[n_layers, n_positions]``; each cell is labelled
    with its top-1 token.
    """
    scores = result.top_scores(lens).numpy()
    words = result.top_tokens(lens)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    image = ax.imshow(
        np.ma.masked_invalid(scores),
        origin="lower",
        aspect="auto",
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        interpolation="nearest",
    )
    colormap = image.get_cmap()
    n_layers, n_pos = scores.shape
    font = 8 if n_pos <= 40 else 6
    for li in range(n_layers):
        for pi in range(n_pos):
            v = scores[li, pi]
            if not np.isfinite(v):
                continue
            r, g, b, _ = colormap((v - lo) / (hi - lo))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                pi,
                li,
                cell_label(words[li][pi], max_chars),
                ha="center",
                va="center",
                fontsize=font,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(n_pos))
    ax.set_xticklabels(
        [cell_label(t, 12) for t in result.tokens], rotation=45, ha="right", fontsize=font + 1
    )
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([str(x) for x in result.layers], fontsize=font + 1)
    ax.set_xlabel("input token")
    if show_ylabel:
        ax.set_ylabel("layer")
    ax.set_title(f"{lens} lens")
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
    bar.set_label(f"top-1 {result.score_names.get(lens, 'score')}")


def lens_grid(
    result: InterpretResult,
    lens: str | None = None,
    *,
    cmap: str = "viridis",
    max_chars: int = 9,
    title: str | None = None,
) -> Figure:
    """The familiar logit-lens picture for any lens: top word per (token, layer) cell.

    Args:
        result: the output of :func:`latentlens.interpret`.
        lens: which lens (default: the first one run).
        cmap: matplotlib colour map of the score.
        max_chars: longer words are cut in the cells.
        title: figure title (default: the input text, shortened).

    Returns:
        A ``Figure`` with one axes whose image holds the top-1 scores
        ``[n_layers, n_positions]``; save it with ``fig.savefig("grid.png")``.
    """
    name = lens or result.lenses[0]
    result.top_scores(name)  # raises KeyError for an unknown lens
    fig = _new_figure(*_size(len(result.positions), len(result.layers), 1))
    ax = fig.add_subplot()
    draw_grid(fig, ax, result, name, cmap=cmap, max_chars=max_chars)
    _suptitle(fig, result, title)
    return fig


def compare_lenses(
    result: InterpretResult,
    lenses: list[str] | None = None,
    *,
    cmap: str = "viridis",
    max_chars: int = 9,
    title: str | None = None,
) -> Figure:
    """The grids of several lenses for one sentence, side by side (each with its own scale).

    Args:
        result: the output of :func:`latentlens.interpret`.
        lenses: which lenses, in order (default: all that ran).
        cmap: matplotlib colour map of the scores.
        max_chars: longer words are cut in the cells.
        title: figure title (default: the input text, shortened).

    Returns:
        A ``Figure`` with one grid axes per lens.
    """
    names = lenses or result.lenses
    for name in names:
        result.top_scores(name)
    fig = _new_figure(*_size(len(result.positions), len(result.layers), len(names)))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        draw_grid(fig, ax, result, name, cmap=cmap, max_chars=max_chars, show_ylabel=i == 0)
    _suptitle(fig, result, title)
    return fig


def _suptitle(fig: Figure, result: InterpretResult, title: str | None) -> None:
    if title is None:
        text = result.text.replace("\n", " ")
        title = text if len(text) <= 100 else text[:99] + "…"
    if title:
        fig.suptitle(title)


def plot_result(
    result: InterpretResult, path: str | os.PathLike[str] | None = None, lens: str | None = None
) -> Figure:
    """Tokens × layers grid of the top word per cell, coloured by score.

    Args:
        result: what :func:`latentlens.interpret` returned.
        path: save the figure here (format from the suffix, e.g. ``.png``).
        lens: one lens's grid; default: that lens if only one ran, else all side by side.

    Returns:
        The matplotlib ``Figure`` (not shown; no pyplot state is touched).
    """
    if lens is None and len(result.lenses) > 1:
        fig = compare_lenses(result)
    else:
        fig = lens_grid(result, lens)
    if path is not None:
        fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return fig
