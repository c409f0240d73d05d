"""The pieces every layout shares: addresses, grids, separators, one sequence's inputs, boxes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentlens.errors import LatentLensError
from latentlens.models.registry import get_config_attr
from latentlens.models.visual import VisualFamily

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TokenAddress:
    """One visual token.

    Attributes:
        sequence_position: its position in the model input.
        image_index: which image (or, with ``frame`` set, which video) of the input.
        frame: the first input frame of its temporal group (videos), else ``None``.
        frames: ``(first, last)`` input frames merged into it (videos), else ``None``.
        crop: the crop it belongs to (``None``: the family has one grid).
        row, col: its place in that crop's grid.
        pixel_box: ``(x0, y0, x1, y1)`` it covers in the original image (or frame), in
            pixels; ``None`` when the original size is unknown.
    """

    sequence_position: int
    image_index: int
    row: int
    col: int
    frame: int | None = None
    frames: tuple[int, int] | None = None
    crop: str | None = None
    pixel_box: Box | None = None


@dataclass(frozen=True)
class Separator:
    """A token inside or around the visual tokens that is not a patch (reported, not laid out)."""

    sequence_position: int
    kind: str
    image_index: int


@dataclass(frozen=True)
class CropGrid:
    """The grid of one crop of one image (or temporal group of a video)."""

    image_index: int
    crop: str | None
    shape: tuple[int, int]
    frame: int | None = None


@dataclass
class VisualLayout:
    """Every visual token of one sequence, addressed.

    Attributes:
        family: the VLM family (``config.model_type``).
        tokens: the addresses, in sequence order.
        separators: non-patch tokens among them.
        grids: each crop's grid, in sequence order.
    """

    family: str
    tokens: list[TokenAddress]
    separators: list[Separator] = field(default_factory=list)
    grids: list[CropGrid] = field(default_factory=list)

    @property
    def positions(self) -> torch.Tensor:
        """``[N]`` sequence positions of the visual tokens, in sequence order."""
        return torch.tensor([t.sequence_position for t in self.tokens], dtype=torch.long)

    def select(
        self,
        image_index: int = 0,
        crop: str | None = ...,
        frame: int | None = ...,  # type: ignore[assignment]
    ) -> list[TokenAddress]:
        """The addresses of one image (and, when given, one crop / frame)."""
        return [
            t
            for t in self.tokens
            if t.image_index == image_index
            and (crop is ... or t.crop == crop)
            and (frame is ... or t.frame == frame)
        ]

    def find(self, image_index: int, row: int, col: int, **where: Any) -> TokenAddress:
        """The address of one patch (``crop=`` / ``frame=`` narrow it down).

        Raises:
            KeyError: no such patch, or several (name the crop or frame).
        """
        hits = [
            t
            for t in self.select(image_index, where.get("crop", ...), where.get("frame", ...))
            if (t.row, t.col) == (row, col)
        ]
        if len(hits) != 1:
            raise KeyError(
                f"{len(hits)} visual tokens at image {image_index}, row {row}, col {col} {where}"
            )
        return hits[0]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description: family, grids, separators (tokens come per patch)."""
        return {
            "family": self.family,
            "grids": [asdict(g) for g in self.grids],
            "separators": [asdict(s) for s in self.separators],
        }


# ── views: how the processor turned the original image into what the encoder saw ────────


def size_dict(ip: Any, name: str) -> dict[str, Any]:
    value = getattr(ip, name, None)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    return (
        {k: v for k, v in vars(value).items() if v is not None}
        if hasattr(value, "__dict__")
        else {}
    )


def square_view_boxes(image_processor: Any, original: tuple[int, int], side: int) -> list[Box]:
    """Pixel boxes of an ``side × side`` token grid over the encoder's square view.

    The view is what the image processor makes of an image of ``original = (W, H)``: a
    centre crop after resizing the shortest edge (CLIP) or a squash to a fixed size
    (SigLIP). Returns one box per token, row-major, in the original image's pixels.
    """
    w, h = original
    size = size_dict(image_processor, "size")
    crop = size_dict(image_processor, "crop_size")
    if getattr(image_processor, "do_center_crop", False) and crop:
        short = size.get("shortest_edge") or min(crop.get("height", 0), crop.get("width", 0))
        scale = short / min(w, h)
        rw, rh = w * scale, h * scale
        vw, vh = crop["width"], crop["height"]
        ox, oy = (rw - vw) / 2, (rh - vh) / 2
        sx, sy = 1 / scale, 1 / scale
    else:  # squashed into the square view
        vw = vh = 1.0
        ox = oy = 0.0
        sx, sy = w, h
    boxes = []
    for r in range(side):
        for c in range(side):
            x0, x1 = vw * c / side, vw * (c + 1) / side
            y0, y1 = vh * r / side, vh * (r + 1) / side
            boxes.append(
                clip_box(((x0 + ox) * sx, (y0 + oy) * sy, (x1 + ox) * sx, (y1 + oy) * sy), w, h)
            )
    return boxes


def clip_box(box: Box, w: float, h: float) -> Box:
    """The box inside the image (empty, on the border, when it lies wholly in padding)."""
    x0, y0, x1, y1 = box
    x0, y0 = min(max(0.0, x0), float(w)), min(max(0.0, y0), float(h))
    return (x0, y0, max(x0, min(float(w), x1)), max(y0, min(float(h), y1)))


def grid_boxes(rows: int, cols: int, w: float, h: float) -> list[Box]:
    """Boxes of a grid that covers the whole original image (resized, not cropped)."""
    return [
        (w * c / cols, h * r / rows, w * (c + 1) / cols, h * (r + 1) / rows)
        for r in range(rows)
        for c in range(cols)
    ]


# ── finding the visual tokens ──────────────────────────────────────────────────────────


def runs_of(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of True in a 1-D mask."""
    idx = mask.nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def int_attr(model: Any, attr: str | None) -> int | None:
    if attr is None:
        return None
    try:
        return int(get_config_attr(model, attr))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class LayoutInput:
    """One sequence to lay out, with what its layout may need.

    Attributes:
        model: the VLM (or its config). name: its family name. family: its facts.
        ids: ``[T]`` token ids. types: ``[T]`` ``mm_token_type_ids`` when the processor
        gives them. inputs: the processor's whole output. processor: the processor.
        image_sizes / video_sizes: ``(W, H)`` of each original image / video frame of
        this sequence. video_frames: the frames of each video as given to the processor.
        before: image and video tokens in the batch's earlier sequences (to find this
        sequence's rows of per-image entries such as ``image_grid_thw``).
    """

    model: Any
    name: str
    family: VisualFamily
    ids: torch.Tensor
    types: torch.Tensor | None
    inputs: Mapping[str, Any]
    processor: Any
    image_sizes: Sequence[tuple[int, int] | None] = ()
    video_sizes: Sequence[tuple[int, int] | None] = ()
    video_frames: Sequence[int | None] = ()
    before: tuple[int, int] = (0, 0)

    def own(
        self, key: str, entries: Sequence[Any], counts: Sequence[int], kind: int = 1
    ) -> list[Any]:
        """This sequence's share of per-image (``kind`` 1) or per-video (2) entries of the
        whole batch, each taking ``counts[i]`` tokens: the ones after the earlier
        sequences' tokens, up to this sequence's own.

        Raises:
            LatentLensError: the counts do not split at this sequence's boundaries.
        """
        skip, mine = self.before[kind - 1], self.positions(kind).numel()
        out, seen, used = [], 0, 0
        for entry, count in zip(entries, counts, strict=True):
            if skip <= seen < skip + mine:
                out.append(entry)
                used += count
            seen += count
        if used != mine:
            raise LatentLensError(
                f"{self.name}: {key} (token counts {list(counts)}) does not account for this "
                f"sequence's {mine} {'image' if kind == 1 else 'video'} tokens (after {skip} "
                "in earlier sequences): inputs from another prompt or processor?"
            )
        return out

    def positions(self, kind: int = 1) -> torch.Tensor:
        """``[n]`` positions of the image (``kind`` 1) or video (2) tokens."""
        if self.types is not None and self.family.token_types:  # the processor marks them
            return (self.types == kind).nonzero().flatten()
        attr = self.family.image_token_attr if kind == 1 else self.family.video_token_attr
        token = int_attr(self.model, attr)
        if token is None:
            return torch.empty(0, dtype=torch.long)
        return (self.ids == token).nonzero().flatten()

    def image_positions(self) -> list[int]:
        """Positions of the image tokens.

        Raises:
            LatentLensError: there are none.
        """
        pos = self.positions(1).tolist()
        if not pos:
            raise LatentLensError(
                f"{self.name}: no image tokens in the sequence: was the image passed to the "
                "processor?"
            )
        return pos

    def need(self, key: str) -> torch.Tensor:
        """An entry of the processor's output that the layout cannot do without."""
        value = self.inputs.get(key)
        if value is None:
            raise LatentLensError(
                f"{self.name}: the processor output has no {key!r}, needed to lay out its "
                "visual tokens"
            )
        return torch.as_tensor(value).cpu()

    def image_size(self, i: int) -> tuple[int, int] | None:
        """``(W, H)`` of original image ``i``, if known."""
        return self.image_sizes[i] if i < len(self.image_sizes) else None


def patch_size(x: LayoutInput) -> int:
    """The encoder's patch side: the image processor's, else the config's."""
    ip = getattr(x.processor, "image_processor", None)
    p = getattr(ip, "patch_size", None)
    if isinstance(p, Mapping):
        p = p.get("height")
    if p is None:
        p = get_config_attr(x.model, x.family.patch_size_attr)
    return int(p[0] if isinstance(p, (list, tuple)) else p)
