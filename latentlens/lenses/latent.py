"""LatentLens: nearest contextual text-token neighbours in a bank (SPEC §3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from latentlens.index import ContextualIndex
from latentlens.lenses.base import Lens
from latentlens.results import Neighbor
from latentlens.search import Precision


class LatentLens(Lens):
    """The contextual bank search as a lens.

    Every selected bank layer is searched and the global top-k kept by raw cosine
    (the paper's "allLayers"); each :class:`Neighbor` records the caption, position and
    ``contextual_layer`` of its neighbour. Queries are L2-normalised by the search.

    Args:
        index: the bank.
        top_k: neighbours per hidden state (the paper: 5).
        layers: bank layers to search (default: all the index holds).
        precision: search precision (see :meth:`ContextualIndex.search_tensors`).
        standardize: rank by cosine after z-scoring each dimension with the bank layer's
            mean and standard deviation (for LLMs with outlier dimensions, e.g. Gemma).
    """

    name: ClassVar[str] = "latent"
    score_name: ClassVar[str] = "cosine"

    def __init__(
        self,
        index: ContextualIndex,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
        standardize: bool = False,
    ) -> None:
        """Check the layers against the index (nothing is copied)."""
        self.index = index
        self.top_k = self._k(top_k)
        self.layers = index._selected(layers)  # validates; raises LayerNotFoundError
        self.precision: Precision = precision
        self.standardize = bool(standardize)

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the bank's rows."""
        return self.index.hidden_dim

    def search_tensors(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full search result of ``hidden`` ``[N, d]``: ``(scores, bank layer, entry)``.

        See :meth:`ContextualIndex.search_tensors`; all rows go in one call.
        """
        flat = self._flatten(hidden)
        # standardize= only when asked: other index types keep working with the lens
        extra = {"standardize": True} if self.standardize else {}
        return self.index.search_tensors(
            flat, self._k(top_k), self.layers, precision=self.precision, **extra
        )

    def topk(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine similarities and the token ids of the neighbours, ``[N, k]`` each."""
        scores, _, entry = self.search_tensors(hidden, top_k)
        return scores, self.index.entries.token_id[entry]

    def predict(self, hidden: torch.Tensor, top_k: int | None = None) -> list[list[Neighbor]]:
        """:class:`Neighbor` lists (cosine, with caption and bank layer) per row."""
        scores, layer, entry = self.search_tensors(hidden, top_k)
        return self.index.neighbors(scores, layer, entry)

    def __repr__(self) -> str:
        return f"LatentLens(top_k={self.top_k}, layers={self.layers}, index={self.index!r})"
