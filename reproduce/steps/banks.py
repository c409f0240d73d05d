"""Step 2: one contextual bank per LLM, built from a caption corpus with the paper's settings.

Paper mode (SPEC §2): no position skipped, no dedup, at most 20 contexts per token
string by reservoir sampling seeded 42, rows stored raw in float8 (clipped to ±448), at
the default layers {1,2,4,8,16,24} below n plus n-2, n-1. ``build_index`` checkpoints
shards, so an interrupted build resumes; a finished bank whose recorded settings match is
skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from latentlens import constants as C
from latentlens.atomic import atomic_path
from latentlens.bank import parse_dtype
from latentlens.extract import BuildConfig, build_index
from molmo.config import LLMS
from reproduce.judge.names import QWEN2VL
from reproduce.layout import QWEN2VL_HUB_ID, Layout, read_json_or_none

logger = logging.getLogger(__name__)


def llm_source(bank: str) -> str:
    """Hub id of the model a bank is built from: the LLM of ``olmo``/``llama``/``qwen``, or
    Qwen2-VL itself (its language model runs on text alone)."""

    return QWEN2VL_HUB_ID if bank == QWEN2VL else LLMS[bank].hub_id


def bank_done(
    folder: str | os.PathLike[str],
    settings: BuildConfig,
    layers: Sequence[int] | None = None,
) -> bool:
    """Whether ``folder`` holds a finished bank built with ``settings`` (and ``layers``)."""
    folder = Path(folder)
    manifest = read_json_or_none(folder / C.CONFIG_FILE)
    if not isinstance(manifest, dict):
        return False
    build = manifest.get("build") or {}
    want = {k: v for k, v in settings.to_dict().items() if k not in ("layers", "batch_size")}
    if any(build.get(k) != v for k, v in want.items()):
        return False
    have = [int(x) for x in manifest.get("layers", [])]
    if layers is not None and sorted(set(layers)) != sorted(have):
        return False
    return bool(have) and all(
        (folder / C.LAYER_FILE.format(layer=layer)).exists() for layer in have
    )


def extract_banks(
    layout: Layout,
    banks: Sequence[str],
    corpus: str | os.PathLike[str],
    *,
    sources: dict[str, str] | None = None,
    layers: Sequence[int] | None = None,
    settings: BuildConfig | None = None,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, str]:
    """Build each bank into ``<out>/banks/<name>`` unless it is already there.

    Args:
        layout: the run's folders.
        banks: ``olmo``, ``llama``, ``qwen`` and/or ``qwen2vl``.
        corpus: one sentence per line (.txt), first CSV column, or JSONL.
        sources: model folder / Hub id per bank (default :func:`llm_source`).
        layers: bank layers (default: the paper's for each model's depth).
        settings: extraction settings (default: the paper's).
        batch_size: sentences per forward pass.
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        dtype: model compute dtype (default fp16 on CUDA, fp32 on CPU).
        force: rebuild from scratch even when a finished bank is there.

    Returns:
        ``{bank: "built" | "skipped"}``.
    """

    settings = settings or BuildConfig.paper()
    status: dict[str, str] = {}
    for name in banks:
        out = layout.bank(name)
        if not force and bank_done(out, settings, layers):
            logger.info("step 2: bank %s is already built (%s)", name, out)
            status[name] = "skipped"
            continue
        source = (sources or {}).get(name) or llm_source(name)
        logger.info("step 2: building bank %s from %s over %s", name, source, corpus)
        build_index(
            source,
            corpus,
            layers=layers,
            batch_size=batch_size,
            device=torch.device(device) if device else None,
            dtype=parse_dtype(dtype) if dtype else None,
            output_dir=out,
            resume=not force,
            show_progress=show_progress,
            config=settings,
        )
        status[name] = "built"
    return status


def vg_phrases(region_descriptions: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write Visual Genome region phrases, one per line, from ``region_descriptions.json``.

    Phrases are whitespace-normalised and kept in file order, duplicates included, empty
    ones dropped (the paper's corpus: 2,992,111 phrases; a different VG release gives a
    different count).

    Returns:
        Phrases written.
    """

    with open(region_descriptions, encoding="utf-8") as f:
        images = json.load(f)
    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as w:
        for image in images:
            for region in image.get("regions", []):
                phrase = " ".join(str(region.get("phrase", "")).split())
                if phrase:
                    w.write(phrase + "\n")
                    n += 1
    return n
