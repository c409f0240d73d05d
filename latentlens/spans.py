"""Character spans of bank tokens in their captions: which occurrence a contextual row is.

A contextual embedding belongs to one occurrence of a token ("bank" in "… near the bank",
not the one in "the bank …"), so every view highlights the span, never the first
substring match. Spans come from the tokenizer's offsets (fast tokenizers), taken in the
same call that gives the bank builder its token ids and kept compactly (``[T, 2]`` int32
for the whole corpus); only the entries a bank keeps are trimmed of surrounding spaces.
Special tokens and tokens without offsets get ``(-1, -1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

NO_SPAN = (-1, -1)
_CHUNK = 8192  # sentences per tokenizer call: bounds the tokenizer's Python lists


@dataclass(frozen=True)
class TokenOffsets:
    """The raw character offsets of every token of a corpus.

    Attributes:
        flat: ``[T, 2]`` int32 ``(start, end)`` of every token, sentence after sentence.
        starts: ``[S + 1]`` int64 row of each sentence's first token in ``flat``.
    """

    flat: torch.Tensor
    starts: torch.Tensor

    def spans(
        self, sentences: Sequence[str], caption_id: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """``[M, 2]`` int64 span of each entry (``caption_id``, ``position``) in its sentence,
        without surrounding whitespace; ``-1`` for special tokens and out-of-range entries."""
        first, last = self.starts[caption_id], self.starts[caption_id + 1]
        row = first + position
        inside = (position >= 0) & (row < last)
        raw = self.flat[row.clamp(max=max(len(self.flat) - 1, 0))].tolist()
        out = []
        for c, ok, (a, b) in zip(caption_id.tolist(), inside.tolist(), raw, strict=True):
            out.append(_trimmed(sentences[c], a, b) if ok and b > a else NO_SPAN)
        return torch.tensor(out, dtype=torch.int64).reshape(-1, 2)


def _trimmed(caption: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (byte-level BPE offsets may hold the space)."""
    while start < end and caption[start].isspace():
        start += 1
    while end > start and caption[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else NO_SPAN


def tokenize_with_spans(
    tokenizer: Any, sentences: Sequence[str], max_length: int, *, spans: bool = True
) -> tuple[list[list[int]], TokenOffsets | None]:
    """Token ids of each sentence as the bank builder takes them (the tokenizer's own
    special tokens, e.g. BOS; truncated to ``max_length``) and, when ``spans``, every
    token's character offsets (``None`` when the tokenizer gives none: a slow tokenizer)."""
    kwargs: dict[str, Any] = dict(add_special_tokens=True, truncation=True, max_length=max_length)
    ids: list[list[int]] = []
    chunks: list[torch.Tensor] | None = [] if spans else None
    for i in range(0, len(sentences), _CHUNK):
        part = list(sentences[i : i + _CHUNK])
        out = None
        if chunks is not None:
            try:
                out = tokenizer(part, return_offsets_mapping=True, **kwargs)
            except (NotImplementedError, TypeError, ValueError):
                chunks = None
        if out is None:
            out = tokenizer(part, **kwargs)
        ids.extend(list(x) for x in out["input_ids"])
        offsets = out.get("offset_mapping") if hasattr(out, "get") else None
        if chunks is not None and offsets is None:
            chunks = None
        if chunks is not None:
            pairs = [pair for offs in offsets for pair in offs]
            chunks.append(torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2))
    if chunks is None:
        return ids, None
    lengths = torch.tensor([0] + [len(x) for x in ids], dtype=torch.int64)
    flat = torch.cat(chunks) if chunks else torch.empty(0, 2, dtype=torch.int32)
    return ids, TokenOffsets(flat, lengths.cumsum(0))


def entry_spans(
    tokenizer: Any,
    captions: Sequence[str],
    caption_id: torch.Tensor,
    position: torch.Tensor,
    max_length: int = 512,
) -> torch.Tensor | None:
    """``[M, 2]`` spans of a bank's entries, its captions tokenized again as the build did
    (for banks saved without spans); ``None`` when the tokenizer gives no offsets."""
    _ids, offsets = tokenize_with_spans(tokenizer, captions, max_length)
    return offsets.spans(captions, caption_id, position) if offsets is not None else None
