"""Candidate words for the judge, and readers for the three lenses' per-layer result files.

The files are those the original tools write (SPEC §8), one per query layer:

- LatentLens ``contextual_neighbors_visual{L}_allLayers.json``:
  ``results[] → chunks[] → patches[] → nearest_contextual_neighbors [{token_str, caption, …}]``
- LogitLens ``logit_lens_layer{L}_topk{k}_multi-gpu.json``:
  ``results[] → chunks[] → patches[] → top_predictions [{token, token_id, logit}]``
- EmbeddingLens ``nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{L}.json``:
  ``splits.validation.images[] → chunks[] → patches[] → nearest_neighbors [{token, similarity}]``

Every image record carries ``image_idx`` and every patch ``patch_row`` / ``patch_col``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["latentlens", "logitlens", "embeddinglens"]
METHODS: tuple[Method, ...] = ("latentlens", "logitlens", "embeddinglens")
TOP_K = 5  # the judge sees the top-5 of every lens

_NEIGHBOR_FIELD: dict[Method, str] = {
    "latentlens": "nearest_contextual_neighbors",
    "logitlens": "top_predictions",
    "embeddinglens": "nearest_neighbors",
}


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def expand_to_word(caption: str, token: str) -> str:
    """The whole word of ``caption`` that a (sub-word) token came from.

    The token is stripped and its first case-insensitive occurrence in the caption is
    found. A token without whitespace that touches a word character on either side is
    grown to the full run of word characters (letters, digits, ``_``) around it. The span
    is returned with the caption's casing. A token that does not occur is returned
    stripped, and an empty or whitespace-only token gives ``""``.

    Examples: ``("a rendering of it", "ing") → "rendering"``,
    ``("The Dog barks", " dog") → "Dog"``, ``("well-lit room", "lit") → "lit"``.
    """
    tok = token.strip() if token else ""
    if not tok:
        return ""
    if not caption:
        return tok
    # re.IGNORECASE keeps offsets into the caption itself (str.lower() can change lengths).
    m = re.search(re.escape(tok), caption, flags=re.IGNORECASE)
    if m is None:
        return tok
    start, end = m.span()
    if not any(ch.isspace() for ch in tok):
        touches = (start > 0 and _is_word_char(caption[start - 1])) or (
            end < len(caption) and _is_word_char(caption[end])
        )
        if touches:
            while start > 0 and _is_word_char(caption[start - 1]):
                start -= 1
            while end < len(caption) and _is_word_char(caption[end]):
                end += 1
    return caption[start:end]


def candidate_words(patch: Mapping[str, Any], method: Method, k: int = TOP_K) -> list[str]:
    """The top-``k`` words a lens gives one patch, in rank order, duplicates kept.

    LatentLens tokens are expanded to their whole word in their caption
    (:func:`expand_to_word`) and empty results dropped; LogitLens and EmbeddingLens tokens
    are used exactly as stored.
    """
    entries = patch.get(_NEIGHBOR_FIELD[method]) or []
    if method == "latentlens":
        words = (expand_to_word(e.get("caption", ""), e.get("token_str", "")) for e in entries[:k])
        return [w for w in words if w]
    return [str(e["token"]) for e in entries[:k]]


def detect_method(data: Mapping[str, Any]) -> Method:
    """Which lens wrote a result file, from its structure.

    Raises:
        ValueError: the structure is none of the three.
    """
    if "splits" in data:
        return "embeddinglens"
    for image in data.get("results") or []:
        for chunk in image.get("chunks") or []:
            for patch in chunk.get("patches") or []:
                if "nearest_contextual_neighbors" in patch:
                    return "latentlens"
                if "top_predictions" in patch:
                    return "logitlens"
                break
    raise ValueError(
        "not a lens result file: expected results[].chunks[].patches[] with "
        "nearest_contextual_neighbors or top_predictions, or splits.validation.images[]"
    )


@dataclass(frozen=True)
class LensImage:
    """One image of a lens result file.

    Attributes:
        image_idx: index of the image in the dataset (and in the images folder).
        caption: its ground-truth caption (may be empty).
        patches: ``(row, col) → patch record`` of the first chunk (the full image).
        grid: ``(H, W)`` of the patch grid, from the largest row and column present.
    """

    image_idx: int
    caption: str
    patches: dict[tuple[int, int], dict[str, Any]] = field(repr=False)
    grid: tuple[int, int]


@dataclass(frozen=True)
class LensLayer:
    """The contents of one lens result file (one query layer)."""

    method: Method
    layer: int
    images: list[LensImage]
    path: Path | None = None

    @property
    def grid_size(self) -> int:
        """Grid side as the original evaluator records it (``max(H, W)`` of the first image)."""
        return max(self.images[0].grid) if self.images else 0


def parse_lens_layer(data: Mapping[str, Any], layer: int, path: Path | None = None) -> LensLayer:
    """Read an already-loaded lens result file (see the module docstring for the formats)."""
    method = detect_method(data)
    if method == "embeddinglens":
        # The validation split (the paper's), else the first split that holds images.
        splits = data["splits"]
        named = [splits.get("validation", {})] + [v for k, v in splits.items() if k != "validation"]
        records: Sequence[Mapping[str, Any]] = next(
            (sp["images"] for sp in named if sp.get("images")), []
        )
    else:
        records = data["results"]
    images = []
    for rec in records:
        chunks = rec.get("chunks") or []
        patches = {}
        for p in (chunks[0].get("patches") or []) if chunks else []:
            patches[(int(p.get("patch_row", 0)), int(p.get("patch_col", 0)))] = p
        if not patches:
            continue
        grid = (max(r for r, _ in patches) + 1, max(c for _, c in patches) + 1)
        idx = rec.get("image_idx", rec.get("image_index", 0))
        images.append(LensImage(int(idx), str(rec.get("ground_truth_caption", "")), patches, grid))
    return LensLayer(method, layer, images, path)


_LAYER_IN_NAME = re.compile(r"(?:layer|visual)(\d+)(?!\d)")


def find_layer_files(results_dir: str | Path) -> dict[int, Path]:
    """``layer → file`` for the lens result files in a folder.

    A file belongs to layer L when its name holds ``layerL`` or ``visualL`` not followed by
    another digit (so ``layer2`` never matches ``layer24``); the first name in sorted order
    wins when several match.
    """
    found: dict[int, Path] = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        m = _LAYER_IN_NAME.search(f.name)
        if m is not None:
            found.setdefault(int(m.group(1)), f)
    return dict(sorted(found.items()))


def load_lens_layer(path: str | Path, layer: int | None = None) -> LensLayer:
    """Read one lens result file; the layer defaults to the number in its name."""
    path = Path(path)
    if layer is None:
        m = _LAYER_IN_NAME.search(path.name)
        if m is None:
            raise ValueError(f"cannot tell the layer of {path.name}; pass it explicitly")
        layer = int(m.group(1))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return parse_lens_layer(data, layer, path)
