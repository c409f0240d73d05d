"""Which hidden state is which patch: every visual token of a VLM input, addressed.

An address names a visual token's sequence position, its image (or video) and frame, the
crop it belongs to (``None`` when the family has one grid; ``"global"``, ``"high-res"`` or
``"tile i,j"`` otherwise), its row and column in that crop's grid, and the pixel box it
covers in the original image. Separator tokens (``image_newline``, Pixtral's row breaks,
tile markers) are located and reported apart from the grids. The per-family facts live in
:mod:`latentlens.models.visual`, the layouts in :mod:`latentlens.layouts`; the processor
supplies the geometry of each input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from latentlens.errors import LatentLensError
from latentlens.layouts import anyres, grids, tiles
from latentlens.layouts.base import (
    Box,
    CropGrid,
    LayoutInput,
    Separator,
    TokenAddress,
    VisualLayout,
    square_view_boxes,
)
from latentlens.models.visual import visual_family

__all__ = [
    "Box",
    "CropGrid",
    "Separator",
    "TokenAddress",
    "VisualLayout",
    "layout_visual_tokens",
    "square_view_boxes",
]

LAYOUTS: dict[str, Callable[[LayoutInput], VisualLayout]] = {
    "grid_thw": grids.grid_thw,
    "square": grids.square,
    "row_break": grids.row_break,
    "low_high": grids.low_high,
    "anyres": anyres.anyres,
    "tiles": tiles.tiles,
    "canvas": tiles.canvas,
}
"""``VisualFamily.layout`` → the function that lays out one sequence."""


def layout_visual_tokens(
    model: Any,
    inputs: Mapping[str, Any],
    processor: Any = None,
    *,
    image_sizes: Sequence[tuple[int, int] | None] = (),
    video_sizes: Sequence[tuple[int, int] | None] = (),
    video_frames: Sequence[int | None] = (),
    batch_index: int = 0,
) -> VisualLayout:
    """Address every visual token of one sequence of a processor's output.

    Args:
        model: the VLM (or its config).
        inputs: the processor's output (``input_ids``, and ``mm_token_type_ids``,
            ``image_grid_thw`` / ``video_grid_thw`` / ``image_sizes`` where it gives them).
        processor: the processor (its image processor's resize/crop, separator tokens).
        image_sizes: ``(W, H)`` of each original image of this sequence, in order (pixel
            boxes).
        video_sizes: ``(W, H)`` of each video's frames (this sequence's).
        video_frames: the number of frames of each video as given to the processor.
        batch_index: which sequence of the batch (padding on either side); per-image
            entries of the batch (``image_grid_thw``, ``image_sizes``, …) are matched to it by
            counting the earlier sequences' visual tokens.

    Raises:
        UnsupportedArchitectureError: the family's geometry is not known.
        LatentLensError: the inputs do not match the family's layout.
    """
    name, family = visual_family(model)
    if inputs.get("input_ids") is None:
        raise LatentLensError(f"{name}: the inputs have no input_ids (pass the processor's output)")
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    ids = ids if ids.ndim == 2 else ids[None]
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        types = torch.as_tensor(types).cpu()
        types = types if types.ndim == 2 else types[None]

    def row(b: int) -> LayoutInput:
        t = types[b] if types is not None else None
        return LayoutInput(model, name, family, ids[b], t, inputs, processor)

    earlier = [row(b) for b in range(batch_index)]
    before = (
        sum(r.positions(1).numel() for r in earlier),
        sum(r.positions(2).numel() for r in earlier),
    )
    x = dataclasses.replace(
        row(batch_index),
        image_sizes=image_sizes,
        video_sizes=video_sizes,
        video_frames=video_frames,
        before=before,
    )
    if family.video_layout == "pooled_frames" and x.positions(2).numel():
        return grids.pooled_frames(x)
    return LAYOUTS[family.layout](x)
