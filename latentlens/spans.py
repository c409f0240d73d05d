"""Character spans of bank tokens in their captions: which occurrence a contextual row is.

A contextual embedding belongs to one occurrence of a token ("bank" in "… near the bank",
not the one in "the bank …"), so every view highlights the span, never the first
substring match. Spans come from the tokenizer's offsets (fast tokenizers), tokenized
exactly as the bank was built (special tokens included); special tokens and tokens
without offsets get ``(-1, -1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

NO_SPAN = (-1, -1)


def _trimmed(caption: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (byte-level BPE offsets may hold the space)."""
    while start < end and caption[start].isspace():
        start += 1
    while end > start and caption[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else NO_SPAN


def caption_offsets(
    tokenizer: Any, captions: Sequence[str], max_length: int = 512
) -> list[list[tuple[int, int]]] | None:
    """Per caption, the character span of each token, as the bank builder tokenizes it.

    Returns ``None`` when the tokenizer gives no offsets (a slow tokenizer).
    """
    try:
        out = tokenizer(
            list(captions),
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
        )
    except (NotImplementedError, TypeError, ValueError):
        return None
    offsets = out.get("offset_mapping") if hasattr(out, "get") else None
    if offsets is None:
        return None
    return [
        [_trimmed(c, int(s), int(e)) if e > s else NO_SPAN for s, e in offs]
        for c, offs in zip(captions, offsets, strict=True)
    ]


def entry_spans(
    tokenizer: Any,
    captions: Sequence[str],
    caption_id: torch.Tensor,
    position: torch.Tensor,
    max_length: int = 512,
) -> torch.Tensor | None:
    """``[M, 2]`` int64 character span of each entry (``caption_id``, ``position``) in its
    caption; ``None`` when the tokenizer gives no offsets."""
    offsets = caption_offsets(tokenizer, captions, max_length)
    if offsets is None:
        return None
    spans = []
    for c, p in zip(caption_id.tolist(), position.tolist(), strict=True):
        row = offsets[c]
        spans.append(row[p] if 0 <= p < len(row) else NO_SPAN)
    return torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
