"""Which hidden state is which patch, per VLM family, checked from the pixels.

(a) Paint over one token's pixel box in the original image: the visual token whose
layer-0 state moves most is the one the address names. (b) Neighbours from a bank equal a
brute force over the model's own state at the reported sequence position. (c) Separators
are located and kept out of the grid. (d) Videos: the frame is checked the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentlens.models.hooks import get_hidden_states
from latentlens.visual_layout import TokenAddress, VisualLayout, layout_visual_tokens
from tests.vlm_families import BUILDERS, Subject, build

FAMILIES = sorted(BUILDERS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def paint(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The image with the middle half of ``box`` painted a flat colour."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
    arr = np.array(image)
    arr[round(y0 + dy) : round(y1 - dy), round(x0 + dx) : round(x1 - dx)] = (255, 0, 255)
    return Image.fromarray(arr)


def encode(s: Subject, images: list[Image.Image]) -> dict:
    return dict(
        s.processor(
            text=[s.prompt(len(images))], images=images, return_tensors="pt", **(s.kwargs or {})
        )
    )


def layer0(s: Subject, inputs: dict, layout: VisualLayout) -> torch.Tensor:
    with torch.inference_mode():
        return get_hidden_states(s.model, layers=[0], **inputs)[0][0, layout.positions]


def check_most_moved(s: Subject, images: list[Image.Image], target: TokenAddress) -> None:
    inputs = encode(s, images)
    sizes = [im.size for im in images]
    layout = layout_visual_tokens(s.model, inputs, s.processor, image_sizes=sizes)
    before = layer0(s, inputs, layout)
    changed = list(images)
    changed[target.image_index] = paint(images[target.image_index], target.pixel_box)
    inputs2 = encode(s, changed)
    after = layer0(
        s, inputs2, layout_visual_tokens(s.model, inputs2, s.processor, image_sizes=sizes)
    )
    # among the tokens of the same grid (a region is seen by every crop that covers it)
    same = [
        i
        for i, t in enumerate(layout.tokens)
        if (t.image_index, t.crop, t.frame) == (target.image_index, target.crop, target.frame)
    ]
    moved = layout.tokens[same[int((after - before)[same].norm(dim=-1).argmax())]]
    assert moved == target, f"{s.family}: painting {target} moved {moved} most"


@pytest.mark.parametrize("family", FAMILIES)
def test_painting_a_tokens_pixels_moves_that_token_most(family: str):
    s = build(family)
    images = [noise(64, 48, 1), noise(40, 56, 2)]
    layout = layout_visual_tokens(
        s.model, encode(s, images), s.processor, image_sizes=[im.size for im in images]
    )
    assert {t.image_index for t in layout.tokens} == {0, 1}
    assert len({t.sequence_position for t in layout.tokens}) == len(layout.tokens)
    for g in layout.grids:  # every grid cell is addressed once
        cells = {(t.row, t.col) for t in layout.select(g.image_index, g.crop)}
        assert cells == {(r, c) for r in range(g.shape[0]) for c in range(g.shape[1])}
    picks = []
    for g in layout.grids:
        h, w = g.shape
        for r, c in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
            picks.append(layout.find(g.image_index, r, c, crop=g.crop))
    for target in picks:
        check_most_moved(s, images, target)
