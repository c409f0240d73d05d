"""Which (sentence, position) pairs enter a bank: prefix dedup, per-token caps, reservoir.

Selection depends only on token ids, never on hidden states, so it is decided once for the
whole corpus before any forward pass: every layer holds the same entries, sentences
without a kept position are never run, and a resumed build re-derives the same plan.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Sampling = Literal["first", "reservoir"]


@dataclass(frozen=True)
class Plan:
    """The entries of a bank, in slot order.

    Attributes:
        sentence: corpus index of each entry's sentence.
        position: index of the entry's token among its sentence's tokens.
        token_id: the token's vocabulary id.
    """

    sentence: list[int]
    position: list[int]
    token_id: list[int]

    def __len__(self) -> int:
        return len(self.sentence)

    def by_sentence(self) -> dict[int, list[tuple[int, int]]]:
        """``{sentence: [(position, slot), ...]}`` for the sentences that hold entries."""
        out: dict[int, list[tuple[int, int]]] = {}
        for slot, (s, p) in enumerate(zip(self.sentence, self.position, strict=True)):
            out.setdefault(s, []).append((p, slot))
        return out


def plan_entries(
    token_ids: Sequence[Sequence[int]],
    token_str: Callable[[int], str],
    *,
    cap: int | None,
    sampling: Sampling = "first",
    skip_first: int = 2,
    dedup: bool = True,
    seed: int = 42,
) -> Plan:
    """Choose the bank's entries, walking the corpus in order.

    Args:
        token_ids: per sentence, its token ids (BOS included when the tokenizer adds one).
        token_str: decoded string of one token id; caps count per string.
        cap: most entries per token string (``None``: no cap).
        sampling: ``"first"`` keeps the first ``cap`` occurrences (library mode);
            ``"reservoir"`` keeps a uniform sample of ``cap`` by Algorithm R (paper mode:
            count every occurrence; while fewer than ``cap`` are kept, keep; else draw
            ``j`` uniformly in ``[0, count-1]`` and replace slot ``j`` when ``j < cap``).
        skip_first: positions ``0 .. skip_first-1`` of each sentence are never kept.
        dedup: skip a token whose prefix (ids ``0..i``) was already stored — its hidden
            state would be identical. Checked before the cap; recorded only when stored.
        seed: seeds the reservoir's RNG once.

    Returns:
        The :class:`Plan` (slots in the order they were first filled).
    """
    if cap is not None and cap < 1:
        raise ValueError(f"the per-token cap must be >= 1 or None, got {cap}")
    if sampling not in ("first", "reservoir"):
        raise ValueError(f"sampling must be 'first' or 'reservoir', got {sampling!r}")
    if sampling == "reservoir" and cap is None:
        raise ValueError("reservoir sampling needs a cap")
    rng = random.Random(seed)
    strings: dict[int, str] = {}
    seen: set[tuple[int, ...]] = set()
    count: dict[str, int] = {}  # occurrences seen (reservoir) or entries stored (first)
    slots: dict[str, list[int]] = {}  # token string -> its entry slots (reservoir)
    sent: list[int] = []
    pos: list[int] = []
    tid: list[int] = []
    for s, ids in enumerate(token_ids):
        for p in range(skip_first, len(ids)):
            t = int(ids[p])
            string = strings.get(t)
            if string is None:
                string = strings[t] = token_str(t)
            key: tuple[int, ...] = ()
            if dedup:
                key = tuple(ids[: p + 1])
                if key in seen:
                    continue
            n = count.get(string, 0)
            if sampling == "first":
                if cap is not None and n >= cap:
                    continue
                count[string] = n + 1
                sent.append(s)
                pos.append(p)
                tid.append(t)
            else:
                assert cap is not None
                count[string] = n + 1
                mine = slots.setdefault(string, [])
                if len(mine) < cap:
                    mine.append(len(sent))
                    sent.append(s)
                    pos.append(p)
                    tid.append(t)
                else:
                    j = rng.randint(0, n)  # n = count - 1 before this occurrence
                    if j >= cap:
                        continue
                    slot = mine[j]
                    sent[slot], pos[slot], tid[slot] = s, p, t
            if dedup:
                seen.add(key)
    return Plan(sentence=sent, position=pos, token_id=tid)
