"""Layouts of one grid per image (or frame): Qwen-VL, LLaVA, Pixtral, Molmo 2, pooled video frames."""

from __future__ import annotations

import math

import torch

from latentlens.errors import LatentLensError
from latentlens.layouts.base import (
    CropGrid,
    LayoutInput,
    Separator,
    TokenAddress,
    VisualLayout,
    grid_boxes,
    int_attr,
    patch_size,
    runs_of,
    square_view_boxes,
)
from latentlens.models.registry import get_config_attr


def grid_thw(x: LayoutInput) -> VisualLayout:
    merge = int(get_config_attr(x.model, x.family.merge_size_attr or ""))
    layout = VisualLayout(x.name, [])
    for kind, key, originals in (
        (1, "image_grid_thw", x.image_sizes),
        (2, "video_grid_thw", x.video_sizes),
    ):
        pos = x.positions(kind).tolist()
        if not pos:
            continue
        every = x.need(key).reshape(-1, 3).tolist()
        thw = x.own(key, every, [t * (h // merge) * (w // merge) for t, h, w in every], kind)
        counts = [t * (h // merge) * (w // merge) for t, h, w in thw]
        if sum(counts) != len(pos):
            raise LatentLensError(
                f"{x.name}: {len(pos)} {'image' if kind == 1 else 'video'} tokens in the sequence, "
                f"but {key} {thw} accounts for {sum(counts)} (one sequence's inputs expected)"
            )
        tpatch = int(get_config_attr(x.model, x.family.temporal_patch_attr)) if kind == 2 else 1
        k = 0
        for i, (t, h, w) in enumerate(thw):
            rows, cols = h // merge, w // merge
            orig = originals[i] if i < len(originals) else None
            boxes = grid_boxes(rows, cols, *orig) if orig else None
            n_frames = x.video_frames[i] if kind == 2 and i < len(x.video_frames) else None
            for tt in range(t):
                frame = tt * tpatch if kind == 2 else None
                frames = None
                if kind == 2:
                    last = (tt + 1) * tpatch - 1
                    frames = (frame, min(last, n_frames - 1) if n_frames else last)
                layout.grids.append(CropGrid(i, None, (rows, cols), frame))
                for j in range(rows * cols):
                    layout.tokens.append(
                        TokenAddress(
                            pos[k],
                            i,
                            j // cols,
                            j % cols,
                            frame,
                            frames,
                            None,
                            boxes[j] if boxes else None,
                        )
                    )
                    k += 1
    layout.tokens.sort(key=lambda a: a.sequence_position)
    return layout


def square_count(x: LayoutInput) -> int:
    """Visual tokens per image of a ``square`` family: the config's count, the processor's,
    or the encoder's patch grid (plus its CLS token when the model keeps it)."""
    for value in (
        int_attr(x.model, x.family.tokens_per_image_attr),
        getattr(x.processor, "image_seq_length", None),
        getattr(x.processor, "num_image_tokens", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    side = int(get_config_attr(x.model, "vision_config.image_size")) // patch_size(x)
    config = getattr(x.model, "config", x.model)
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return side * side + int(full)


def square(x: LayoutInput) -> VisualLayout:
    pos = x.image_positions()
    per = square_count(x)
    if len(pos) % per:
        raise LatentLensError(
            f"{x.name}: {len(pos)} image tokens is not a multiple of {per}, the tokens per image"
        )
    lengths = [per] * (len(pos) // per)
    ip = getattr(x.processor, "image_processor", None)
    layout = VisualLayout(x.name, [])
    k = 0
    for i, n in enumerate(lengths):
        side = math.isqrt(n)
        if side * side != n:
            raise LatentLensError(f"{x.name}: image {i} has {n} tokens, not a square grid")
        orig = x.image_size(i)
        boxes = square_view_boxes(ip, orig, side) if orig and ip is not None else None
        layout.grids.append(CropGrid(i, None, (side, side)))
        for j in range(n):
            layout.tokens.append(
                TokenAddress(pos[k], i, j // side, j % side, pixel_box=boxes[j] if boxes else None)
            )
            k += 1
    return layout


def row_break(x: LayoutInput) -> VisualLayout:
    tok = getattr(x.processor, "tokenizer", None)
    seps: dict[int, str] = {}
    for attr in x.family.separators:
        text = getattr(x.processor, attr, None)
        if text is None or tok is None:
            raise LatentLensError(f"{x.name}: the processor has no {attr!r} (a separator token)")
        seps[int(tok.convert_tokens_to_ids(text))] = attr.removesuffix("_token")
    image = set(x.image_positions())
    sep_ids = torch.tensor(sorted(seps))
    member = torch.tensor([i in image for i in range(x.ids.numel())]) | torch.isin(x.ids, sep_ids)
    layout = VisualLayout(x.name, [])
    end_id = int(tok.convert_tokens_to_ids(getattr(x.processor, x.family.separators[-1])))
    images: list[list[list[int]]] = [[[]]]  # image → rows → positions
    for start, stop in runs_of(member):
        for q in range(start, stop):
            token = int(x.ids[q])
            if q in image:
                images[-1][-1].append(q)
                continue
            layout.separators.append(Separator(q, seps[token], len(images) - 1))
            images[-1].append([])
            if token == end_id:  # the image is complete: the next tokens start another
                images.append([[]])
    for i, rows in enumerate(images):
        rows = [r for r in rows if r]
        if not rows:
            continue
        cols = len(rows[0])
        if any(len(r) != cols for r in rows):
            raise LatentLensError(f"{x.name}: image {i} has rows of different lengths")
        orig = x.image_size(i)
        boxes = grid_boxes(len(rows), cols, *orig) if orig else None
        layout.grids.append(CropGrid(i, None, (len(rows), cols)))
        for r, row in enumerate(rows):
            for c, q in enumerate(row):
                box = boxes[r * cols + c] if boxes else None
                layout.tokens.append(TokenAddress(q, i, r, c, pixel_box=box))
    return layout


def low_high(x: LayoutInput) -> VisualLayout:
    """Molmo 2: per image the low-res grid then the high-res grid, from ``image_grids``."""
    pos = x.image_positions()
    every = x.need("image_grids").reshape(-1, 4).tolist()
    grids = x.own("image_grids", every, [a * b + c * d for a, b, c, d in every])
    if sum(a * b + c * d for a, b, c, d in grids) != len(pos):
        raise LatentLensError(f"{x.name}: image_grids {grids} do not account for {len(pos)} tokens")
    tok = getattr(x.processor, "tokenizer", None)
    layout = VisualLayout(x.name, [])
    k = 0
    for i, (lh, lw, hh, hw) in enumerate(grids):
        orig = x.image_size(i)
        first = pos[k]
        for crop, rows, cols in (("global", lh, lw), ("high-res", hh, hw)):
            boxes = grid_boxes(rows, cols, *orig) if orig else None
            layout.grids.append(CropGrid(i, crop, (rows, cols)))
            for j in range(rows * cols):
                box = boxes[j] if boxes else None
                layout.tokens.append(
                    TokenAddress(pos[k], i, j // cols, j % cols, crop=crop, pixel_box=box)
                )
                k += 1
        if tok is not None:  # the column and start/end markers around this image's tokens
            for q in range(max(0, first - 1), min(x.ids.numel(), pos[k - 1] + 3)):
                piece = tok.convert_ids_to_tokens(int(x.ids[q]))
                if piece in x.family.marker_tokens:
                    layout.separators.append(Separator(q, piece, i))
    return layout


def pooled_frames(x: LayoutInput) -> VisualLayout:
    """Videos of LLaVA-OneVision / LLaVA-NeXT-Video: per frame a pooled square grid of the
    squashed frame, frames in order, then an optional ``image_newline``."""
    pos = x.positions(2).tolist()
    pixels = x.need("pixel_values_videos")
    n_frames = [int(pixels.shape[1])] * int(pixels.shape[0])  # [videos, frames, C, H, W]
    layout = VisualLayout(x.name, [])
    k = 0
    for v, frames in enumerate(n_frames):
        rest = len(pos) // len(n_frames) - int(x.family.video_newline)
        per, bad = divmod(rest, frames)
        side = math.isqrt(per)
        if bad or side * side != per:
            raise LatentLensError(
                f"{x.name}: video {v} has {rest} tokens for {frames} frames, not a square grid each"
            )
        orig = x.video_sizes[v] if v < len(x.video_sizes) else None
        boxes = grid_boxes(side, side, *orig) if orig else None
        for f in range(frames):
            layout.grids.append(CropGrid(v, None, (side, side), f))
            for j in range(per):
                box = boxes[j] if boxes else None
                layout.tokens.append(
                    TokenAddress(pos[k], v, j // side, j % side, f, (f, f), None, box)
                )
                k += 1
        if x.family.video_newline:
            layout.separators.append(Separator(pos[k], "image_newline", v))
            k += 1
    return layout
