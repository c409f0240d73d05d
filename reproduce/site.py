"""The explorer site of a pipeline run (step 6): lens files, images and judge verdicts.

Each model's image page shows the image as its vision encoder framed it (the judge's view,
`render_view`), so the uniform patch grid lines up with the picture; the judge's verdicts
mark the judged patches, and its interpretable % per layer makes the landing page's plots.
One layer's three lens files are read at a time, so a 300-image run never sits in memory
whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from latentlens.errors import ExploreError
from latentlens.explore import Group, Site, Verdict, grid_tokens
from latentlens.explore.explanations import patch_neighbors
from latentlens.explore.site import MARKER
from reproduce.judge.aggregate import layer_percent, load_evaluations
from reproduce.judge.names import CONNECTOR_MODELS, MODEL_LABELS, encoder_for_model
from reproduce.judge.render import load_rgb, render_view
from reproduce.layout import PAPER_MODELS, Layout, bank_name, read_json_or_none
from reproduce.lens_files import ALL_LENSES, LensImage, find_layer_files, load_lens_layer

logger = logging.getLogger(__name__)


def run_models(layout: Layout) -> list[str]:
    """The paper's models that have lens files in the run, in the paper's order."""
    return [
        m
        for m in PAPER_MODELS
        if any(find_layer_files(layout.lens_dir(lens, m)) for lens in ALL_LENSES)
    ]


def _verdicts(
    items: Sequence[Mapping[str, Any]], grids: Mapping[int, tuple[int, int]]
) -> dict[int, dict[int, dict[int, Verdict]]]:
    """``image_idx → layer → token id → verdict`` from one (lens, model) judge run."""
    out: dict[int, dict[int, dict[int, Verdict]]] = {}
    for item in items:
        layer = int(item.get("layer", -1))
        for p in item.get("patches") or []:
            idx = int(p["image_idx"])
            if idx not in grids:
                continue
            judgment = p.get("judgment") or {}
            token = int(p["patch_row"]) * grids[idx][1] + int(p["patch_col"])
            out.setdefault(idx, {}).setdefault(layer, {})[token] = Verdict(
                interpretable=bool(p.get("interpretable")),
                candidate_words=tuple(map(str, p.get("candidate_words") or ())),
                concrete=tuple(map(str, judgment.get("concrete_words") or ())),
                abstract=tuple(map(str, judgment.get("abstract_words") or ())),
                global_=tuple(map(str, judgment.get("global_words") or ())),
                reasoning=str(judgment.get("reasoning") or ""),
                failed=bool(p.get("failed")),
            )
    return out


def _label_parts(model: str) -> tuple[str | None, str | None]:
    label = MODEL_LABELS.get(model, model)
    if model in CONNECTOR_MODELS and "+" in label:
        llm, enc = label.split("+", 1)
        return llm, enc
    return None, None


def add_model(
    site: Site,
    layout: Layout,
    model: str,
    evaluations: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    images: Mapping[int, Mapping[str, Any]],
    max_images: int | None = None,
) -> int:
    """Add one model's images and lens files to ``site``; the number of images added."""
    files = {lens: find_layer_files(layout.lens_dir(lens, model)) for lens in ALL_LENSES}
    layers = sorted({x for per in files.values() for x in per})
    if not layers:
        return 0
    # The images and their grids, from the smallest file of the run.
    smallest = min(
        (p for per in files.values() for p in per.values()), key=lambda p: p.stat().st_size
    )
    first = load_lens_layer(smallest)
    wanted: list[LensImage] = [im for im in first.images if im.image_idx in images]
    missing = [im.image_idx for im in first.images if im.image_idx not in images]
    if missing:
        logger.warning("%s: images %s are not in the run's manifest; left out", model, missing)
    wanted = wanted[:max_images] if max_images else wanted
    grids = {im.image_idx: im.grid for im in wanted}
    interp: dict[str, dict[int, float]] = {}
    verdicts: dict[str, dict[int, dict[int, dict[int, Verdict]]]] = {}
    for lens in ALL_LENSES:
        items = evaluations.get(lens, {}).get(model) or []
        pct = {int(it["layer"]): layer_percent(it) for it in items if "layer" in it}
        if any(v is not None for v in pct.values()):
            interp[lens] = {k: v for k, v in pct.items() if v is not None}
        verdicts[lens] = _verdicts(items, grids)
    llm, enc = _label_parts(model)
    encoder = encoder_for_model(model)
    pages = site.model(
        model,
        label=MODEL_LABELS.get(model, model),
        family="Molmo-style connector VLM" if model in CONNECTOR_MODELS else model,
        bank=bank_name(model),
        llm=llm,
        encoder=enc,
        interpretability=interp,
    )
    for im in tqdm(wanted, desc=f"{model}: images", unit="image", leave=False):
        rec = images[im.image_idx]
        view = render_view(load_rgb(layout.images / rec["path"]), encoder)
        judge = {lens: v[im.image_idx] for lens, v in verdicts.items() if im.image_idx in v}
        pages.add_image(
            im.image_idx,
            pictures=[view],
            groups=[Group("image", 0)],
            tokens=grid_tokens(*im.grid),
            name=Path(rec["path"]).name,
            caption=str(rec.get("caption") or im.caption),
            judge=judge,
        )
    for layer in tqdm(layers, desc=f"{model}: layers", unit="layer", leave=False):
        loaded = {  # the smallest file was read above already
            lens: {
                x.image_idx: x
                for x in (
                    first if per[layer] == smallest else load_lens_layer(per[layer], layer)
                ).images
            }
            for lens, per in files.items()
            if layer in per
        }
        for im in wanted:
            h, w = im.grid
            rows: dict[str, list[list[Any]]] = {}
            for lens, by_image in loaded.items():
                got = by_image.get(im.image_idx)
                if got is None:
                    continue
                if got.grid != im.grid:
                    raise ExploreError(
                        f"{model}: image {im.image_idx} has a {got.grid} grid at layer {layer} "
                        f"of {lens}, {im.grid} elsewhere"
                    )
                rows[lens] = [
                    patch_neighbors(got.patches[(r, c)]).get(lens, [])
                    if (r, c) in got.patches
                    else []
                    for r in range(h)
                    for c in range(w)
                ]
            if rows:
                pages.add_layer(im.image_idx, layer, rows)
    return len(wanted)


def add_run(
    site: Site,
    root: str | os.PathLike[str],
    models: Sequence[str] | None = None,
    max_images: int | None = None,
) -> list[str]:
    """Add every model of a pipeline run (or ``models``) to ``site``; the models added.

    Raises:
        ExploreError: no image manifest, or no model with lens files.
    """
    layout = Layout.at(root)
    manifest = read_json_or_none(layout.images / "manifest.json")
    if not isinstance(manifest, dict) or not manifest.get("images"):
        raise ExploreError(f"{layout.images / 'manifest.json'}: no images (run step 3 first)")
    images = {int(r["index"]): r for r in manifest["images"] if r.get("path")}
    evaluations = load_evaluations(layout.eval) if layout.eval.is_dir() else {}
    names = list(models) if models else run_models(layout)
    added = [m for m in names if add_model(site, layout, m, evaluations, images, max_images)]
    if not added:
        raise ExploreError(f"{layout.root}: no lens files (run step 3 first)")
    return added


def _latest_input(layout: Layout) -> float:
    inputs = [layout.images / "manifest.json"]
    inputs += list(layout.lenses.rglob("*.json")) if layout.lenses.is_dir() else []
    inputs += list(layout.eval.rglob("evaluation_results.json")) if layout.eval.is_dir() else []
    return max((p.stat().st_mtime for p in inputs if p.is_file()), default=0.0)


def site_step(
    layout: Layout,
    models: Sequence[str] | None = None,
    *,
    force: bool = False,
    max_images: int | None = None,
    title: str = "LatentLens — the paper's models",
) -> Path | None:
    """Step 6: write ``<out>/site/``; ``None`` when it is newer than every input already.

    Raises:
        ExploreError: no images or no lens files yet.
    """
    marker = layout.site / MARKER
    if not force and marker.is_file() and marker.stat().st_mtime >= _latest_input(layout):
        return None
    with Site(layout.site, title=title) as site:
        add_run(site, layout.root, models, max_images)
    return layout.site
