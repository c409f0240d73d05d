"""Banks on the Hugging Face Hub: fetch only the requested layers; publish a bank with a card.

A published bank is the bank directory itself (one file per layer, so users download only
the layers they need, the entry table, the manifest, the per-layer statistics) plus a
``README.md`` model card whose YAML metadata says ``library_name: latentlens``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
        try:  # optional (banks written before it existed have none)
            fetch(C.STATS_FILE)
        except missing_errors:
            pass
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


# ── publishing ────────────────────────────────────────────────────────────────────────

CARD_FILE = "README.md"
BANK_FILES = (C.CONFIG_FILE, C.ENTRIES_FILE, C.CAPTIONS_FILE, C.TOKENS_FILE, C.STATS_FILE)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def build_command(manifest: Mapping[str, Any]) -> str:
    """The ``latentlens build`` command line that makes a bank with these settings."""
    b = manifest.get("build") or {}
    corpus = (manifest.get("corpus") or {}).get("source") or "CORPUS"
    parts = ["latentlens build", b.get("model_name") or manifest.get("model_name") or "MODEL"]
    parts += [corpus if corpus != "a list" else "CORPUS", "OUT_DIR"]
    if b.get("layers"):
        parts.append("--layers " + ",".join(str(x) for x in b["layers"]))
    if "cap" in b:
        parts.append(f"--cap {b['cap']}")
    if b.get("sampling"):
        parts.append(f"--sampling {b['sampling']}")
    if b.get("storage_dtype"):
        parts.append(f"--dtype {b['storage_dtype']}")
    return " ".join(parts)


def model_card(
    manifest: Mapping[str, Any],
    repo_id: str,
    *,
    license: str | None = None,
    corpus: str | None = None,
) -> str:
    """``README.md`` for a published bank: YAML metadata (``library_name: latentlens``,
    ``base_model``, layers, rows, dtype, licence) and how it was built and is used."""
    model = str(manifest.get("model_name") or "")
    layers = [int(x) for x in manifest.get("layers", [])]
    rows = manifest.get("rows_per_layer") or {}
    info = manifest.get("corpus") or {}
    corpus_text = corpus or info.get("source") or "not recorded"
    meta = [
        "---",
        "library_name: latentlens",
        f"license: {license or 'other'}",
    ]
    if _looks_like_hub_id(model):
        meta.append(f"base_model: {model}")
    meta += [
        "tags:",
        "- latentlens",
        "- interpretability",
        "- contextual-embeddings",
        "latentlens:",
        f"  format_version: {json.dumps(str(manifest.get('format_version', '')))}",
        f"  model: {json.dumps(model)}",
        f"  corpus: {json.dumps(corpus_text)}",
        f"  layers: {json.dumps(layers)}",
        f"  rows_per_layer: {json.dumps({str(k): int(v) for k, v in rows.items()})}",
        f"  hidden_dim: {int(manifest.get('hidden_dim', 0))}",
        f"  dtype: {json.dumps(str(manifest.get('dtype', '')))}",
        f"  normalized: {json.dumps(bool(manifest.get('normalized', True)))}",
        "---",
        "",
    ]
    total = sum(int(v) for v in rows.values())
    sentences = info.get("sentences")
    build = manifest.get("build") or {}
    body = f"""# latentlens bank: {model or repo_id}

A bank of *contextual* token embeddings for [latentlens](https://github.com/McGill-NLP/latentlens):
the hidden states of `{model or "the model"}` at every occurrence of each token in a caption
corpus, searched to explain what a hidden state (e.g. a visual token of a VLM) means.

| | |
| --- | --- |
| model | `{model or "not recorded"}` |
| corpus | {corpus_text}{f" ({sentences:,} sentences)" if sentences else ""} |
| layers | {", ".join(map(str, layers))} (one file each: `layer_XX.safetensors`) |
| rows | {total:,} in all ({", ".join(f"layer {k}: {int(v):,}" for k, v in rows.items())}) |
| width, dtype | {int(manifest.get("hidden_dim", 0))}, {manifest.get("dtype", "")} |
| licence | {license or "other (see the model's and the corpus's terms)"} |

## Use

```python
import latentlens

index = latentlens.ContextualIndex.from_pretrained("{repo_id}", layers=[{layers[-1] if layers else 0}])
# downloads the manifest, the entry table and only the layers asked for
neighbors = index.search(hidden_states, top_k=5)
```

## How it was built

```bash
{build_command(manifest)}
```

Every build setting (`BuildConfig`):

```json
{json.dumps(build, indent=1, sort_keys=True)}
```
"""
    return "\n".join(meta) + body


def hub_operations(root: str | os.PathLike[str], card: str) -> list[Any]:
    """The commit: every bank file of ``root`` (the manifest, entries, captions, tokens,
    statistics, each layer file) and the card, as ``CommitOperationAdd``s.

    Raises:
        BankFormatError: ``root`` is not a complete bank.
    """
    from huggingface_hub import CommitOperationAdd

    base = Path(root)
    if not (base / C.CONFIG_FILE).is_file():
        raise BankFormatError(f"{base} is not a latentlens bank (no {C.CONFIG_FILE})")
    manifest = read_json(base / C.CONFIG_FILE)
    names = [n for n in BANK_FILES if (base / n).is_file()]
    names += [C.LAYER_FILE.format(layer=int(x)) for x in manifest.get("layers", [])]
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise BankFormatError(f"{base} is missing {missing}")
    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(base / n)) for n in names]
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
    return ops


def push_bank(
    root: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    license: str | None = None,
    corpus: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create ``repo_id`` if needed and upload the bank at ``root`` with its card, in one
    commit. Returns the commit's URL."""
    from huggingface_hub import HfApi

    manifest = read_json(Path(root) / C.CONFIG_FILE)
    card = model_card(manifest, repo_id, license=license, corpus=corpus)
    ops = hub_operations(root, card)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(
        repo_id,
        operations=ops,
        commit_message=commit_message or f"latentlens bank: layers {manifest.get('layers')}",
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", "") or info)
