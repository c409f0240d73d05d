"""EmbeddingLens: nearest rows of the input embedding matrix by cosine similarity."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from latentlens.lenses.base import Lens, TokenDecoder, as_tokenizer
from latentlens.models.registry import get_input_embeddings
from latentlens.results import Neighbor
from latentlens.search import Precision, RowNorms, search_banks

logger = logging.getLogger(__name__)


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens.

    These are ``all_special_ids``, the pad id and every added token flagged ``special``
    (e.g. ``<|im_start|>``, ``<|image_pad|>``).
    """
    tok = as_tokenizer(tokenizer)
    ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None}
    pad = getattr(tok, "pad_token_id", None)
    if pad is not None:
        ids.add(int(pad))
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def untrained_rows(weight: torch.Tensor, chunk_elements: int = 2**22) -> torch.Tensor:
    """Rows that look never trained: all-zero rows and rows bit-identical to another row.

    The heuristic: an embedding row that gradient descent never touched keeps its
    initial value. Initialisations that leave a trace visible without the training data
    are zeros and a shared constant row (e.g. the mean of the other rows, a common choice
    when a vocabulary is resized); random initialisation leaves none, which is why rows
    past the tokenizer's vocabulary are excluded separately. Two trained rows are never
    bit-identical in practice.

    Duplicates are found in O(V·d): each row's bit pattern gets two integer hash keys
    (order-independent sums, so equal rows always share keys), and rows sharing keys are
    compared exactly.

    Args:
        weight: ``[V, d]`` embedding matrix (any float dtype and device).
        chunk_elements: bound on the elements of one hashed block (its int64 copies).

    Returns:
        ``[V]`` bool mask on the CPU.
    """
    v, d = weight.shape
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        weight.element_size()
    ]
    gen = torch.Generator().manual_seed(0)
    coef = torch.randint(1, 2**31 - 1, (d, 2), generator=gen, dtype=torch.int64)
    coef = coef.to(weight.device)
    chunk_rows = max(1, chunk_elements // max(d, 1))
    keys, zero = [], []
    for s in range(0, v, chunk_rows):
        block = weight[s : s + chunk_rows].detach()
        bits = block.contiguous().view(int_dtype).to(torch.int64)
        # Integer sums wrap around and are exact, so equal rows get equal keys.
        keys.append(torch.stack([(bits * coef[:, j]).sum(1) for j in range(2)], 1).cpu())
        zero.append((block == 0).all(dim=1).cpu())
    mask = torch.cat(zero) if zero else torch.zeros(0, dtype=torch.bool)
    if v < 2:
        return mask
    key = torch.cat(keys)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    candidates = (counts[inverse] > 1).nonzero().flatten()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in candidates.tolist():
        groups.setdefault((int(key[i, 0]), int(key[i, 1])), []).append(i)
    for members in groups.values():
        rows = weight[members].detach().cpu()
        _, inv, cnt = torch.unique(
            rows.view(int_dtype), dim=0, return_inverse=True, return_counts=True
        )
        dup = torch.tensor(members)[cnt[inv] > 1]
        mask[dup] = True
    return mask


class EmbeddingLens(Lens):
    """Input-embedding rows most similar (cosine) to a hidden state.

    The search is the project's exact engine (:func:`latentlens.search.search_banks`) over
    the embedding matrix as it is stored: no copy, no upcast. By default padding, special
    tokens, rows past the tokenizer's vocabulary and rows that look never trained (see
    :func:`untrained_rows`) are excluded; the original release searched every row, which
    ``original=True`` reproduces. Excluded rows at either end of the matrix are cut off
    with a view; excluded rows inside it are dropped from a top-``k + n`` search, so the
    result is exactly the top-k over the allowed rows.

    The raw embedding weight is searched even where the model scales its embeddings
    (Gemma's ``sqrt(d)``): cosine similarity ignores the scale.

    Args:
        model: the HF model (its ``get_input_embeddings().weight`` is searched).
        tokenizer: its tokenizer (or processor).
        top_k: tokens per hidden state.
        original: search every row, as the original release did.
        exclude_ids: more ids to exclude.
        exclude_untrained: apply the zero/duplicate-row heuristic.
        precision: search precision (see :func:`latentlens.search.search_banks`).

    Raises:
        ValueError: every row is excluded.
    """

    name: ClassVar[str] = "embedding"
    score_name: ClassVar[str] = "cosine"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        top_k: int = 5,
        *,
        original: bool = False,
        exclude_ids: Iterable[int] = (),
        exclude_untrained: bool = True,
        precision: Precision = "auto",
    ) -> None:
        """Compute the exclusion mask and the row norms once."""
        self.weight: torch.Tensor = get_input_embeddings(model).weight.detach()
        self.decode = TokenDecoder(tokenizer)
        self.top_k = self._k(top_k)
        self.precision: Precision = precision
        self.original = original
        v = int(self.weight.shape[0])
        excluded = torch.zeros(v, dtype=torch.bool)
        if not original:
            tok = as_tokenizer(tokenizer)
            ids = [i for i in special_token_ids(tok) | {int(x) for x in exclude_ids} if 0 <= i < v]
            excluded[ids] = True
            excluded[min(v, len(tok)) :] = True
            if exclude_untrained:
                excluded |= untrained_rows(self.weight)
        finite = torch.isfinite(self.weight).all(dim=1).to(excluded.device)
        if not bool(finite.all()):  # a NaN/inf row would poison every comparison
            logger.warning(
                "EmbeddingLens: %d non-finite embedding rows excluded", int((~finite).sum())
            )
            excluded |= ~finite
        if bool(excluded.all()):
            raise ValueError("EmbeddingLens: every embedding row is excluded")
        self.excluded = excluded
        allowed = (~excluded).nonzero().flatten()
        # Search the view between the first and last allowed row; drop the rest inside it.
        self._lo, self._hi = int(allowed[0]), int(allowed[-1]) + 1
        inner = excluded[self._lo : self._hi]
        self._inner_excluded = inner.to(self.weight.device)
        self._n_inner = int(inner.sum())
        self._rows = self.weight[self._lo : self._hi]
        if not bool(finite.all()):  # zeroed (and excluded): a copy only in this rare case
            self._rows = torch.nan_to_num(self._rows, nan=0.0, posinf=0.0, neginf=0.0)
        self._norms = RowNorms.of(self._rows)
        logger.debug(
            "EmbeddingLens: %d of %d rows excluded (%d inside the searched view)",
            int(excluded.sum()),
            v,
            self._n_inner,
        )

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the embedding rows."""
        return int(self.weight.shape[1])

    @property
    def excluded_ids(self) -> list[int]:
        """Ids never returned (empty with ``original=True``)."""
        return self.excluded.nonzero().flatten().tolist()

    @torch.inference_mode()
    def topk(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine similarities and token ids of each row of ``hidden`` ``[N, d]``.

        Returns:
            ``scores [N, k]`` float32 and ``token_ids [N, k]`` int64 on the CPU, best first
            (ties: lower id first).
        """
        flat = self._flatten(hidden)
        k = min(self._k(top_k), int((~self.excluded).sum()))
        hits = search_banks(
            flat, [self._rows], [self._norms], k + self._n_inner, precision=self.precision
        )
        scores, rows = hits.scores, hits.row
        dead = rows < 0  # zero queries: no cosine, NaN scores and id -1
        rows = rows.clamp_min(0)
        if self._n_inner:
            keep = ~self._inner_excluded[rows]  # [N, k + n]; at least k True per row
            order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices
            scores = scores.gather(1, order[:, :k])
            rows = rows.gather(1, order[:, :k])
            dead = dead[:, :k]
        ids = torch.where(dead, torch.full_like(rows, -1), rows + self._lo)
        return scores.to(torch.float32).cpu(), ids.cpu()

    def predict(self, hidden: torch.Tensor, top_k: int | None = None) -> list[list[Neighbor]]:
        """:class:`Neighbor` lists (score = cosine) of each row of ``hidden`` ``[N, d]``."""
        scores, ids = self.topk(hidden, top_k)
        return [
            [
                Neighbor(token_str=self.decode(t), similarity=s, token_id=t)
                for s, t in zip(row_s, row_i, strict=True)
                if t >= 0
            ]
            for row_s, row_i in zip(scores.tolist(), ids.tolist(), strict=True)
        ]
