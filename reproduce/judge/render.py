"""What the judge sees: the image as the encoder saw it at 512×512, the boxed region, its crop.

Each vision encoder framed the image differently (SPEC §5–6), and the patch grid only
lines up with the picture when it is shown the same way:

- ``clip``: aspect-preserving resize (float32 scale, truncated sides, bilinear with
  antialias on the float image) and black padding centred (odd extra row/column at the
  bottom/right);
- ``siglip`` / ``dinov2``: squashed to the square;
- ``qwen2vl``: centre-cropped to a square, then resized.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageOps

Encoder = Literal["clip", "siglip", "dinov2", "qwen2vl"]
ENCODERS: tuple[Encoder, ...] = ("clip", "siglip", "dinov2", "qwen2vl")
RENDER_SIZE = 512
WINDOW = 3  # the judged region is the 3×3 patches around the judged patch
OUTLINE = (255, 0, 0)
OUTLINE_WIDTH = 3
FILL_ALPHA = 40  # light red over the region (of 255)


def load_rgb(source: str | os.PathLike[str] | Image.Image) -> Image.Image:
    """Open an image as RGB (alpha dropped, not blended), then apply its EXIF rotation."""
    if not isinstance(source, Image.Image):
        with Image.open(source) as opened:
            return load_rgb(opened)
    rgb = source.convert("RGB")
    return ImageOps.exif_transpose(rgb) or rgb


def fitted_size(height: int, width: int, target: int) -> tuple[int, int]:
    """``(h', w')`` of an aspect-preserving fit into ``target²``: float32 scale, truncated.

    Raises:
        ValueError: a side would become 0.
    """
    t = np.float32(target)
    scale = min(t / np.float32(height), t / np.float32(width))
    new_h, new_w = int(np.float32(height) * scale), int(np.float32(width) * scale)
    if new_h < 1 or new_w < 1:
        raise ValueError(f"a {height}×{width} image is too thin to fit into {target}×{target}")
    return new_h, new_w


def real_pixel_mask(width: int, height: int, encoder: Encoder, size: int) -> np.ndarray:
    """``[size, size]`` bool: which pixels of the encoder's square view are real image."""
    mask = np.ones((size, size), dtype=bool)
    if encoder == "clip":
        new_h, new_w = fitted_size(height, width, size)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        mask[:] = False
        mask[top : top + new_h, left : left + new_w] = True
    return mask


def _resize_pad(image: Image.Image, size: int) -> Image.Image:
    import torch
    import torch.nn.functional as F

    w, h = image.size
    new_h, new_w = fitted_size(h, w, size)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(
            x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )[0]
    x = x.clamp(0.0, 1.0)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = (x.permute(1, 2, 0).numpy() * 255).astype(
        np.uint8
    )
    return Image.fromarray(canvas)


def render_view(image: Image.Image, encoder: Encoder, size: int = RENDER_SIZE) -> Image.Image:
    """The image framed as ``encoder`` saw it, as a ``size × size`` RGB picture."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
    if encoder == "clip":
        return _resize_pad(image, size)
    if encoder == "qwen2vl":
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.BILINEAR)


def region_box(
    row: int, col: int, grid: tuple[int, int], size: int = RENDER_SIZE, window: int = WINDOW
) -> tuple[int, int, int, int]:
    """Pixel box ``(left, top, right, bottom)``, right/bottom exclusive, of a patch's window.

    The ``window × window`` patches centred on ``(row, col)`` are clipped to the grid, so a
    border patch gets a smaller box that never leaves the picture.

    Raises:
        IndexError: the patch is outside the grid.
    """
    gh, gw = grid
    if not (0 <= row < gh and 0 <= col < gw):
        raise IndexError(f"patch ({row}, {col}) outside the {gh}×{gw} grid")
    half = window // 2
    r0, r1 = max(0, row - half), min(gh, row + half + 1)
    c0, c1 = max(0, col - half), min(gw, col + half + 1)
    # Integer arithmetic: patch i spans [i·size // G, (i+1)·size // G).
    return c0 * size // gw, r0 * size // gh, c1 * size // gw, r1 * size // gh


def draw_region(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """A copy of ``image`` with ``box`` tinted light red and outlined in red (3 px, inside it)."""
    left, top, right, bottom = box
    left, top = max(0, left), max(0, top)
    right, bottom = min(image.width, right), min(image.height, bottom)
    if right <= left or bottom <= top:
        return image.copy()
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle(
        (left, top, right - 1, bottom - 1), fill=(*OUTLINE, FILL_ALPHA)
    )
    out = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    ImageDraw.Draw(out).rectangle(
        (left, top, right - 1, bottom - 1), outline=OUTLINE, width=OUTLINE_WIDTH
    )
    return out


def judge_views(
    view: Image.Image, row: int, col: int, grid: tuple[int, int], window: int = WINDOW
) -> tuple[Image.Image, Image.Image]:
    """The boxed full view and the crop of the same region from the unboxed view (not upscaled)."""
    box = region_box(row, col, grid, size=view.width, window=window)
    return draw_region(view, box), view.crop(box)


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,…`` of an image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
