"""Three lenses with one interface: LatentLens (contextual bank), LogitLens, EmbeddingLens."""

from __future__ import annotations

from latentlens.lenses.base import Lens
from latentlens.lenses.embedding import EmbeddingLens, special_token_ids, untrained_rows
from latentlens.lenses.latent import LatentLens
from latentlens.lenses.logit import LogitLens
from latentlens.results import Neighbor, Prediction

__all__ = [
    "EmbeddingLens",
    "LatentLens",
    "Lens",
    "LogitLens",
    "Neighbor",
    "Prediction",
    "special_token_ids",
    "untrained_rows",
]
