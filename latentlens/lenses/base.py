"""The ``Lens`` interface shared by LatentLens, LogitLens and EmbeddingLens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from latentlens.errors import DimensionMismatchError, InvalidQueryError
from latentlens.results import Neighbor

NestedPredictions = Any
"""``list[Neighbor]`` for one vector, ``list[list[Neighbor]]`` for ``[N, d]``, and so on."""


class Lens(ABC):
    """Reads hidden states ``[..., d]`` as ranked tokens.

    A lens is built once (it may precompute norms or masks over a vocabulary) and then
    applied to any number of hidden states. Subclasses implement :meth:`topk` (the tensor
    path for batch work) and :meth:`predict` (rows → :class:`Neighbor` lists); calling
    the lens handles any leading shape.

    Attributes:
        name: short name used in tables, JSON and plots ("latent", "logit", "embedding").
        score_name: what :attr:`Neighbor.similarity` means ("cosine" or "logit").
        top_k: predictions per vector unless a call asks for another number.
    """

    name: ClassVar[str]
    score_name: ClassVar[str]
    top_k: int

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width ``d`` of the hidden states this lens reads."""

    @abstractmethod
    def topk(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best tokens of each row, as tensors.

        Args:
            hidden: ``[N, d]`` hidden states (any float dtype and device).
            top_k: tokens per row (default :attr:`top_k`).

        Returns:
            ``scores [N, k]`` float32 and ``token_ids [N, k]`` int64 on the CPU, best first.
        """

    @abstractmethod
    def predict(self, hidden: torch.Tensor, top_k: int | None = None) -> list[list[Neighbor]]:
        """:class:`Neighbor` lists of each row of ``hidden`` ``[N, d]``, best first."""

    def __call__(self, hidden: torch.Tensor, top_k: int | None = None) -> NestedPredictions:
        """Predictions of every vector of ``hidden`` ``[..., d]``.

        All vectors are processed in one batch; the result is nested like the leading
        dimensions: ``[d]`` gives ``list[Neighbor]``, ``[N, d]`` a list of those,
        ``[B, T, d]`` a list of lists of those.
        """
        flat = self._flatten(hidden)
        preds = self.predict(flat, top_k)
        return _nest(preds, tuple(hidden.shape[:-1]))

    def _k(self, top_k: int | None) -> int:
        k = self.top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        return k

    def _flatten(self, hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor):
            hidden = torch.as_tensor(hidden)
        if hidden.ndim == 0:
            raise InvalidQueryError("a hidden state must have at least one dimension [d]")
        if hidden.shape[-1] != self.hidden_size:
            raise DimensionMismatchError(
                f"hidden states have width {hidden.shape[-1]}, the {self.name} lens reads "
                f"width {self.hidden_size}"
            )
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] == 0:
            raise InvalidQueryError(f"no vectors given (shape {tuple(hidden.shape)})")
        return flat

    def __repr__(self) -> str:
        return f"{type(self).__name__}(top_k={self.top_k}, hidden_size={self.hidden_size})"


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """Regroup a flat list of ``prod(shape)`` items into nested lists of ``shape``."""
    if not shape:
        return flat[0]
    items = flat
    for size in reversed(shape[1:]):
        items = [items[i : i + size] for i in range(0, len(items), size)]
    return items


class TokenDecoder:
    """Caches ``tokenizer.decode([id])``; ids the tokenizer cannot decode become ''."""

    def __init__(self, tokenizer: Any) -> None:  # noqa: D107
        self.tokenizer = as_tokenizer(tokenizer)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:  # noqa: D102
        s = self._cache.get(token_id)
        if s is None:
            try:
                s = self.tokenizer.decode([token_id])
            except (IndexError, KeyError, ValueError, OverflowError, TypeError):
                s = ""
            s = s if isinstance(s, str) else ""
            self._cache[token_id] = s
        return s


def as_tokenizer(tokenizer_or_processor: Any) -> Any:
    """The tokenizer itself, or the ``.tokenizer`` of a multimodal processor."""
    if tokenizer_or_processor is None:
        raise ValueError("a tokenizer (or processor) is needed to decode token ids")
    inner = getattr(tokenizer_or_processor, "tokenizer", None)
    if inner is not None and not hasattr(tokenizer_or_processor, "convert_ids_to_tokens"):
        return inner
    return tokenizer_or_processor
