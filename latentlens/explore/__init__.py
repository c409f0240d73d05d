"""The explorer: a static site to click through every visual token of your results.

``latentlens explore RESULTS... -o SITE/`` (or :func:`write_site`) turns the JSON of
``explain-image`` / ``explain-video`` / quickstart into pages that work from ``file://``:
a landing page, one page per model, one image page with the patch grid, a layer selector
and the three lenses side by side. :class:`Site` is the writer the paper pipeline uses too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from latentlens.explore.explanations import add_explanations
from latentlens.explore.site import Group, ModelPages, Site, Token, Verdict, grid_tokens

__all__ = [
    "Group",
    "ModelPages",
    "Site",
    "Token",
    "Verdict",
    "add_explanations",
    "grid_tokens",
    "write_site",
]


def write_site(
    results: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] | None = None,
    title: str = "latentlens explorer",
) -> Path:
    """Write the explorer site for explanation JSON files (or folders of them).

    Returns:
        The site folder; open ``index.html`` in a browser.

    Raises:
        ExploreError: unreadable results, a missing image, or an output folder that is not
            a latentlens site.
    """
    with Site(out_dir, title=title) as site:
        add_explanations(site, results, images_dir)
    return site.out
