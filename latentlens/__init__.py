"""latentlens: read the hidden states of (vision-)language models through contextual banks."""

from __future__ import annotations

__version__ = "0.1.0"

from latentlens.errors import (
    BankFormatError,
    BankNotFoundError,
    CorpusError,
    DimensionMismatchError,
    InvalidQueryError,
    LatentLensError,
    LayerNotFoundError,
    UnsupportedArchitectureError,
)
from latentlens.corpus import load_corpus
from latentlens.extract import auto_layers, build_index
from latentlens.index import ContextualIndex, Neighbor
from latentlens.interpret import InterpretResult, interpret
from latentlens.lenses import EmbeddingLens, LatentLens, Lens, LogitLens, Prediction
from latentlens.models import MODEL_DEFAULTS, SUPPORTED_MODELS, get_hidden_states, load_model
from latentlens.sharded import DistributedIndex, MultiDeviceIndex

__all__ = [
    "BankFormatError",
    "BankNotFoundError",
    "ContextualIndex",
    "CorpusError",
    "DimensionMismatchError",
    "DistributedIndex",
    "EmbeddingLens",
    "InterpretResult",
    "InvalidQueryError",
    "LatentLens",
    "LatentLensError",
    "LayerNotFoundError",
    "Lens",
    "LogitLens",
    "MODEL_DEFAULTS",
    "MultiDeviceIndex",
    "Neighbor",
    "Prediction",
    "SUPPORTED_MODELS",
    "UnsupportedArchitectureError",
    "__version__",
    "auto_layers",
    "build_index",
    "get_hidden_states",
    "interpret",
    "load_corpus",
    "load_model",
]
