"""latentlens: read the hidden states of (vision-)language models through contextual banks."""

from __future__ import annotations

__version__ = "0.1.0"

from latentlens.errors import (
    BankFormatError,
    CorpusError,
    DimensionMismatchError,
    InvalidQueryError,
    LatentLensError,
    LayerNotFoundError,
    UnsupportedArchitectureError,
)
from latentlens.index import ContextualIndex, Neighbor
from latentlens.interpret import InterpretResult, interpret
from latentlens.lenses import EmbeddingLens, LatentLens, Lens, LogitLens, Prediction

__all__ = [
    "BankFormatError",
    "ContextualIndex",
    "CorpusError",
    "DimensionMismatchError",
    "EmbeddingLens",
    "InterpretResult",
    "InvalidQueryError",
    "LatentLens",
    "LatentLensError",
    "LayerNotFoundError",
    "Lens",
    "LogitLens",
    "Neighbor",
    "Prediction",
    "UnsupportedArchitectureError",
    "__version__",
    "interpret",
]
