"""One self-contained HTML page listing vectors (SAE features, steering vectors) with their
nearest contexts, in the explorer's style: the token's own occurrence marked by its span."""

from __future__ import annotations

import html
from collections.abc import Sequence
from importlib.resources import files

from latentlens.results import Neighbor
from latentlens.vectors import VectorExplanation


def _caption(n: Neighbor) -> str:
    if not n.char_span:
        return html.escape(n.caption)
    i, j = n.char_span
    c = n.caption
    return f"{html.escape(c[:i])}<mark>{html.escape(c[i:j])}</mark>{html.escape(c[j:])}"


def vectors_html(items: Sequence[VectorExplanation], title: str, subtitle: str = "") -> str:
    """The page: one section per vector, a row per context (token, similarity, bank layer,
    caption with the occurrence marked). No script, no network."""
    css = (files("latentlens.explore") / "static" / "explorer.css").read_text(encoding="utf-8")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{css}\n"
        ".vec{border:1px solid #e4e4e4;border-radius:4px;padding:8px;margin:10px 0;max-width:980px}"
        ".vec table{border-collapse:collapse;width:100%}"
        ".vec td{padding:2px 6px;border-bottom:1px solid #f0f0f0;vertical-align:top}"
        "</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)}</p>"
        "</header>",
    ]
    for it in items:
        parts.append(
            f'<section class="vec" id="v{it.index}"><h3>{html.escape(it.name)} '
            f'<span class="muted">norm {it.norm:.3g}</span></h3>'
        )
        if not it.neighbors:
            parts.append('<p class="muted">zero vector: no direction</p></section>')
            continue
        parts.append("<table>")
        for n in it.neighbors:
            parts.append(
                f'<tr class="nb"><td class="tok">{html.escape(repr(n.token_str))}</td>'
                f'<td class="num">{n.similarity:.3f}</td>'
                f'<td><span class="badge">L{n.contextual_layer}</span></td>'
                f'<td class="cap">{_caption(n)}</td></tr>'
            )
        parts.append("</table></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
