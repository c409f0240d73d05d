"""Which patches the judge sees: one random 3×3 window per image, fully inside the real image.

SPEC §7: for each query layer, walk the images in index order and take one patch per
image until N patches: among all 3×3 patch windows that lie fully inside the real
(unpadded) image, pick one at random and judge its centre. One generator seeded once
(42) serves every layer in turn, so layers get different patches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from reproduce.judge.render import RENDER_SIZE, WINDOW, Encoder, real_pixel_mask

Convention = Literal["encoder", "original"]
ENCODER_INPUT_PATCH = 14  # pixels per ViT patch of the three encoders (CLIP 336 / 24)


def make_rng(seed: int = 42) -> random.Random:
    """The sampling generator: a private ``random.Random(seed)``.

    It draws the same stream as the original's ``random.seed(seed)`` without touching the
    global state (the original also seeds numpy, but never draws from it while sampling).
    """
    return random.Random(seed)


def real_patch_mask(
    width: int,
    height: int,
    encoder: Encoder,
    grid: tuple[int, int],
    *,
    convention: Convention = "encoder",
    input_size: int | None = None,
) -> np.ndarray:
    """``[H, W]`` bool: which patches hold only real (unpadded) pixels.

    Only CLIP pads; every patch of the other encoders is real.

    Args:
        width: the image's width (after EXIF rotation).
        height: the image's height.
        encoder: how the encoder framed the image (see :mod:`render`).
        grid: ``(H, W)`` of the patch grid.
        convention: ``"encoder"`` checks each patch on the encoder's own square input
            (``input_size``, by default 14 px per patch: 336 for a 24×24 grid) — exactly
            the patches whose padding fraction is 0. ``"original"`` repeats the released
            evaluator: a 512-px rendering cut into ``512 // H``-px cells, which reproduces
            its choice of patches.
        input_size: side of the encoder's square input (``"encoder"`` convention only).
    """
    gh, gw = grid
    if encoder != "clip":
        return np.ones((gh, gw), dtype=bool)
    if convention == "original":
        mask = real_pixel_mask(width, height, encoder, RENDER_SIZE)
        ch, cw = RENDER_SIZE // gh, RENDER_SIZE // gw
        out = np.zeros((gh, gw), dtype=bool)
        for r in range(gh):
            for c in range(gw):
                out[r, c] = mask[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw].all()
        return out
    size = input_size or ENCODER_INPUT_PATCH * gh
    mask = real_pixel_mask(width, height, encoder, size)
    # Patch boundaries as integers (exact when size is a multiple of the grid).
    rows = [(r * size // gh, (r + 1) * size // gh) for r in range(gh)]
    cols = [(c * size // gw, (c + 1) * size // gw) for c in range(gw)]
    return np.array([[mask[r0:r1, c0:c1].all() for c0, c1 in cols] for r0, r1 in rows], dtype=bool)


def valid_windows(real: np.ndarray, window: int = WINDOW) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` of every ``window × window`` block of real patches, row-major."""
    gh, gw = real.shape
    return [
        (r, c)
        for r in range(gh - window + 1)
        for c in range(gw - window + 1)
        if real[r : r + window, c : c + window].all()
    ]


@dataclass(frozen=True)
class ImageGrid:
    """One image offered to the sampler: its index and its ``[H, W]`` real-patch mask."""

    image_idx: int
    real: np.ndarray


def sample_centres(
    images: Iterable[ImageGrid], rng: random.Random, window: int = WINDOW
) -> Iterator[tuple[int, int, int]]:
    """Yield ``(image_idx, row, col)``: one window centre per image, in the images' order.

    Images without any valid window are skipped without drawing. The caller takes as many
    as it needs (and may reject some, e.g. a patch without words: its draw still counts),
    so the generator consumes exactly one draw per image it yields from.
    """
    half = window // 2
    for img in images:
        windows = valid_windows(img.real, window)
        if not windows:
            continue
        ((r, c),) = rng.sample(windows, 1)
        yield img.image_idx, r + half, c + half
