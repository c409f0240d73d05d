"""Image loading and the three encoders' preprocessing, exactly as the paper's models saw it.

One crop per image, no tiling or pooling (SPEC §5):

- CLIP: aspect-preserving bilinear antialiased resize of the float image (scale computed
  in float32, sizes truncated), clipped to [0, 1], black padding centred (odd pixel at
  bottom/right), then CLIP normalisation; the padding mask gives each patch's fraction
  of real pixels.
- DINOv2: uint8 image stretched to the square with bicubic antialiasing, clamped and
  rounded to uint8, /255, ImageNet normalisation.
- SigLIP: uint8 image stretched with bilinear interpolation (no antialiasing), rounded to
  uint8, then x ↦ −1 + 2·x/255.

Resizing uses `torch.nn.functional.interpolate` the way torchvision's `Resize` does for
these inputs (float32 compute, `align_corners=False`, round-to-nearest back to uint8),
so torchvision is not needed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from molmo.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VisionConfig

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""A path, a PIL image, or an `[H, W, 3]` uint8 RGB array."""


def load_image(image: ImageInput) -> np.ndarray:
    """Read an image as an `[H, W, 3]` uint8 RGB array.

    PIL images are converted to RGB first (alpha dropped, not blended; L and P expanded),
    then rotated by their EXIF orientation, in that order (as the original loader did).

    Raises:
        ValueError: an array that is not `[H, W, 3]` uint8, or an empty image.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}"
            )
        arr = image
    elif isinstance(image, Image.Image):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency warnings
            rgb = image.convert("RGB")
        rgb = ImageOps.exif_transpose(rgb) or rgb
        arr = np.asarray(rgb, dtype=np.uint8)
    else:
        with Image.open(image) as opened:
            return load_image(opened)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    return arr


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """`[H, W, 3]` uint8 array → `[3, H, W]` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _resize_float(
    x: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool
) -> torch.Tensor:
    """Resize `[3, h, w]` float32 to `size` as torchvision's Resize does (no-op if equal)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def clip_scaled_size(height: int, width: int, target: int) -> tuple[int, int]:
    """Size of the resized image before padding: float32 scale, truncated sides.

    480×640 → 251×336 for a 336 crop.

    Raises:
        ValueError: a side would become 0 (e.g. a 1×1000 image).
    """
    t = np.float32(target)
    scale = min(t / np.float32(height), t / np.float32(width))
    new_h = int(np.float32(height) * scale)
    new_w = int(np.float32(width) * scale)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"image of {height}×{width} pixels becomes {new_h}×{new_w} when fitted into "
            f"{target}×{target}; it is too thin to encode"
        )
    return new_h, new_w


def preprocess_clip(image: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP crop: aspect-preserving resize, black padding, CLIP normalisation.

    Args:
        image: `[H, W, 3]` uint8 RGB.
        size: side of the square crop.

    Returns:
        `pixels [3, size, size]` float32 (pad pixels = −mean/std) and the real-pixel mask
        `[size, size]` float32 (1 = image, 0 = padding).
    """
    h, w = image.shape[:2]
    new_h, new_w = clip_scaled_size(h, w, size)
    x = _to_chw(image).to(torch.float32) / 255.0
    x = _resize_float(x, (new_h, new_w), "bilinear", antialias=True).clamp(0.0, 1.0)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas = torch.zeros(3, size, size, dtype=torch.float32)
    canvas[:, top : top + new_h, left : left + new_w] = x
    mask = torch.zeros(size, size, dtype=torch.float32)
    mask[top : top + new_h, left : left + new_w] = 1.0
    return _normalize(canvas, CLIP_MEAN, CLIP_STD), mask


def _stretch_uint8(image: np.ndarray, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """Stretch uint8 `[H, W, 3]` to `[3, size, size]`, clamped and rounded back to uint8."""
    x = _to_chw(image)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    y = _resize_float(x.to(torch.float32), (size, size), mode, antialias)
    return y.clamp(0, 255).round().to(torch.uint8)


def preprocess_dinov2(image: np.ndarray, size: int) -> torch.Tensor:
    """DINOv2 crop: bicubic antialiased stretch to uint8, /255, ImageNet normalisation.

    Returns:
        `pixels [3, size, size]` float32.
    """
    x = _stretch_uint8(image, size, "bicubic", antialias=True).to(torch.float32) / 255.0
    return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_siglip(image: np.ndarray, size: int) -> torch.Tensor:
    """SigLIP crop: bilinear stretch (no antialiasing) to uint8, then −1 + 2·x/255.

    Returns:
        `pixels [3, size, size]` float32 in [−1, 1].
    """
    x = _stretch_uint8(image, size, "bilinear", antialias=False).to(torch.float32) / 255.0
    return -1.0 + x * 2.0


def patch_fractions(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fraction of real pixels in each patch, row-major: `[S, S]` → `[(S/p)²]` float32."""
    g = mask.shape[0] // patch_size
    blocks = mask.reshape(g, patch_size, g, patch_size)
    return blocks.mean(dim=(1, 3), dtype=torch.float32).reshape(-1)


@dataclass(frozen=True)
class ProcessedImages:
    """A batch of encoder-ready crops.

    Attributes:
        pixel_values: `[B, 3, S, S]` float32.
        patch_fraction: `[B, H·W]` float32, fraction of each patch that is real image
            (1 everywhere except CLIP padding).
        sizes: original `(height, width)` of each image (after EXIF rotation).
    """

    pixel_values: torch.Tensor
    patch_fraction: torch.Tensor
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:  # noqa: D105
        return int(self.pixel_values.shape[0])


class ImageProcessor:
    """Turns images into crops for one vision encoder (`__call__` on a list of images).

    Args:
        config: the encoder's `VisionConfig` (kind, crop size, patch size).
    """

    def __init__(self, config: VisionConfig) -> None:  # noqa: D107
        self.config = config

    def preprocess_one(
        self, image: ImageInput
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """`(pixels [3, S, S], patch fraction [H·W], (height, width))` of one image."""
        arr = load_image(image)
        size, p = self.config.image_size, self.config.patch_size
        kind = self.config.kind
        if kind == "clip":
            pixels, mask = preprocess_clip(arr, size)
            frac = patch_fractions(mask, p)
        elif kind == "dinov2":
            pixels = preprocess_dinov2(arr, size)
            frac = torch.ones(self.config.num_patches, dtype=torch.float32)
        elif kind == "siglip":
            pixels = preprocess_siglip(arr, size)
            frac = torch.ones(self.config.num_patches, dtype=torch.float32)
        else:  # pragma: no cover - guarded by the Literal type
            raise ValueError(f"unknown vision encoder kind {kind!r}")
        return pixels, frac, (int(arr.shape[0]), int(arr.shape[1]))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> ProcessedImages:
        """Preprocess one image or a list of them into a `ProcessedImages` batch."""
        items: Sequence[Any] = (
            [images] if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) else images
        )
        if len(items) == 0:
            raise ValueError("no images given")
        out = [self.preprocess_one(im) for im in items]
        return ProcessedImages(
            pixel_values=torch.stack([o[0] for o in out]),
            patch_fraction=torch.stack([o[1] for o in out]),
            sizes=[o[2] for o in out],
        )
