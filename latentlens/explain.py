"""Explain every visual token of an image with a contextual bank (the quickstart's engine)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from latentlens.index import ContextualIndex
from latentlens.lenses import EmbeddingLens, LogitLens
from latentlens.results import ImageExplanation, VideoExplanation
from latentlens.vlm import (
    DEFAULT_PROMPT,
    DEFAULT_VIDEO_PROMPT,
    video_token_states,
    visual_token_states,
)

LENSES = ("latentlens", "logitlens", "embeddinglens")
_BASELINES = {"logitlens": LogitLens, "embeddinglens": EmbeddingLens}


def sample_patches(n_patches: int, k: int, seed: int = 10) -> list[int]:
    """``k`` patch indices drawn once (``random.seed(seed)``; ``random.sample``), sorted."""
    if k >= n_patches:
        return list(range(n_patches))
    return sorted(random.Random(seed).sample(range(n_patches), k))


@torch.inference_mode()
def explain_image(
    model: Any,
    processor: Any,
    image: Image.Image,
    index: ContextualIndex,
    layers: Sequence[int],
    *,
    top_k: int = 5,
    size: int | None = 448,
    prompt: str = DEFAULT_PROMPT,
    bank_layers: Sequence[int] | None = None,
    patches: Sequence[int] | None = None,
    num_patches: int = 10,
    seed: int = 10,
    lenses: Sequence[str] = ("latentlens",),
) -> ImageExplanation:
    """Run the VLM once on ``image`` and search the bank with every visual token's state.

    Args:
        model: a HF VLM of a family with a known layout (see docs/vlm_compatibility.md).
        processor: its processor.
        image: an RGB image; centre-cropped and resized to ``size`` (``None``: as is).
        index: the contextual bank (built from this VLM's language model).
        layers: query layers (hidden-state indices of the language model).
        top_k: neighbours per visual token.
        prompt: text after the image token (plain text, no chat template).
        bank_layers: bank layers searched (default all: the paper's "allLayers").
        patches: patch indices to highlight; default ``num_patches`` sampled with ``seed``.
        lenses: besides ``latentlens`` (always run), ``logitlens`` and ``embeddinglens``:
            the baselines on the same states, for the three-lens view.

    Returns:
        An :class:`ImageExplanation` with neighbours for every patch and layer (and the
        baselines' predictions when asked).

    Raises:
        ValueError: an unknown lens, or patches outside the grid.
    """
    unknown = sorted(set(lenses) - set(LENSES))
    if unknown:
        raise ValueError(f"unknown lens(es) {unknown}; choose from {', '.join(LENSES)}")
    seen = visual_token_states(model, processor, [image], layers, size=size, prompt=prompt)[0]
    tokenizer = getattr(processor, "tokenizer", processor)
    baselines = {}
    for name in (x for x in LENSES if x in lenses and x in _BASELINES):
        lens = _BASELINES[name](model, tokenizer, top_k)
        baselines[name] = {layer: lens.predict(states) for layer, states in seen.states.items()}
    n = seen.grid[0] * seen.grid[1]
    neighbors = {
        layer: index.search(states, top_k=top_k, layers=bank_layers)
        for layer, states in seen.states.items()
    }
    chosen = list(patches) if patches is not None else sample_patches(n, num_patches, seed)
    bad = [p for p in chosen if not 0 <= p < n]
    if bad:
        raise ValueError(f"patches {bad} outside the {seen.grid[0]}×{seen.grid[1]} grid")
    return ImageExplanation(
        image=seen.image,
        grid=seen.grid,
        neighbors=neighbors,
        patches=chosen,
        top_k=top_k,
        model_name=str(getattr(model.config, "_name_or_path", "")),
        bank_name=index.model_name,
        bank_layers=list(bank_layers) if bank_layers is not None else index.available_layers,
        addresses=seen.addresses,
        family=str(getattr(model.config, "model_type", "")),
        layout=seen.layout.to_json() if seen.layout is not None else {},
        baselines=baselines,
    )


@torch.inference_mode()
def explain_video(
    model: Any,
    processor: Any,
    frames: Sequence[Image.Image],
    index: ContextualIndex,
    layers: Sequence[int],
    *,
    top_k: int = 5,
    prompt: str = DEFAULT_VIDEO_PROMPT,
    bank_layers: Sequence[int] | None = None,
    num_patches: int = 10,
    seed: int = 10,
) -> VideoExplanation:
    """Run the VLM once on a video and search the bank with every visual token's state.

    Args:
        model: a VLM that takes videos (Qwen2-VL/2.5-VL/3-VL, Qwen3.5, LLaVA-OneVision,
            LLaVA-NeXT-Video).
        processor: its processor.
        frames: the video's frames (see :func:`latentlens.vlm.load_frames`).
        index: the contextual bank (built from this VLM's language model).
        layers: query layers (hidden-state indices of the language model).
        top_k: neighbours per visual token.
        prompt: text after the video placeholder.
        bank_layers: bank layers searched (default all).
        num_patches: tokens highlighted in the table and picture (sampled with ``seed``).

    Returns:
        A :class:`VideoExplanation`: every token's address (frame pair, row, col, pixel
        box) and its neighbours per layer.
    """
    seen = video_token_states(model, processor, frames, layers, prompt=prompt)
    neighbors = {
        layer: index.search(states, top_k=top_k, layers=bank_layers)
        for layer, states in seen.states.items()
    }
    return VideoExplanation(
        frames=seen.frames,
        addresses=seen.addresses,
        neighbors=neighbors,
        patches=sample_patches(len(seen.addresses), num_patches, seed),
        top_k=top_k,
        model_name=str(getattr(model.config, "_name_or_path", "")),
        bank_name=index.model_name,
        bank_layers=list(bank_layers) if bank_layers is not None else index.available_layers,
        family=str(getattr(model.config, "model_type", "")),
        layout=seen.layout.to_json(),
    )
