"""Step 1: fetch what the chosen models need from the Hub, or make the tiny stand-ins.

Only what is asked for: a connector per connector VLM, the public Qwen2-VL bank (its
requested layers only), and with ``base=True`` the base LLM / ViT / Qwen2-VL weights.
Hub downloads land in the Hugging Face cache: an interrupted download resumes, and
with ``HF_HUB_OFFLINE=1`` everything is taken from the cache. ``<out>/downloads.json``
records the local paths; a later run whose record covers the request skips the step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from latentlens.atomic import write_json
from latentlens.hub import download_bank
from molmo.checkpoint import download_connector
from molmo.config import MODELS
from reproduce.data.tiny import read_tiny, setup_tiny
from reproduce.layout import (
    QWEN2VL_BANK,
    QWEN2VL_HUB_ID,
    Layout,
    bank_name,
    model_kind,
    read_json_or_none,
)

logger = logging.getLogger(__name__)

# Files of a base model that loading needs (weights, configs, tokenizer, processor).
BASE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py")


def _request(
    models: Sequence[str], bank_layers: Sequence[int] | None, base: bool, public_bank: bool
) -> dict[str, Any]:
    return {
        "models": list(models),
        "bank_layers": sorted(bank_layers) if bank_layers is not None else None,
        "base": base,
        "public_bank": public_bank,
    }


def download_done(layout: Layout, request: dict[str, Any]) -> bool:
    """Whether ``downloads.json`` covers ``request`` and every file it lists still exists."""
    record = read_json_or_none(layout.downloads)
    if not isinstance(record, dict) or record.get("request") != request:
        return False
    paths = [p for p in record.get("files", {}).values() if p]
    return all((layout.root / p).exists() for p in paths)  # relative = inside the run


def download(
    layout: Layout,
    models: Sequence[str],
    *,
    bank_layers: Sequence[int] | None = None,
    base: bool = False,
    public_bank: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fetch the connectors (and optionally base models and the public Qwen2-VL bank).

    Args:
        layout: the run's folders.
        models: model names (``olmo-vit``, …, ``qwen2vl``).
        bank_layers: layers of the public Qwen2-VL bank to fetch (default: all).
        base: also fetch the base LLMs, ViTs and Qwen2-VL (what steps 2–3 load).
        public_bank: fetch the public Qwen2-VL bank when ``qwen2vl`` is among ``models``.
        cache_dir: Hugging Face cache directory.
        token: Hub token (Llama-3 is gated).
        force: fetch even when ``downloads.json`` says it is done.

    Returns:
        ``{"request": …, "files": {item: local path}, "skipped": bool}``.
    """
    from huggingface_hub import snapshot_download

    request = _request(models, bank_layers, base, public_bank)
    if not force and download_done(layout, request):
        logger.info("step 1: everything requested is already downloaded (%s)", layout.downloads)
        record = read_json_or_none(layout.downloads)
        return {**record, "skipped": True}
    hub: dict[str, Any] = {"cache_dir": cache_dir, "token": token}
    files: dict[str, str] = {}
    bases: set[str] = set()
    for name in models:
        if model_kind(name) == "qwen2vl":
            if public_bank:
                logger.info("fetching the public Qwen2-VL bank %s", QWEN2VL_BANK)
                files[f"bank:{QWEN2VL_BANK}"] = str(
                    download_bank(QWEN2VL_BANK, layers=bank_layers, cache_dir=cache_dir)
                )
            if base:
                bases.add(QWEN2VL_HUB_ID)
            continue
        logger.info("fetching the connector of %s", name)
        files[f"connector:{name}"] = str(download_connector(name, **hub))
        if base:
            bases |= {MODELS[name].llm.hub_id, MODELS[name].vision.hub_id}
    for repo in sorted(bases):
        logger.info("fetching base model %s", repo)
        files[f"base:{repo}"] = snapshot_download(repo, allow_patterns=list(BASE_PATTERNS), **hub)
    record = {"request": request, "files": files}
    write_json(layout.downloads, record)
    return {**record, "skipped": False}


def setup_tiny_step(
    layout: Layout, models: Sequence[str], *, force: bool = False
) -> dict[str, Any]:
    """Step 1 of ``--tiny``: make the tiny models and data instead of downloading.

    Returns:
        ``{"request": …, "files": …, "skipped": bool}`` like :func:`download`.
    """

    request = {"tiny": True, "models": list(models)}
    if not force and download_done(layout, request):
        try:
            read_tiny(layout)
            logger.info("step 1: the tiny models are already made (%s)", layout.models)
            return {**read_json_or_none(layout.downloads), "skipped": True}
        except FileNotFoundError:
            pass
    setup_tiny(layout, list(models))
    files = {"corpus": "models/data/corpus.txt", "images": "models/data/images.jsonl"}
    for name in models:
        files[f"model:{name}"] = f"models/{name}"
        if model_kind(name) == "molmo":
            files[f"llm:{bank_name(name)}"] = f"models/llm-{bank_name(name)}"
    record = {"request": request, "files": files}
    write_json(layout.downloads, record)
    return {**record, "skipped": False}
