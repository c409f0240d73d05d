"""Tiled images: Idefics3 / SmolVLM, Llama 4, Aya Vision (markers or separators) and InternVL (a canvas)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from latentlens.errors import LatentLensError
from latentlens.layouts.base import (
    CropGrid,
    LayoutInput,
    Separator,
    TokenAddress,
    VisualLayout,
    clip_box,
    runs_of,
    size_dict,
)
from latentlens.models.visual import VisualFamily


def tiles(x: LayoutInput) -> VisualLayout:
    tok = getattr(x.processor, "tokenizer", x.processor)
    if not hasattr(tok, "convert_ids_to_tokens"):
        raise LatentLensError(f"{x.name}: the processor's tokenizer is needed to read tile markers")
    pos = x.image_positions()
    mask = torch.zeros(x.ids.numel(), dtype=torch.bool)
    mask[pos] = True
    runs = runs_of(mask)
    tile_re = re.compile(x.family.tile_marker or r"(?!)")
    x_sep, y_sep = x.family.tile_separators or (None, None)
    layout = VisualLayout(x.name, [])
    image, pending = 0, []  # runs of the current image: (crop, (row, col) | None, start, stop)
    row = col = 0  # the next tile, when separators (not markers) place the tiles
    previous = 0
    for start, stop in runs:
        gap = tok.convert_ids_to_tokens(x.ids[previous:start].tolist())
        text = "".join(gap)
        for q, piece in zip(range(previous, start), gap, strict=True):
            if _is_marker(x.family, tile_re, piece):
                layout.separators.append(Separator(q, piece, image))
            if pending and piece == x_sep:
                col += 1
            elif pending and piece == y_sep:
                row, col = row + 1, 0
        m = tile_re.search(text)
        if x.family.global_marker and x.family.global_marker in text:
            pending.append(("global", None, start, stop))
            pending = _place_numbered_tiles(x.name, image, pending, x.image_sizes, x.processor)
            _add_tiled_image(layout, x.name, image, pending, x.image_sizes, x.family.tile_fit)
            image, pending, row, col = image + 1, [], 0, 0
        elif m is not None and len(m.groups()) == 1:  # a tile number: placed on the canvas later
            pending.append(("", (-1, int(m[1]) - 1), start, stop))
        elif m is not None:
            r, c = int(m[1]) - 1, int(m[2]) - 1
            pending.append((f"tile {r},{c}", (r, c), start, stop))
        elif x_sep is not None:
            pending.append((f"tile {row},{col}", (row, col), start, stop))
        else:
            raise LatentLensError(
                f"{x.name}: a run of image tokens at position {start} follows no tile marker "
                f"({x.family.tile_marker!r} or {x.family.global_marker!r}) but {text[-80:]!r}"
            )
        previous = stop
    if pending:
        raise LatentLensError(f"{x.name}: the last image's tiles have no global image after them")
    tail = tok.convert_ids_to_tokens(x.ids[previous:].tolist())
    for q, piece in zip(range(previous, x.ids.numel()), tail, strict=True):
        if piece in x.family.marker_tokens:  # the closing marker of the last image
            layout.separators.append(Separator(q, piece, image - 1))
        else:
            break
    return layout


def canvas(x: LayoutInput) -> VisualLayout:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    pos = x.image_positions()
    per_tile = getattr(x.processor, "image_seq_length", None)
    ip = getattr(x.processor, "image_processor", None)
    if not isinstance(per_tile, int) or ip is None:
        raise LatentLensError(
            f"{x.name}: the processor's image_seq_length and image processor are needed"
        )
    tile = size_dict(ip, "size")
    tok = getattr(x.processor, "tokenizer", None)
    mask = torch.zeros(x.ids.numel(), dtype=torch.bool)
    mask[pos] = True
    layout = VisualLayout(x.name, [])
    for i, (start, stop) in enumerate(runs_of(mask)):
        for q in (start - 1, stop):  # the markers around the run
            if tok is not None and 0 <= q < x.ids.numel():
                piece = tok.convert_ids_to_tokens(int(x.ids[q]))
                if piece in x.family.marker_tokens:
                    layout.separators.append(Separator(q, piece, i))
        n_tiles, rest = divmod(stop - start, per_tile)
        side = math.isqrt(per_tile)
        if rest or side * side != per_tile:
            raise LatentLensError(
                f"{x.name}: image {i} has {stop - start} tokens, not tiles of {per_tile}"
            )
        orig = x.image_size(i)
        if n_tiles == 1:
            runs = [(None, None)]
        else:
            if orig is None:
                raise LatentLensError(
                    f"{x.name}: the original image size is needed to find the tiling"
                )
            w, h = orig
            cols, rows = get_optimal_tiled_canvas(
                (h, w), (tile["height"], tile["width"]), ip.min_patches, ip.max_patches
            )
            if rows * cols + 1 != n_tiles:
                raise LatentLensError(
                    f"{x.name}: image {i} has {n_tiles} tiles; its {rows}×{cols} canvas and a "
                    f"thumbnail would make {rows * cols + 1}"
                )
            runs = [(f"tile {r},{c}", (r, c)) for r in range(rows) for c in range(cols)]
            runs.append(("global", None))
        tiles = [
            (crop, rc, start + k * per_tile, start + (k + 1) * per_tile)
            for k, (crop, rc) in enumerate(runs)
        ]
        _add_tiled_image(layout, x.name, i, tiles, x.image_sizes, x.family.tile_fit)
    return layout


def _place_numbered_tiles(
    name: str,
    image: int,
    runs: list[tuple[str, tuple[int, int] | None, int, int]],
    sizes: Sequence[tuple[int, int] | None],
    processor: Any,
) -> list[tuple[str, tuple[int, int] | None, int, int]]:
    """Numbered tiles ``(-1, k)`` placed on GOT-OCR2's canvas for the image's size."""
    numbered = [rc[1] for _, rc, _, _ in runs if rc is not None and rc[0] == -1]
    if not numbered:
        return runs
    orig = sizes[image] if image < len(sizes) else None
    ip = getattr(processor, "image_processor", None)
    if orig is None or ip is None:
        raise LatentLensError(
            f"{name}: the original image size and the image processor are "
            "needed to place numbered tiles"
        )
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    tile = size_dict(ip, "size")
    cols, rows = get_optimal_tiled_canvas(
        (orig[1], orig[0]), (tile["height"], tile["width"]), ip.min_patches, ip.max_patches
    )
    if sorted(numbered) != list(range(rows * cols)):
        raise LatentLensError(
            f"{name}: image {image} has tiles {numbered}, not a {rows}×{cols} canvas"
        )
    out = []
    for crop, rc, start, stop in runs:
        if rc is not None and rc[0] == -1:
            r, c = divmod(rc[1], cols)
            crop, rc = f"tile {r},{c}", (r, c)
        out.append((crop, rc, start, stop))
    return out


def _is_marker(family: VisualFamily, tile_re: re.Pattern[str], piece: str) -> bool:
    return (
        piece in family.marker_tokens
        or piece == family.global_marker
        or piece in (family.tile_separators or ())
        or tile_re.fullmatch(piece) is not None
    )


def _add_tiled_image(
    layout: VisualLayout,
    name: str,
    image: int,
    runs: list[tuple[str, tuple[int, int] | None, int, int]],
    sizes: Sequence[tuple[int, int] | None],
    fit: str = "squash",
) -> None:
    tiles = [rc for _, rc, _, _ in runs if rc is not None]
    rows = max((r for r, _ in tiles), default=-1) + 1
    cols = max((c for _, c in tiles), default=-1) + 1
    if len(tiles) != rows * cols:
        raise LatentLensError(f"{name}: image {image} has {len(tiles)} tiles, not {rows}×{cols}")
    orig = sizes[image] if image < len(sizes) else None
    for crop, rc, start, stop in runs:
        n = stop - start
        side = math.isqrt(n)
        if side * side != n:
            raise LatentLensError(f"{name}: image {image}, {crop}: {n} tokens, not a square grid")
        layout.grids.append(CropGrid(image, crop, (side, side)))
        for j in range(n):
            r, c = divmod(j, side)
            box = None
            if orig is not None:
                w, h = orig
                if rc is None:  # the thumbnail: the whole image squashed
                    box = (w * c / side, h * r / side, w * (c + 1) / side, h * (r + 1) / side)
                elif fit == "pad":  # tiles of a canvas the image fills from its top-left
                    tw = th = 1.0 / min(cols / w, rows / h)  # original pixels per tile side
                    x0, y0 = rc[1] * tw + tw * c / side, rc[0] * th + th * r / side
                    box = clip_box((x0, y0, x0 + tw / side, y0 + th / side), w, h)
                else:  # tile (i, k) of the image squashed to rows × cols tiles
                    tw, th = w / cols, h / rows
                    x0, y0 = rc[1] * tw + tw * c / side, rc[0] * th + th * r / side
                    box = (x0, y0, x0 + tw / side, y0 + th / side)
            layout.tokens.append(TokenAddress(start + j, image, r, c, crop=crop, pixel_box=box))
