"""Which hidden state is which patch: every visual token of a VLM input, addressed.

An address names a visual token's sequence position, its image (or video) and frame, the
crop it belongs to (``None`` when the family has one grid; ``"global"`` / ``"high-res"``
for LLaVA-NeXT's two), its row and column in that crop's grid, and the pixel box it covers
in the original image. Separator tokens (``image_newline``, Pixtral's row breaks) are
located and reported apart from the grid. The per-family facts live in
:mod:`latentlens.models.visual`; the processor supplies the geometry of each input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentlens.errors import LatentLensError
from latentlens.models.registry import get_config_attr
from latentlens.models.visual import VisualFamily, visual_family

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


def _size_dict(ip: Any, name: str) -> dict[str, Any]:
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
    size = _size_dict(image_processor, "size")
    crop = _size_dict(image_processor, "crop_size")
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
                _clip(((x0 + ox) * sx, (y0 + oy) * sy, (x1 + ox) * sx, (y1 + oy) * sy), w, h)
            )
    return boxes


def _clip(box: Box, w: float, h: float) -> Box:
    """The box inside the image (empty, on the border, when it lies wholly in padding)."""
    x0, y0, x1, y1 = box
    x0, y0 = min(max(0.0, x0), float(w)), min(max(0.0, y0), float(h))
    return (x0, y0, max(x0, min(float(w), x1)), max(y0, min(float(h), y1)))


def _grid_boxes(rows: int, cols: int, w: float, h: float) -> list[Box]:
    """Boxes of a grid that covers the whole original image (resized, not cropped)."""
    return [
        (w * c / cols, h * r / rows, w * (c + 1) / cols, h * (r + 1) / rows)
        for r in range(rows)
        for c in range(cols)
    ]


# ── finding the visual tokens ──────────────────────────────────────────────────────────


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of True in a 1-D mask."""
    idx = mask.nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _int_attr(model: Any, attr: str | None) -> int | None:
    if attr is None:
        return None
    try:
        return int(get_config_attr(model, attr))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _positions(
    model: Any, family: VisualFamily, ids: torch.Tensor, types: torch.Tensor | None, kind: int
) -> torch.Tensor:
    """Positions of the image (``kind`` 1) or video (2) tokens of one sequence."""
    if types is not None:  # the processor says which tokens are which
        return (types == kind).nonzero().flatten()
    attr = family.image_token_attr if kind == 1 else family.video_token_attr
    token = _int_attr(model, attr)
    if token is None:
        return torch.empty(0, dtype=torch.long)
    return (ids == token).nonzero().flatten()


def _need(inputs: Mapping[str, Any], key: str, family: str) -> torch.Tensor:
    value = inputs.get(key)
    if value is None:
        raise LatentLensError(
            f"{family}: the processor output has no {key!r}, needed to lay out its visual tokens"
        )
    return torch.as_tensor(value).cpu()


def _patch_size(model: Any, family: VisualFamily, processor: Any) -> int:
    ip = getattr(processor, "image_processor", None)
    p = getattr(ip, "patch_size", None)
    if isinstance(p, Mapping):
        p = p.get("height")
    if p is None:
        p = get_config_attr(model, family.patch_size_attr)
    return int(p[0] if isinstance(p, (list, tuple)) else p)


# ── the layouts ────────────────────────────────────────────────────────────────────────


def _grid_thw(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    inputs: Mapping[str, Any],
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
    video_sizes: Sequence[tuple[int, int] | None],
    video_frames: Sequence[int | None],
) -> VisualLayout:
    merge = int(get_config_attr(model, family.merge_size_attr or ""))
    layout = VisualLayout(name, [])
    for kind, key, originals in ((1, "image_grid_thw", sizes), (2, "video_grid_thw", video_sizes)):
        pos = _positions(model, family, ids, types, kind).tolist()
        if not pos:
            continue
        thw = _need(inputs, key, name).reshape(-1, 3).tolist()
        counts = [t * (h // merge) * (w // merge) for t, h, w in thw]
        if sum(counts) != len(pos):
            raise LatentLensError(
                f"{name}: {len(pos)} {'image' if kind == 1 else 'video'} tokens in the sequence, "
                f"but {key} {thw} accounts for {sum(counts)} (one sequence's inputs expected)"
            )
        tpatch = int(get_config_attr(model, family.temporal_patch_attr)) if kind == 2 else 1
        k = 0
        for i, (t, h, w) in enumerate(thw):
            rows, cols = h // merge, w // merge
            orig = originals[i] if i < len(originals) else None
            boxes = _grid_boxes(rows, cols, *orig) if orig else None
            n_frames = video_frames[i] if kind == 2 and i < len(video_frames) else None
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


def _square_count(model: Any, family: VisualFamily, processor: Any) -> int:
    """Visual tokens per image of a ``square`` family: the config's count, the processor's,
    or the encoder's patch grid (plus its CLS token when the model keeps it)."""
    for value in (
        _int_attr(model, family.tokens_per_image_attr),
        getattr(processor, "image_seq_length", None),
        getattr(processor, "num_image_tokens", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    side = int(get_config_attr(model, "vision_config.image_size")) // _patch_size(
        model, family, processor
    )
    config = getattr(model, "config", model)
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return side * side + int(full)


def _square(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    pos = _positions(model, family, ids, types, 1).tolist()
    if not pos:
        raise LatentLensError(
            f"{name}: no image tokens in the sequence: was the image passed to the processor?"
        )
    per = _square_count(model, family, processor)
    if len(pos) % per:
        raise LatentLensError(
            f"{name}: {len(pos)} image tokens is not a multiple of {per}, the tokens per image"
        )
    lengths = [per] * (len(pos) // per)
    ip = getattr(processor, "image_processor", None)
    layout = VisualLayout(name, [])
    k = 0
    for i, n in enumerate(lengths):
        side = math.isqrt(n)
        if side * side != n:
            raise LatentLensError(f"{name}: image {i} has {n} tokens, not a square grid")
        orig = sizes[i] if i < len(sizes) else None
        boxes = square_view_boxes(ip, orig, side) if orig and ip is not None else None
        layout.grids.append(CropGrid(i, None, (side, side)))
        for j in range(n):
            layout.tokens.append(
                TokenAddress(pos[k], i, j // side, j % side, pixel_box=boxes[j] if boxes else None)
            )
            k += 1
    return layout


def _row_break(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    tok = getattr(processor, "tokenizer", None)
    seps: dict[int, str] = {}
    for attr in family.separators:
        text = getattr(processor, attr, None)
        if text is None or tok is None:
            raise LatentLensError(f"{name}: the processor has no {attr!r} (a separator token)")
        seps[int(tok.convert_tokens_to_ids(text))] = attr.removesuffix("_token")
    image = set(_positions(model, family, ids, types, 1).tolist())
    if not image:
        raise LatentLensError(
            f"{name}: no image tokens in the sequence: was the image passed to the processor?"
        )
    sep_ids = torch.tensor(sorted(seps))
    member = torch.tensor([i in image for i in range(ids.numel())]) | torch.isin(ids, sep_ids)
    layout = VisualLayout(name, [])
    end_id = int(tok.convert_tokens_to_ids(getattr(processor, family.separators[-1])))
    images: list[list[list[int]]] = [[[]]]  # image → rows → positions
    for start, stop in _runs(member):
        for q in range(start, stop):
            token = int(ids[q])
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
            raise LatentLensError(f"{name}: image {i} has rows of different lengths")
        orig = sizes[i] if i < len(sizes) else None
        boxes = _grid_boxes(len(rows), cols, *orig) if orig else None
        layout.grids.append(CropGrid(i, None, (len(rows), cols)))
        for r, row in enumerate(rows):
            for c, q in enumerate(row):
                box = boxes[r * cols + c] if boxes else None
                layout.tokens.append(TokenAddress(q, i, r, c, pixel_box=box))
    return layout


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
        return _clip(
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


def _anyres(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    inputs: Mapping[str, Any],
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    pos = _positions(model, family, ids, types, 1).tolist()
    if not pos:
        raise LatentLensError(f"{name}: no image tokens in the sequence: was the image passed?")
    config = getattr(model, "config", model)
    tile = int(get_config_attr(model, "vision_config.image_size"))
    side = tile // _patch_size(model, family, processor)
    layout = VisualLayout(name, [])
    k = 0
    for i, (oh, ow) in enumerate(_need(inputs, "image_sizes", name).reshape(-1, 2).tolist()):
        orig = (int(ow), int(oh))  # the processor records each original [H, W]
        hr = _high_res(orig, config.image_grid_pinpoints, tile, side)
        n = side * side + hr.rows * (hr.cols + 1)
        if k + n > len(pos):
            raise LatentLensError(
                f"{name}: image {i} should have {n} tokens (base {side}², high-res "
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
        raise LatentLensError(f"{name}: {len(pos)} image tokens, {k} laid out")
    return layout


class _SquashView:
    """An image processor seen as squashing into its square view (LLaVA-NeXT's base image)."""

    do_center_crop = False
    size = None


def _tiles(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    tok = getattr(processor, "tokenizer", processor)
    if not hasattr(tok, "convert_ids_to_tokens"):
        raise LatentLensError(f"{name}: the processor's tokenizer is needed to read tile markers")
    pos = _positions(model, family, ids, types, 1)
    if pos.numel() == 0:
        raise LatentLensError(f"{name}: no image tokens in the sequence: was the image passed?")
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[pos] = True
    runs = _runs(mask)
    tile_re = re.compile(family.tile_marker or r"(?!)")
    x_sep, y_sep = family.tile_separators or (None, None)
    layout = VisualLayout(name, [])
    image, pending = 0, []  # runs of the current image: (crop, (row, col) | None, start, stop)
    row = col = 0  # the next tile, when separators (not markers) place the tiles
    previous = 0
    for start, stop in runs:
        gap = tok.convert_ids_to_tokens(ids[previous:start].tolist())
        text = "".join(gap)
        for q, piece in zip(range(previous, start), gap, strict=True):
            if _is_marker(family, tile_re, piece):
                layout.separators.append(Separator(q, piece, image))
            if pending and piece == x_sep:
                col += 1
            elif pending and piece == y_sep:
                row, col = row + 1, 0
        m = tile_re.search(text)
        if family.global_marker and family.global_marker in text:
            pending.append(("global", None, start, stop))
            pending = _place_numbered_tiles(name, image, pending, sizes, processor)
            _add_tiled_image(layout, name, image, pending, sizes, family.tile_fit)
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
                f"{name}: a run of image tokens at position {start} follows no tile marker "
                f"({family.tile_marker!r} or {family.global_marker!r}) but {text[-80:]!r}"
            )
        previous = stop
    if pending:
        raise LatentLensError(f"{name}: the last image's tiles have no global image after them")
    tail = tok.convert_ids_to_tokens(ids[previous:].tolist())
    for q, piece in zip(range(previous, ids.numel()), tail, strict=True):
        if piece in family.marker_tokens:  # the closing marker of the last image
            layout.separators.append(Separator(q, piece, image - 1))
        else:
            break
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

    tile = _size_dict(ip, "size")
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
                    box = _clip((x0, y0, x0 + tw / side, y0 + th / side), w, h)
                else:  # tile (i, k) of the image squashed to rows × cols tiles
                    tw, th = w / cols, h / rows
                    x0, y0 = rc[1] * tw + tw * c / side, rc[0] * th + th * r / side
                    box = (x0, y0, x0 + tw / side, y0 + th / side)
            layout.tokens.append(TokenAddress(start + j, image, r, c, crop=crop, pixel_box=box))


def _canvas(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    pos = _positions(model, family, ids, types, 1)
    if pos.numel() == 0:
        raise LatentLensError(f"{name}: no image tokens in the sequence: was the image passed?")
    per_tile = getattr(processor, "image_seq_length", None)
    ip = getattr(processor, "image_processor", None)
    if not isinstance(per_tile, int) or ip is None:
        raise LatentLensError(
            f"{name}: the processor's image_seq_length and image processor are needed"
        )
    tile = _size_dict(ip, "size")
    tok = getattr(processor, "tokenizer", None)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[pos] = True
    layout = VisualLayout(name, [])
    for i, (start, stop) in enumerate(_runs(mask)):
        for q in (start - 1, stop):  # the markers around the run
            if tok is not None and 0 <= q < ids.numel():
                piece = tok.convert_ids_to_tokens(int(ids[q]))
                if piece in family.marker_tokens:
                    layout.separators.append(Separator(q, piece, i))
        n_tiles, rest = divmod(stop - start, per_tile)
        side = math.isqrt(per_tile)
        if rest or side * side != per_tile:
            raise LatentLensError(
                f"{name}: image {i} has {stop - start} tokens, not tiles of {per_tile}"
            )
        orig = sizes[i] if i < len(sizes) else None
        if n_tiles == 1:
            runs = [(None, None)]
        else:
            if orig is None:
                raise LatentLensError(
                    f"{name}: the original image size is needed to find the tiling"
                )
            w, h = orig
            cols, rows = get_optimal_tiled_canvas(
                (h, w), (tile["height"], tile["width"]), ip.min_patches, ip.max_patches
            )
            if rows * cols + 1 != n_tiles:
                raise LatentLensError(
                    f"{name}: image {i} has {n_tiles} tiles; its {rows}×{cols} canvas and a "
                    f"thumbnail would make {rows * cols + 1}"
                )
            runs = [(f"tile {r},{c}", (r, c)) for r in range(rows) for c in range(cols)]
            runs.append(("global", None))
        tiles = [
            (crop, rc, start + k * per_tile, start + (k + 1) * per_tile)
            for k, (crop, rc) in enumerate(runs)
        ]
        _add_tiled_image(layout, name, i, tiles, sizes, family.tile_fit)
    return layout


def _low_high(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    inputs: Mapping[str, Any],
    processor: Any,
    sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    """Molmo 2: per image the low-res grid then the high-res grid, from ``image_grids``."""
    token = _int_attr(model, family.image_token_attr)
    pos = (ids == token).nonzero().flatten().tolist() if token is not None else []
    if not pos:
        raise LatentLensError(f"{name}: no image tokens in the sequence: was the image passed?")
    grids = _need(inputs, "image_grids", name).reshape(-1, 4).tolist()
    if sum(a * b + c * d for a, b, c, d in grids) != len(pos):
        raise LatentLensError(f"{name}: image_grids {grids} do not account for {len(pos)} tokens")
    tok = getattr(processor, "tokenizer", None)
    layout = VisualLayout(name, [])
    k = 0
    for i, (lh, lw, hh, hw) in enumerate(grids):
        orig = sizes[i] if i < len(sizes) else None
        first = pos[k]
        for crop, rows, cols in (("global", lh, lw), ("high-res", hh, hw)):
            boxes = _grid_boxes(rows, cols, *orig) if orig else None
            layout.grids.append(CropGrid(i, crop, (rows, cols)))
            for j in range(rows * cols):
                box = boxes[j] if boxes else None
                layout.tokens.append(
                    TokenAddress(pos[k], i, j // cols, j % cols, crop=crop, pixel_box=box)
                )
                k += 1
        if tok is not None:  # the column and start/end markers around this image's tokens
            for q in range(max(0, first - 1), min(ids.numel(), pos[k - 1] + 3)):
                piece = tok.convert_ids_to_tokens(int(ids[q]))
                if piece in family.marker_tokens:
                    layout.separators.append(Separator(q, piece, i))
    return layout


def _pooled_frames(
    model: Any,
    name: str,
    family: VisualFamily,
    ids: torch.Tensor,
    types: torch.Tensor | None,
    inputs: Mapping[str, Any],
    video_sizes: Sequence[tuple[int, int] | None],
) -> VisualLayout:
    """Videos of LLaVA-OneVision / LLaVA-NeXT-Video: per frame a pooled square grid of the
    squashed frame, frames in order, then an optional ``image_newline``."""
    pos = _positions(model, family, ids, types, 2).tolist()
    pixels = _need(inputs, "pixel_values_videos", name)
    n_frames = [int(pixels.shape[1])] * int(pixels.shape[0])  # [videos, frames, C, H, W]
    layout = VisualLayout(name, [])
    k = 0
    for v, frames in enumerate(n_frames):
        rest = len(pos) // len(n_frames) - int(family.video_newline)
        per, bad = divmod(rest, frames)
        side = math.isqrt(per)
        if bad or side * side != per:
            raise LatentLensError(
                f"{name}: video {v} has {rest} tokens for {frames} frames, not a square grid each"
            )
        orig = video_sizes[v] if v < len(video_sizes) else None
        boxes = _grid_boxes(side, side, *orig) if orig else None
        for f in range(frames):
            layout.grids.append(CropGrid(v, None, (side, side), f))
            for j in range(per):
                box = boxes[j] if boxes else None
                layout.tokens.append(
                    TokenAddress(pos[k], v, j // side, j % side, f, (f, f), None, box)
                )
                k += 1
        if family.video_newline:
            layout.separators.append(Separator(pos[k], "image_newline", v))
            k += 1
    return layout


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
        image_sizes: ``(W, H)`` of each original image, in input order (pixel boxes).
        video_sizes: ``(W, H)`` of each video's frames.
        video_frames: the number of frames of each video as given to the processor.
        batch_index: which sequence of the batch.

    Raises:
        UnsupportedArchitectureError: the family's geometry is not known.
        LatentLensError: the inputs do not match the family's layout.
    """
    name, family = visual_family(model)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    ids = ids if ids.ndim == 1 else ids[batch_index]
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        types = torch.as_tensor(types).cpu()
        types = types if types.ndim == 1 else types[batch_index]
    if family.video_layout == "pooled_frames" and _positions(model, family, ids, types, 2).numel():
        return _pooled_frames(model, name, family, ids, types, inputs, video_sizes)
    if family.layout == "grid_thw":
        return _grid_thw(
            model,
            name,
            family,
            ids,
            types,
            inputs,
            processor,
            image_sizes,
            video_sizes,
            video_frames,
        )
    if family.layout == "square":
        return _square(model, name, family, ids, types, processor, image_sizes)
    if family.layout == "row_break":
        return _row_break(model, name, family, ids, types, processor, image_sizes)
    if family.layout == "tiles":
        return _tiles(model, name, family, ids, types, processor, image_sizes)
    if family.layout == "low_high":
        return _low_high(model, name, family, ids, types, inputs, processor, image_sizes)
    if family.layout == "canvas":
        return _canvas(model, name, family, ids, types, processor, image_sizes)
    return _anyres(model, name, family, ids, types, inputs, processor, image_sizes)
