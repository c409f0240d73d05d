"""Explain every visual token of an image with a contextual bank (the quickstart's engine)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from latentlens.index import ContextualIndex, Neighbor
from latentlens.models.hooks import get_hidden_states
from latentlens.vlm import encode_image_prompt, locate_visual_tokens, square_crop_resize

DEFAULT_PROMPT = "Describe this image in detail."


def sample_patches(n_patches: int, k: int, seed: int = 10) -> list[int]:
    """``k`` patch indices drawn once (``random.seed(seed)``; ``random.sample``), sorted."""
    if k >= n_patches:
        return list(range(n_patches))
    return sorted(random.Random(seed).sample(range(n_patches), k))


@dataclass
class ImageExplanation:
    """Nearest contextual neighbours of every visual token of one image, per query layer.

    Attributes:
        image: the image as the model saw it (after crop/resize).
        grid: ``(H, W)`` patch grid.
        neighbors: ``{layer: [H·W lists of Neighbor]}`` (patch index = r·W + c).
        patches: the highlighted patch indices (sampled or chosen).
    """

    image: Image.Image
    grid: tuple[int, int]
    neighbors: dict[int, list[list[Neighbor]]]
    patches: list[int]
    top_k: int
    model_name: str = ""
    bank_name: str = ""
    bank_layers: list[int] = field(default_factory=list)
    image_name: str = ""

    @property
    def layers(self) -> list[int]:
        """Query layers, ascending."""
        return sorted(self.neighbors)

    def rc(self, patch: int) -> tuple[int, int]:
        """(row, col) of a patch index."""
        return divmod(patch, self.grid[1])

    def table(self, patches: Sequence[int] | None = None) -> str:
        """A readable text table of the top neighbours of ``patches`` (default: highlighted)."""
        lines = []
        for layer in self.layers:
            lines.append(f"── layer {layer} " + "─" * 60)
            for i, p in enumerate(patches if patches is not None else self.patches, 1):
                r, c = self.rc(p)
                lines.append(f"  #{i:<2} patch {p:>4} (row {r:>2}, col {c:>2})")
                for nb in self.neighbors[layer][p]:
                    caption = nb.caption if len(nb.caption) <= 70 else nb.caption[:67] + "..."
                    lines.append(
                        f"      {nb.similarity:6.3f}  L{nb.contextual_layer:<3} {nb.token_str!r:<14} {caption}"
                    )
        return "\n".join(lines)

    def to_dict(self, all_patches: bool = False) -> dict[str, Any]:
        """JSON-able results in the field names of the original release (SPEC §8)."""
        chosen = range(self.grid[0] * self.grid[1]) if all_patches else self.patches
        return {
            "model": self.model_name,
            "bank": self.bank_name,
            "image": self.image_name,
            "grid": list(self.grid),
            "top_k": self.top_k,
            "contextual_layers_used": self.bank_layers,
            "highlighted_patches": self.patches,
            "layers": {
                str(layer): {
                    "visual_layer": layer,
                    "patches": [
                        {
                            "patch_idx": p,
                            "patch_row": self.rc(p)[0],
                            "patch_col": self.rc(p)[1],
                            "nearest_contextual_neighbors": [
                                n.to_dict() for n in self.neighbors[layer][p]
                            ],
                        }
                        for p in chosen
                    ],
                }
                for layer in self.layers
            },
        }


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
) -> ImageExplanation:
    """Run the VLM once on ``image`` and search the bank with every visual token's state.

    Args:
        model: a registered HF VLM (Qwen2-VL, Qwen2.5-VL, LLaVA-style).
        processor: its processor.
        image: an RGB image; centre-cropped and resized to ``size`` (``None``: as is).
        index: the contextual bank (built from this VLM's language model).
        layers: query layers (hidden-state indices of the language model).
        top_k: neighbours per visual token.
        prompt: text after the image token (plain text, no chat template).
        bank_layers: bank layers searched (default all: the paper's "allLayers").
        patches: patch indices to highlight; default ``num_patches`` sampled with ``seed``.

    Returns:
        An :class:`ImageExplanation` with neighbours for every patch and layer.
    """
    view = square_crop_resize(image, size) if size else image
    inputs = encode_image_prompt(processor, view, prompt)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tokens = locate_visual_tokens(model, inputs["input_ids"], inputs.get("image_grid_thw"))
    states = get_hidden_states(model, layers=list(layers), **inputs)
    n = tokens.grid[0] * tokens.grid[1]
    pos = tokens.positions.to(device)
    neighbors = {
        layer: index.search(states[layer][0, pos], top_k=top_k, layers=bank_layers)
        for layer in sorted(states)
    }
    chosen = list(patches) if patches is not None else sample_patches(n, num_patches, seed)
    bad = [p for p in chosen if not 0 <= p < n]
    if bad:
        raise ValueError(f"patches {bad} outside the {tokens.grid[0]}×{tokens.grid[1]} grid")
    return ImageExplanation(
        image=view,
        grid=tokens.grid,
        neighbors=neighbors,
        patches=chosen,
        top_k=top_k,
        model_name=str(getattr(model.config, "_name_or_path", "")),
        bank_name=index.model_name,
        bank_layers=list(bank_layers) if bank_layers is not None else index.available_layers,
    )
