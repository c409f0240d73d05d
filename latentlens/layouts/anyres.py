"""LLaVA-NeXT's any-resolution images: a squashed base image and an unpadded high-res grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from latentlens.errors import LatentLensError
from latentlens.layouts.base import (
    CropGrid,
    LayoutInput,
    Separator,
    TokenAddress,
    VisualLayout,
    clip_box,
    patch_size,
    square_view_boxes,
)
from latentlens.models.registry import get_config_attr

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class _HighRes:
    """LLaVA-NeXT's high-res grid of one image: its canvas and the grid left after unpadding."""

    canvas: tuple[int, int]  # (W, H) pixels: the chosen pinpoint resolution
    rows: int
    cols: int
    pad: tuple[int, int]  # token rows / columns of padding removed on each side

    def box(self, row: int, col: int, original: tuple[int, int]) -> Box:
        """Pixel box of high-res token ``(row, col)`` in the original image."""
        (bw, bh), (w, h) = self.canvas, original
        px_w = bw / (self.cols + 2 * self.pad[1])
        px_h = bh / (self.rows + 2 * self.pad[0])
        scale = min(bw / w, bh / h)  # the image is resized into the canvas and centred
        ox, oy = (bw - w * scale) / 2, (bh - h * scale) / 2
        x0, y0 = (col + self.pad[1]) * px_w, (row + self.pad[0]) * px_h
        return clip_box(
            (
                (x0 - ox) / scale,
                (y0 - oy) / scale,
                (x0 + px_w - ox) / scale,
                (y0 + px_h - oy) / scale,
            ),
            w,
            h,
        )


def _high_res(
    original: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, side: int
) -> _HighRes:
    """The processor's pinpoint choice (most effective pixels, then least waste) and the
    model's unpadding of the merged crops (``side`` tokens per crop side)."""
    w, h = original
    best: tuple[int, int, int, int] | None = None
    for ph, pw in pinpoints:  # pinpoints are [height, width]
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if best is None or eff > best[0] or (eff == best[0] and waste < best[1]):
            best = (eff, waste, ph, pw)
    assert best is not None
    bh, bw = best[2], best[3]
    cur_h, cur_w = (bh // tile) * side, (bw // tile) * side
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(round(h * (cur_w / w), 7))) // 2
        return _HighRes((bw, bh), cur_h - 2 * pad, cur_w, (pad, 0))
    pad = (cur_w - int(round(w * (cur_h / h), 7))) // 2
    return _HighRes((bw, bh), cur_h, cur_w - 2 * pad, (0, pad))


class _SquashView:
    """An image processor seen as squashing into its square view (LLaVA-NeXT's base image)."""

    do_center_crop = False
    size = None


def anyres(x: LayoutInput) -> VisualLayout:
    pos = x.image_positions()
    config = getattr(x.model, "config", x.model)
    tile = int(get_config_attr(x.model, "vision_config.image_size"))
    side = tile // patch_size(x)
    layout = VisualLayout(x.name, [])
    every = [(int(w), int(h)) for h, w in x.need("image_sizes").reshape(-1, 2).tolist()]
    shapes = [_high_res(o, config.image_grid_pinpoints, tile, side) for o in every]
    counts = [side * side + hr.rows * (hr.cols + 1) for hr in shapes]
    mine = x.own("image_sizes", list(zip(every, shapes, strict=True)), counts)
    k = 0
    for i, (orig, hr) in enumerate(mine):  # the processor records each original [H, W]
        n = side * side + hr.rows * (hr.cols + 1)
        if k + n > len(pos):
            raise LatentLensError(
                f"{x.name}: image {i} should have {n} tokens (base {side}², high-res "
                f"{hr.rows}×{hr.cols} + a newline per row); the sequence has {len(pos) - k} left"
            )
        base = square_view_boxes(_SquashView(), orig, side)
        layout.grids.append(CropGrid(i, "global", (side, side)))
        for j in range(side * side):
            layout.tokens.append(
                TokenAddress(pos[k], i, j // side, j % side, crop="global", pixel_box=base[j])
            )
            k += 1
        layout.grids.append(CropGrid(i, "high-res", (hr.rows, hr.cols)))
        for r in range(hr.rows):
            for c in range(hr.cols):
                box = hr.box(r, c, orig)
                layout.tokens.append(TokenAddress(pos[k], i, r, c, crop="high-res", pixel_box=box))
                k += 1
            layout.separators.append(Separator(pos[k], "image_newline", i))
            k += 1
    if k != len(pos):
        raise LatentLensError(f"{x.name}: {len(pos)} image tokens, {k} laid out")
    return layout
