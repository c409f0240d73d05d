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

import re
from collections.abc import Mapping
from typing import Any

from reproduce.lens_files import NEIGHBOR_FIELD, Method

TOP_K = 5  # the judge sees the top-5 of every lens


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
    entries = patch.get(NEIGHBOR_FIELD[method]) or []
    if method == "latentlens":
        words = (expand_to_word(e.get("caption", ""), e.get("token_str", "")) for e in entries[:k])
        return [w for w in words if w]
    return [str(e["token"]) for e in entries[:k]]
