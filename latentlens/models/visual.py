"""Per-family facts about a VLM's visual tokens, as data (beside the LM registry).

Each family names how its visual tokens are found and how they are laid out; the
addresses themselves are computed by :mod:`latentlens.layouts`. Layouts:

- ``grid_thw``: one run per image (or video) of ``t · (h/m) · (w/m)`` tokens, ordered
  (temporal group, row, column) over the merged grid; ``(t, h, w)`` comes from the
  processor's ``image_grid_thw`` / ``video_grid_thw``, ``m`` is the spatial merge size.
  The processor resizes the whole image (no crop) to ``(h·p, w·p)`` pixels.
- ``square``: one run per image of ``s²`` tokens, row-major over an ``s × s`` grid that
  covers the encoder's square view (the processor's resize / centre crop).
- ``row_break``: one run per image, row-major; each row ends in a break token and the
  last in an end token (Pixtral); the processor reports the resized ``image_sizes``.
- ``anyres``: LLaVA-NeXT's base image (an ``s × s`` grid of the squashed image, named
  ``global``) then the high-resolution crops merged into one unpadded grid (``high-res``)
  with an ``image_newline`` token after each of its rows.
- ``tiles``: the image cut into ``rows × cols`` tiles (``tile i,j``, the image squashed
  to a whole number of tiles) and a squashed thumbnail (``global``), each an ``s × s``
  grid in its own run of image tokens; marker text tokens before each run name the tile
  (Idefics3 / SmolVLM: ``<row_i_col_j>``, ``<global-img>``) and are reported.
- ``low_high``: per image a low-resolution grid of the whole image (``global``) then the
  pooled grid of its overlapping high-resolution crops (``high-res``), both row-major
  with a column token after each row; the processor's ``image_grids`` gives both shapes
  (Molmo 2).
- ``canvas``: one run per image of ``k · s²`` tokens: the ``rows × cols`` tiles of the
  processor's best-fitting canvas (GOT-OCR2's tiling, recomputed from the image size)
  row-major, then the thumbnail (``global``) when there is more than one tile (InternVL).

Every fact here was checked on transformers 5.24 against tiny models of the real classes
(``tests/test_visual_layout.py``: perturbing one region's pixels moves the token we name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from latentlens.errors import UnsupportedArchitectureError

Layout = Literal["grid_thw", "square", "row_break", "anyres", "tiles", "canvas", "low_high"]


@dataclass(frozen=True)
class VisualFamily:
    """How one VLM family places its visual tokens.

    Attributes:
        layout: see the module docstring.
        image_token_attr: config key of the image placeholder token id.
        video_token_attr: config key of the video placeholder token id (video families).
        merge_size_attr: config key of the spatial merge factor (``grid_thw``, ``row_break``).
        temporal_patch_attr: config key of the frames per temporal group (video).
        tokens_per_image_attr: config key of the tokens per image (``square`` families whose
            count is not the encoder's patch grid, e.g. Gemma 3's pooled 256).
        patch_size_attr: config key of the encoder's patch size.
        separators: processor attributes naming separator tokens (``row_break``), reported
            and kept out of the patch grid.
        tile_marker, global_marker: the text before a tile's run (a regex with the row and
            column, 1-based, or with the tile's 1-based row-major number, the canvas then
            recomputed from the image size) and before the thumbnail's (``tiles``).
        marker_tokens: other tokens around the runs that are reported (``tiles``).
        token_types: whether the processor's ``mm_token_type_ids`` mark exactly the
            patch tokens (Molmo 2's also mark its column and start/end tokens).
        tile_separators: ``(next column, next row)`` tokens between tile runs, when no
            marker names the tile (Llama 4).
        tile_fit: how the image fills its ``rows × cols`` tiles: ``squash`` (resized to
            exactly that canvas) or ``pad`` (resized keeping its aspect, padded on the
            right and bottom; Llama 4).
        video: whether the family takes videos through its processor.
        video_layout: ``grid_thw`` (the layout above) or ``pooled_frames``: one pooled
            ``s × s`` grid per frame, frame after frame, then (``video_newline``) one
            ``image_newline`` for the whole video (LLaVA-OneVision, LLaVA-NeXT-Video).
        notes: anything worth knowing.
    """

    layout: Layout
    image_token_attr: str = "image_token_id"
    video_token_attr: str | None = None
    merge_size_attr: str | None = None
    temporal_patch_attr: str | None = None
    tokens_per_image_attr: str | None = None
    patch_size_attr: str = "vision_config.patch_size"
    separators: tuple[str, ...] = ()
    tile_marker: str | None = None
    global_marker: str | None = None
    marker_tokens: tuple[str, ...] = ()
    token_types: bool = True
    tile_separators: tuple[str, str] | None = None
    tile_fit: Literal["squash", "pad"] = "squash"
    video: bool = False
    video_layout: Literal["grid_thw", "pooled_frames"] = "grid_thw"
    video_newline: bool = False
    notes: str = ""


_QWEN = VisualFamily(
    layout="grid_thw",
    video_token_attr="video_token_id",
    merge_size_attr="vision_config.spatial_merge_size",
    temporal_patch_attr="vision_config.temporal_patch_size",
    video=True,
)
_LLAVA = VisualFamily(layout="square", image_token_attr="image_token_index")
_ANYRES = VisualFamily(layout="anyres", image_token_attr="image_token_index")
_TILES = VisualFamily(
    layout="tiles",
    tile_marker=r"<row_(\d+)_col_(\d+)>",
    global_marker="<global-img>",
    marker_tokens=("<fake_token_around_image>",),
    notes="Image splitting: rows × cols tiles of max_image_size, then the global image.",
)

VISUAL_FAMILIES: dict[str, VisualFamily] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": dataclasses.replace(
        _QWEN, notes="Videos: one vision_start/end run per temporal group, timestamps between."
    ),
    "qwen3_vl_moe": _QWEN,
    "qwen3_5": _QWEN,
    "qwen3_5_moe": _QWEN,
    "llava": _LLAVA,
    "vipllava": _LLAVA,
    "paligemma": dataclasses.replace(_LLAVA, notes="SigLIP: the image is squashed."),
    "gemma3": dataclasses.replace(
        _LLAVA,
        tokens_per_image_attr="mm_tokens_per_image",
        notes="The encoder's patches are average-pooled to mm_tokens_per_image (16 × 16).",
    ),
    "mistral3": VisualFamily(
        layout="row_break",
        image_token_attr="image_token_index",
        merge_size_attr="spatial_merge_size",
        separators=("image_break_token", "image_end_token"),
        notes="Pixtral: [IMG_BREAK] after each row of merged patches, [IMG_END] after the last.",
    ),
    "llava_next": _ANYRES,
    "llava_onevision": dataclasses.replace(
        _ANYRES,
        video_token_attr="video_token_index",
        video=True,
        video_layout="pooled_frames",
        video_newline=True,
        notes="Images as LLaVA-NeXT (anyres_max); video frames bilinearly pooled 2×2, one "
        "image_newline after the last frame.",
    ),
    "llava_next_video": dataclasses.replace(
        _ANYRES,
        video_token_attr="video_token_index",
        video=True,
        video_layout="pooled_frames",
        notes="Images as LLaVA-NeXT; video frames average-pooled (spatial_pool_stride).",
    ),
    "idefics3": _TILES,
    "molmo2": VisualFamily(
        layout="low_high",
        image_token_attr="image_patch_id",
        marker_tokens=("<im_col>", "<low_res_im_start>", "<im_start>", "<im_end>"),
        token_types=False,
        notes="image_grids = [low_h, low_w, high_h, high_w]; <im_col> after each row.",
    ),
    "aya_vision": VisualFamily(
        layout="tiles",
        image_token_attr="image_token_index",
        tile_marker=r"TILE_(\d+)",
        global_marker="TILE_GLOBAL",
        marker_tokens=("<|START_OF_IMG|>", "<|END_OF_IMG|>"),
        notes="GOT-OCR2 tiling: TILE_k before the k-th tile (row-major), TILE_GLOBAL before "
        "the thumbnail.",
    ),
    "llama4": VisualFamily(
        layout="tiles",
        image_token_attr="image_token_index",
        global_marker="<|image|>",
        tile_separators=("<|tile_x_separator|>", "<|tile_y_separator|>"),
        tile_fit="pad",
        marker_tokens=("<|image_start|>", "<|image_end|>"),
        notes="Tiles separated by <|tile_x_separator|> within a row and "
        "<|tile_y_separator|> after it, then <|image|> and the global tile.",
    ),
    "internvl": VisualFamily(
        layout="canvas",
        marker_tokens=("<img>", "</img>"),
        notes="Tiles of the canvas closest to the image's aspect (min/max_patches), then a "
        "thumbnail; pixel-shuffled to image_seq_length tokens per tile.",
    ),
    "smolvlm": _TILES,
}
"""``config.model_type`` → :class:`VisualFamily`."""


def visual_family(model_or_config: Any) -> tuple[str, VisualFamily]:
    """The family name and facts of a VLM (a model or its config).

    Raises:
        UnsupportedArchitectureError: the family's visual-token geometry is not known.
    """
    config = getattr(model_or_config, "config", model_or_config)
    name = getattr(config, "model_type", type(model_or_config).__name__)
    family = VISUAL_FAMILIES.get(name)
    if family is None:
        known = ", ".join(sorted(VISUAL_FAMILIES))
        raise UnsupportedArchitectureError(
            f"no visual-token geometry for the VLM family {name!r}: where its image tokens "
            f"sit and which patch each one covers is not known (known: {known}); add a "
            "VisualFamily to latentlens.models.visual.VISUAL_FAMILIES"
        )
    return name, family
