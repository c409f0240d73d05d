"""The built-in demo: a bank from bundled captions with SmolLM2, queried with new sentences."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentlens.extract import build_index
from latentlens.index import ContextualIndex, Neighbor
from latentlens.models.hooks import get_hidden_states
from latentlens.models.loading import default_cache_dir, load_smollm2

# (sentence, word): each word is read at its position in a sentence the bank never saw.
DEMO_QUERIES: tuple[tuple[str, str], ...] = (
    ("She deposited her paycheck at the bank on Main Street.", "bank"),
    ("Two ducks rested on the muddy bank of the stream.", "bank"),
    ("A small bat hung upside down from the cave ceiling.", "bat"),
    ("The boy gripped the wooden bat and waited for the pitch.", "bat"),
    ("A tall crane lifted steel beams onto the roof.", "crane"),
    ("A white crane waded through the shallow marsh.", "crane"),
)


@dataclass(frozen=True)
class DemoHit:
    """Neighbours of one word of one query sentence."""

    sentence: str
    word: str
    position: int
    layer: int
    neighbors: list[Neighbor]


def demo_corpus_path() -> Path:
    """The bundled caption corpus (written for this project, Apache-2.0)."""
    return Path(str(resources.files("latentlens") / "data" / "demo_captions.txt"))


def word_position(tokenizer: Any, sentence: str, word: str) -> tuple[list[int], int]:
    """Token ids of ``sentence`` and the index of the first token of ``word`` in it."""
    enc = tokenizer(sentence, add_special_tokens=True, return_offsets_mapping=True)
    start = sentence.index(word)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a <= start < b or (a == b == start):
            return list(enc["input_ids"]), i
    raise ValueError(f"no token covers {word!r} in {sentence!r}")


def run_demo(
    bank_dir: str | os.PathLike[str] | None = None,
    query_layer: int = 16,
    top_k: int = 5,
    queries: tuple[tuple[str, str], ...] = DEMO_QUERIES,
    show_progress: bool = True,
) -> tuple[ContextualIndex, list[DemoHit]]:
    """Build (or reuse) the SmolLM2 demo bank and explain the words of ``queries``.

    Args:
        bank_dir: where the bank lives (default: ``<cache>/demo-bank-smollm2``); an
            interrupted build resumes, a finished one is reused.
        query_layer: the layer whose hidden states are explained; every bank layer is
            searched (the paper's "allLayers").
        top_k: neighbours per word.

    Returns:
        The index and one :class:`DemoHit` per query.
    """

    model, tokenizer = load_smollm2()
    root = Path(bank_dir) if bank_dir is not None else default_cache_dir() / "demo-bank-smollm2"
    if (root / "config.json").exists():
        index = ContextualIndex.from_directory(root)
    else:
        index = build_index(
            "SmolLM2-135M-Instruct",
            demo_corpus_path(),
            model=model,
            tokenizer=tokenizer,
            output_dir=root,
            show_progress=show_progress,
            batch_size=32,
        )
    hits = []
    for sentence, word in queries:
        ids, pos = word_position(tokenizer, sentence, word)
        states = get_hidden_states(model, layers=[query_layer], input_ids=torch.tensor([ids]))
        vec = states[query_layer][0, pos]
        hits.append(DemoHit(sentence, word, pos, query_layer, index.search(vec, top_k=top_k)[0]))
    return index, hits
