"""Visual tokens of Hugging Face VLMs: their hidden states, each with its address.

`visual_token_states` (images) and `video_token_states` (videos) are the one route from
pixels to per-layer visual-token states; every token is addressed by
:func:`latentlens.visual_layout.layout_visual_tokens` for the families of
:mod:`latentlens.models.visual` (see docs/vlm_compatibility.md). `locate_visual_tokens`
is the older single-grid lookup of the registry's ``visual_grid`` fact (Qwen2-VL,
Qwen2.5-VL, LLaVA), kept for registered families without a layout entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image, ImageOps

from latentlens.errors import LatentLensError
from latentlens.models.hooks import get_hidden_states
from latentlens.models.registry import get_arch, get_config_attr, image_token_id
from latentlens.models.visual import VISUAL_FAMILIES
from latentlens.visual_layout import TokenAddress, VisualLayout, layout_visual_tokens


@dataclass(frozen=True)
class VisualTokens:
    """Where one image's visual tokens sit in a sequence.

    Attributes:
        positions: ``[N]`` sequence positions, in patch order (row-major).
        grid: ``(H, W)`` of the patch grid, ``N = H·W``.
    """

    positions: torch.Tensor
    grid: tuple[int, int]

    @property
    def rows(self) -> torch.Tensor:
        """``[N]`` row of each visual token."""
        return torch.arange(self.positions.numel()) // self.grid[1]

    @property
    def cols(self) -> torch.Tensor:
        """``[N]`` column of each visual token."""
        return torch.arange(self.positions.numel()) % self.grid[1]

    def position(self, row: int, col: int) -> int:
        """Sequence position of patch ``(row, col)``."""
        h, w = self.grid
        if not (0 <= row < h and 0 <= col < w):
            raise IndexError(f"patch ({row}, {col}) outside the {h}×{w} grid")
        return int(self.positions[row * w + col])


def locate_visual_tokens(
    model: Any,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    *,
    batch_index: int = 0,
) -> VisualTokens:
    """Find the visual tokens of the (single) image in one sequence of a batch.

    Args:
        model: a registered VLM (or its config).
        input_ids: ``[T]`` or ``[B, T]`` token ids as the processor produced them.
        image_grid_thw: ``[n_images, 3]`` for Qwen-VL models (from the processor).
        batch_index: which sequence of the batch.

    Raises:
        LatentLensError: no/too many image tokens, or a grid that does not match them.
    """
    spec = get_arch(model)
    if not spec.is_vlm or spec.visual_grid is None:
        raise LatentLensError(f"{type(model).__name__} is not a registered vision-language model")
    ids = input_ids if input_ids.ndim == 1 else input_ids[batch_index]
    positions = (ids == image_token_id(model)).nonzero().flatten().cpu()
    n = positions.numel()
    if n == 0:
        raise LatentLensError(
            "no image tokens in the sequence: was the image passed to the processor?"
        )
    if spec.visual_grid == "grid_thw":
        if image_grid_thw is None:
            raise LatentLensError(
                "this model needs image_grid_thw (from its processor) to find its grid"
            )
        if image_grid_thw.shape[0] <= batch_index:
            raise LatentLensError(
                "one image per sequence is supported; image_grid_thw has too few rows"
            )
        t, h, w = (int(x) for x in image_grid_thw[batch_index])
        merge = int(get_config_attr(model, spec.merge_size_attr or ""))
        if t != 1:
            raise LatentLensError(f"video input (t={t}) is not supported, only single images")
        grid = (h // merge, w // merge)
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise LatentLensError(f"{n} image tokens do not form a square grid")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise LatentLensError(
            f"found {n} image tokens but the grid is {grid[0]}×{grid[1]}: one image per sequence is supported"
        )
    return VisualTokens(positions=positions, grid=grid)


def load_image(path_or_image: Any) -> Image.Image:
    """Open an image as RGB (alpha dropped, palette/greyscale expanded), EXIF-rotated."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    img = img.convert("RGB")
    return ImageOps.exif_transpose(img)


def square_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to ``size × size`` with Lanczos (the quickstart's view)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = image.crop((left, top, left + side, top + side))
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.LANCZOS)


def encode_image_prompt(
    processor: Any, image: Image.Image, prompt: str, *, image_token: str | None = None
) -> dict[str, torch.Tensor]:
    """Processor inputs for ``<image token>`` + ``prompt`` as plain text (no chat template).

    Qwen-VL processors get ``size = {shortest_edge, longest_edge} = side²`` so the image is
    neither up- nor down-scaled beyond the patch grid.
    """
    token = (
        image_token
        or getattr(processor, "boi_token", None)  # Gemma 3 expands its begin-of-image token
        or getattr(processor, "image_token", None)
        or "<image>"
    )
    kwargs: dict[str, Any] = {}
    ip = getattr(processor, "image_processor", None)
    if ip is not None and hasattr(ip, "merge_size"):
        pixels = image.size[0] * image.size[1]
        kwargs["images_kwargs"] = {"size": {"shortest_edge": pixels, "longest_edge": pixels}}
    out = processor(text=[token + prompt], images=[image], return_tensors="pt", **kwargs)
    return dict(out)


DEFAULT_PROMPT = "Describe this image in detail."


@dataclass
class ImageStates:
    """The visual tokens of one image: their hidden states per layer and their addresses.

    Attributes:
        states: ``{layer: [N, d]}`` hidden states of the N visual tokens: first the main
            grid's ``H·W`` in patch order (row-major: token ``i`` is patch ``(i // W,
            i % W)``), then any other crop's (LLaVA-NeXT's ``global`` base image).
        tokens: where the main grid's tokens sit in the sequence and its ``(H, W)`` grid.
        image: the image as the model saw it (after any crop/resize).
        addresses: one :class:`TokenAddress` per row of ``states`` (pixel boxes in the
            original image), when the family's geometry is known.
        layout: the whole layout (grids, separators), when known.
    """

    states: dict[int, torch.Tensor]
    tokens: VisualTokens
    image: Image.Image
    addresses: list[TokenAddress] = field(default_factory=list)
    layout: VisualLayout | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of the patch grid."""
        return self.tokens.grid


@torch.inference_mode()
def visual_token_states(
    model: Any,
    processor: Any,
    images: Iterable[Any],
    layers: Sequence[int],
    *,
    size: int | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> list[ImageStates]:
    """The one route from images to per-layer visual-token states with grid addresses.

    Each image (a path or PIL image; RGB, EXIF-rotated) is optionally centre-cropped and
    resized to ``size``, fed as ``<image token>`` + ``prompt`` (plain text), its visual
    tokens are located by the model's image-token id and mapped to the patch grid (the
    registry's ``visual_grid`` fact), and one forward that stops after the deepest layer
    gives their states. Used by `explain_image`, reproduce's off-the-shelf VLM runs and,
    through its own adapter, by the connector VLMs of `molmo`.

    Args:
        model: a HF VLM of a family with a known layout (see docs/vlm_compatibility.md).
        processor: its processor.
        images: paths or PIL images.
        layers: hidden-state indices of the language model (0 = merged vision features).
        size: side of the square each image is centre-cropped and resized to (``None``:
            as is).
        prompt: text after the image token.

    Returns:
        One :class:`ImageStates` per image, states ``[N, d]`` on the model's device.
    """
    device = next(model.parameters()).device
    wanted = sorted({int(x) for x in layers})
    out = []
    for image in images:
        original = load_image(image)
        view = square_crop_resize(original, size) if size else original
        inputs = encode_image_prompt(processor, view, prompt)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if getattr(model.config, "model_type", None) in VISUAL_FAMILIES:
            layout = layout_visual_tokens(model, inputs, processor, image_sizes=[view.size])
            addresses = _main_grid_first(layout, _view_to_original(original.size, size))
            tokens = VisualTokens(
                positions=torch.tensor([a.sequence_position for a in addresses[: _main(layout)]]),
                grid=_main_grid(layout),
            )
        else:  # a registered family without a VisualFamily entry: the registry's grid
            layout, addresses = None, []
            tokens = locate_visual_tokens(model, inputs["input_ids"], inputs.get("image_grid_thw"))
        states = get_hidden_states(model, layers=wanted, **inputs)
        pos = (
            torch.tensor([a.sequence_position for a in addresses])
            if addresses
            else tokens.positions
        ).to(device)
        out.append(
            ImageStates({x: states[x][0, pos] for x in wanted}, tokens, view, addresses, layout)
        )
    return out


def _main_crop(layout: VisualLayout) -> str | None:
    """The crop the picture and the patch numbers use: one that covers the whole image (the
    only grid, LLaVA-NeXT's / Molmo 2's high-res grid, a tiled family's global thumbnail)."""
    crops = [g.crop for g in layout.grids if g.image_index == 0]
    for name in ("high-res", "global"):
        if name in crops:
            return name
    return crops[0]


def _main_grid(layout: VisualLayout) -> tuple[int, int]:
    """``(H, W)`` of the main crop's grid."""
    crop = _main_crop(layout)
    return next(g.shape for g in layout.grids if g.image_index == 0 and g.crop == crop)


def _main(layout: VisualLayout) -> int:
    h, w = _main_grid(layout)
    return h * w


def _main_grid_first(layout: VisualLayout, to_original: Any) -> list[TokenAddress]:
    """The addresses of image 0: the main grid's row-major, then the rest in sequence order,
    with pixel boxes mapped from the model's view to the original image."""
    tokens = [replace(t, pixel_box=to_original(t.pixel_box)) for t in layout.select(0)]
    main_crop = _main_crop(layout)
    main = sorted((t for t in tokens if t.crop == main_crop), key=lambda t: (t.row, t.col))
    return main + [t for t in tokens if t.crop != main_crop]


def _view_to_original(size: tuple[int, int], side: int | None) -> Any:
    """Box mapping from the square ``side`` view of :func:`square_crop_resize` back to the
    original image of ``size = (W, H)`` (identity without a view)."""
    if not side:
        return lambda box: box
    w, h = size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2
    scale = crop / side

    def to_original(box: Any) -> Any:
        if box is None:
            return None
        x0, y0, x1, y1 = box
        return (left + x0 * scale, top + y0 * scale, left + x1 * scale, top + y1 * scale)

    return to_original


DEFAULT_VIDEO_PROMPT = "Describe this video in detail."
_VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def load_frames(source: Any, *, num_frames: int | None = None) -> list[Image.Image]:
    """The frames of a video, as RGB images.

    ``source``: a list of images or image paths; a folder of images (sorted by name); an
    animated image (GIF, WebP, APNG); or a video file, read by transformers' own
    ``load_video`` (PyAV; ``num_frames`` evenly spaced frames).

    Raises:
        LatentLensError: no frames, or a video file without a reader installed.
    """
    from pathlib import Path

    from PIL import ImageSequence

    if isinstance(source, (list, tuple)):
        frames = [load_image(f) for f in source]
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(
                f
                for f in path.iterdir()
                if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")
            )
            frames = [load_image(f) for f in files]
        elif path.suffix.lower() in _VIDEO_SUFFIXES:
            try:
                from transformers.video_utils import load_video

                array, _meta = load_video(str(path), num_frames=num_frames)
            except ImportError as e:
                raise LatentLensError(
                    f"reading {path.name} needs a video reader (pip install av), or pass its "
                    f"frames as images: {e}"
                ) from None
            frames = [Image.fromarray(a).convert("RGB") for a in array]
        else:
            with Image.open(path) as img:
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(img)]
    if num_frames is not None and len(frames) > num_frames:
        step = len(frames) / num_frames
        frames = [frames[int(i * step)] for i in range(num_frames)]
    if not frames:
        raise LatentLensError(f"no frames in {source!r}")
    return frames


@dataclass
class VideoStates:
    """The visual tokens of one video: hidden states per layer and their addresses.

    Attributes:
        states: ``{layer: [N, d]}``, one row per address, in sequence order.
        addresses: each token's temporal group (``frame``, ``frames``), row, col, box.
        layout: grids (one per temporal group) and separators.
        frames: the frames as given to the processor.
    """

    states: dict[int, torch.Tensor]
    addresses: list[TokenAddress]
    layout: VisualLayout
    frames: list[Image.Image]


@torch.inference_mode()
def video_token_states(
    model: Any,
    processor: Any,
    frames: Sequence[Image.Image],
    layers: Sequence[int],
    *,
    prompt: str = DEFAULT_VIDEO_PROMPT,
) -> VideoStates:
    """Per-layer states of every visual token of one video, each addressed (frame, row, col).

    The frames go to the processor as they are (no frame sampling), after its video
    placeholder and before ``prompt``; one forward stops after the deepest layer.

    Raises:
        LatentLensError: the family takes no video, or the inputs do not match its layout.
    """
    token = getattr(processor, "video_token", None)
    if token is None or getattr(processor, "video_processor", None) is None:
        raise LatentLensError(f"{type(processor).__name__} takes no video")
    start, end = (getattr(processor, a, None) for a in ("vision_start_token", "vision_end_token"))
    text = (f"{start}{token}{end}" if start and end else token) + prompt
    frames = list(frames)
    inputs = dict(
        processor(
            text=[text],
            videos=[frames],
            return_tensors="pt",
            videos_kwargs={"do_sample_frames": False},
        )
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    layout = layout_visual_tokens(
        model, inputs, processor, video_sizes=[frames[0].size], video_frames=[len(frames)]
    )
    if not layout.tokens or layout.tokens[0].frame is None:
        raise LatentLensError(f"no video tokens found for {type(model).__name__}")
    wanted = sorted({int(x) for x in layers})
    states = get_hidden_states(model, layers=wanted, **inputs)
    pos = layout.positions.to(device)
    return VideoStates({x: states[x][0, pos] for x in wanted}, list(layout.tokens), layout, frames)
