"""Three lenses with one interface: LatentLens (contextual bank), LogitLens, EmbeddingLens."""

from __future__ import annotations

from latentlens.lenses.base import Lens, Prediction
from latentlens.lenses.embedding import EmbeddingLens, special_token_ids, untrained_rows
from latentlens.lenses.latent import LatentLens
from latentlens.lenses.logit import LogitLens

__all__ = [
    "EmbeddingLens",
    "LatentLens",
    "Lens",
    "LogitLens",
    "Prediction",
    "special_token_ids",
    "untrained_rows",
]
