"""Fetch bank files from the Hugging Face Hub: only the requested layers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from latentlens import constants as C
from latentlens.atomic import read_json
from latentlens.bank import select_layers
from latentlens.errors import BankFormatError, LayerNotFoundError


def download_bank(
    repo_id: str,
    layers: Sequence[int] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the manifest, entry table and requested layer files of a Hub bank.

    Reads our format (``config.json``) or, failing that, the original release's
    (``metadata.json`` + ``layer_N/embeddings_cache.pt``). Files already in the cache are
    not downloaded again; with ``HF_HUB_OFFLINE=1`` only the cache is used.

    Returns:
        The local snapshot directory holding the files.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache = str(cache_dir) if cache_dir is not None else None

    def fetch(name: str) -> Path:
        return Path(
            hf_hub_download(repo_id, name, revision=revision, cache_dir=cache, repo_type="model")
        )

    missing_errors = (EntryNotFoundError, LocalEntryNotFoundError)

    def fetch_layer(layer: int, name: str) -> Path:
        try:
            return fetch(name)
        except missing_errors as e:
            offline = isinstance(e, LocalEntryNotFoundError)
            where = "in the local cache (offline: HF_HUB_OFFLINE=1)" if offline else "on the Hub"
            raise LayerNotFoundError(
                f"layer {layer} of {repo_id} ({name}) is not {where}; download it while "
                "online or ask for cached layers only"
            ) from e

    try:
        config_path = fetch(C.CONFIG_FILE)
    except missing_errors:
        config_path = None
    if config_path is not None:
        manifest = read_json(config_path)
        available = [int(x) for x in manifest.get("layers", [])]
        chosen = select_layers(available, layers, repo_id)
        for name in (C.ENTRIES_FILE, C.CAPTIONS_FILE, C.TOKENS_FILE):
            fetch(name)
        for layer in chosen:
            fetch_layer(layer, C.LAYER_FILE.format(layer=layer))
        return config_path.parent
    try:
        meta_path = fetch(C.LEGACY_META_FILE)
    except missing_errors as e:
        raise BankFormatError(
            f"{repo_id} has neither {C.CONFIG_FILE} nor {C.LEGACY_META_FILE} "
            f"(or they are not in the local cache while offline): {e}"
        ) from e
    meta = read_json(meta_path)
    available = [int(x) for x in meta.get("layers", [])] if isinstance(meta, dict) else []
    chosen = select_layers(available, layers, repo_id)
    for layer in chosen:
        fetch_layer(layer, C.LEGACY_LAYER_FILE.format(layer=layer))
    return meta_path.parent
