"""A small inline SVG line plot: percent per layer, one line per lens (no script needed)."""

from __future__ import annotations

import html
from collections.abc import Mapping

COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def layer_plot(
    series: Mapping[str, Mapping[int, float]], width: int = 220, height: int = 110
) -> str:
    """``<svg>`` of ``label → {layer: percent}``: x the layers (evenly spaced), y 0–100 %.

    Each point carries a ``<title>`` (``LatentLens, layer 8: 72%``) for hovering.
    """
    layers = sorted({int(x) for pts in series.values() for x in pts})
    left, right, top, bottom = 28, 8, 8, 30
    w, h = width - left - right, height - top - bottom

    def x_of(layer: int) -> float:
        if len(layers) == 1:
            return left + w / 2
        return left + w * layers.index(layer) / (len(layers) - 1)

    def y_of(pct: float) -> float:
        return top + h * (1 - max(0.0, min(100.0, pct)) / 100)

    out = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="interpretable % per layer">'
    ]
    for pct in (0, 50, 100):
        y = y_of(pct)
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 3}" y="{y + 3:.1f}" font-size="9" text-anchor="end">{pct}</text>'
        )
    step = max(1, len(layers) // 6)
    for i, layer in enumerate(layers):
        if i % step == 0 or i == len(layers) - 1:
            out.append(
                f'<text x="{x_of(layer):.1f}" y="{top + h + 11}" font-size="9" '
                f'text-anchor="middle">{layer}</text>'
            )
    for k, (label, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        xy = [
            (x_of(int(x)), y_of(float(v))) for x, v in sorted(pts.items(), key=lambda t: int(t[0]))
        ]
        if len(xy) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>'
            )
        for (x, y), (layer, v) in zip(
            xy, sorted(pts.items(), key=lambda t: int(t[0])), strict=True
        ):
            tip = html.escape(f"{label}, layer {layer}: {float(v):.0f}%")
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{color}"><title>{tip}</title></circle>'
            )
        lx = left + k * (w / max(1, len(series)))
        out.append(
            f'<text x="{lx:.1f}" y="{height - 4}" font-size="9" fill="{color}">'
            f"{html.escape(label)}</text>"
        )
    out.append("</svg>")
    return "".join(out)
