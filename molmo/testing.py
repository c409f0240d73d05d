"""Tiny offline variants of the nine models (same HF classes, random weights) for tests.

Only configs and random tensors: nothing is downloaded. The LLM and tokenizer are left
to the caller (e.g. `tests/tiny.py`), which knows the tiny vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from molmo.checkpoint import expected_shapes
from molmo.config import MODELS, MolmoConfig, replace

TINY_D_MODEL = 32
TINY_LAYERS = 3
TINY_VOCAB_ROWS = 128  # embedding rows of the tiny LLMs
TINY_OLMO_VOCAB = 100  # < rows, so OLMo's special ids land on base rows as in the real model
TINY_VIT_WIDTH = 16
TINY_VIT_BLOCKS = 4  # one more than the deepest feature layer: truncation is exercised
TINY_IMAGE = 42  # 3×3 grid of 14-pixel patches
TINY_DINO_SOURCE_IMAGE = 70  # 5×5 position grid, resized to 3×3 like 37×37 → 24×24

_FEATURE_LAYERS = {"clip": (3, 1), "dinov2": (3, 2), "siglip": (3, 1)}


def tiny_config(name: str, *, bos_id: int = 2) -> MolmoConfig:
    """A tiny version of a table entry: d=32, 3 LLM layers, 3×3 patches, ViT width 16."""
    real = MODELS[name]
    olmo = real.llm.family == "olmo"
    return replace(
        real,
        llm={
            "num_layers": TINY_LAYERS,
            "d_model": TINY_D_MODEL,
            "vocab_size": TINY_OLMO_VOCAB if olmo else TINY_VOCAB_ROWS,
            "embedding_size": TINY_VOCAB_ROWS,
            "bos_id": bos_id,
            "connector_hidden": 48,
        },
        vision={
            "image_size": TINY_IMAGE,
            "patch_size": 14,
            "width": TINY_VIT_WIDTH,
            "feature_layers": _FEATURE_LAYERS[real.vision.kind],
        },
    )


def tiny_vit(config: MolmoConfig, seed: int = 0) -> nn.Module:
    """A random HF vision model of the config's class (CLIP / DINOv2 / SigLIP)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    v = config.vision
    common: dict[str, Any] = {
        "hidden_size": v.width,
        "intermediate_size": 2 * v.width,
        "num_hidden_layers": TINY_VIT_BLOCKS,
        "num_attention_heads": 2,
        "patch_size": v.patch_size,
    }
    if v.kind == "clip":
        model: nn.Module = CLIPVisionModel(CLIPVisionConfig(image_size=v.image_size, **common))
    elif v.kind == "dinov2":
        model = Dinov2Model(Dinov2Config(image_size=TINY_DINO_SOURCE_IMAGE, **common))
        with torch.no_grad():  # HF initialises these to small values; make them matter
            model.embeddings.position_embeddings.normal_()
    else:
        model = SiglipVisionModel(SiglipVisionConfig(image_size=v.image_size, **common))
    return model.eval()


def synthetic_connector(
    config: MolmoConfig, seed: int = 0, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """Random connector weights under the released key names and shapes (float32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(*shape, generator=g) * scale
        for key, shape in expected_shapes(config).items()
    }
