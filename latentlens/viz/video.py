"""A strip of a video's temporal groups: each group's first frame, its token grid, and the
top neighbour of the highlighted tokens at one query layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from latentlens.results import VideoExplanation

_PANEL = 3.0  # inches per frame panel


def video_strip(ex: VideoExplanation, layer: int | None = None) -> Figure:
    """One panel per temporal group (its first frame) with the token grid; the highlighted
    tokens are boxed, numbered and labelled with their top-1 word at ``layer``.

    Args:
        ex: the explanation to draw.
        layer: the query layer whose neighbours label the boxes (default: the first).

    Returns:
        A matplotlib ``Figure`` (save it with ``fig.savefig``).
    """
    layer = ex.layers[0] if layer is None else layer
    groups = ex.groups
    fig = Figure(figsize=(_PANEL * len(groups), _PANEL + 0.9), dpi=100)
    for g, first in enumerate(groups):
        ax = fig.add_axes((g / len(groups) + 0.005, 0.2, 1 / len(groups) - 0.01, 0.7))
        frame = ex.frames[first]
        ax.imshow(np.asarray(frame))
        ax.set_xticks([])
        ax.set_yticks([])
        tokens = [(i, a) for i, a in enumerate(ex.addresses) if a.frame == first]
        last = tokens[0][1].frames[1] if tokens and tokens[0][1].frames else first
        ax.set_title(f"frames {first}–{last}", fontsize=9)
        for i, a in tokens:
            if a.pixel_box is None:
                continue
            x0, y0, x1, y1 = a.pixel_box
            chosen = i in ex.patches
            ax.add_patch(
                Rectangle(
                    (x0, y0),
                    x1 - x0,
                    y1 - y0,
                    fill=False,
                    ec="red" if chosen else "white",
                    lw=1.6 if chosen else 0.3,
                    alpha=1.0 if chosen else 0.5,
                )
            )
            if chosen:
                n = ex.patches.index(i) + 1
                word = ex.neighbors[layer][i][0].token_str.strip()
                ax.text(
                    x0,
                    y0,
                    f"{n} {word}",
                    color="white",
                    fontsize=7,
                    va="top",
                    bbox={"facecolor": "red", "pad": 1, "lw": 0},
                )
    fig.text(
        0.01,
        0.04,
        f"{ex.video_name or 'video'} — {len(ex.frames)} frames, {len(groups)} temporal groups, "
        f"{len(ex.addresses)} visual tokens; labels: top-1 neighbour at layer {layer}",
        fontsize=8,
    )
    return fig
