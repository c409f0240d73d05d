"""A picture of an image's visual tokens: grid, numbered patches, top words per layer."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from latentlens.results import ImageExplanation

_DISPLAY = 512  # the image is drawn at 512 px, like the original quickstart


def patch_figure(ex: ImageExplanation, layers: list[int] | None = None) -> Figure:
    """The image with its patch grid and the highlighted patches boxed and numbered, beside a
    table of each highlighted patch's top-1 neighbour (word, similarity, caption) per layer,
    and the LogitLens / EmbeddingLens top-1 beneath it when the explanation has them.

    Args:
        ex: the explanation to draw.
        layers: query layers to show (default all).

    Returns:
        A matplotlib ``Figure`` (not shown; save it with ``fig.savefig``).
    """
    layers = layers or ex.layers
    h, w = ex.grid
    n_rows = len(ex.patches)
    col_w = 3.4
    fig = Figure(figsize=(6.2 + col_w * len(layers), max(6.4, 0.62 * n_rows + 1.2)), dpi=100)
    ax_img = fig.add_axes((0.01, 0.06, 6.0 / fig.get_figwidth(), 0.88))
    img = np.asarray(ex.image.resize((_DISPLAY, _DISPLAY)))
    ax_img.imshow(img)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    ph, pw = _DISPLAY / h, _DISPLAY / w
    for r in range(1, h):
        ax_img.axhline(r * ph - 0.5, color="white", lw=0.3, alpha=0.5)
    for c in range(1, w):
        ax_img.axvline(c * pw - 0.5, color="white", lw=0.3, alpha=0.5)
    for i, p in enumerate(ex.patches, 1):
        r, c = ex.rc(p)
        ax_img.add_patch(
            Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, ec="red", lw=2)
        )
        ax_img.text(
            c * pw + 1,
            r * ph + 1,
            str(i),
            color="white",
            fontsize=8,
            va="top",
            bbox={"facecolor": "red", "pad": 1, "lw": 0},
        )
    ax_img.set_title(f"{ex.image_name or 'image'} — {h}×{w} visual tokens", fontsize=10)
    x0 = 6.2 / fig.get_figwidth()
    span = (1 - x0) / len(layers)
    for j, layer in enumerate(layers):
        x = x0 + j * span
        fig.text(x, 0.96, f"layer {layer}", fontsize=10, weight="bold")
        for i, p in enumerate(ex.patches):
            nb = ex.neighbors[layer][p][0]
            y = 0.91 - i * (0.86 / max(n_rows, 1))
            fig.text(
                x,
                y,
                f"#{i + 1} {nb.token_str.strip()!r}  {nb.similarity:.2f}  (L{nb.contextual_layer})",
                fontsize=8.5,
                family="monospace",
            )
            caption = textwrap.shorten(nb.caption, width=52, placeholder="…")
            fig.text(x + 0.01, y - 0.025, caption, fontsize=7, color="#555555")
            others = [
                f"{short}: {ex.baselines[name][layer][p][0].token_str.strip()!r}"
                for name, short in (("logitlens", "logit"), ("embeddinglens", "emb"))
                if name in ex.baselines
            ]
            if others:  # the baselines' top-1 on the same state (the three-lens view)
                fig.text(x + 0.01, y - 0.045, "   ".join(others), fontsize=7, color="#1f4e99")
    return fig
