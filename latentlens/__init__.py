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

__all__ = [
    "BankFormatError",
    "ContextualIndex",
    "CorpusError",
    "DimensionMismatchError",
    "InvalidQueryError",
    "LatentLensError",
    "LayerNotFoundError",
    "Neighbor",
    "UnsupportedArchitectureError",
    "__version__",
]
