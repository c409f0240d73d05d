"""latentlens: read the hidden states of (vision-)language models through contextual banks.

Names are imported on first use (PEP 562), so ``import latentlens`` and the
``latentlens --help`` command do not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "load_corpus": "latentlens.corpus",
    "auto_layers": "latentlens.extract",
    "build_index": "latentlens.extract",
    "BuildConfig": "latentlens.extract",
    "ContextualIndex": "latentlens.index",
    "Neighbor": "latentlens.results",
    "InterpretResult": "latentlens.results",
    "ImageExplanation": "latentlens.results",
    "VideoExplanation": "latentlens.results",
    "explain_image": "latentlens.explain",
    "explain_video": "latentlens.explain",
    "layout_visual_tokens": "latentlens.visual_layout",
    "TokenAddress": "latentlens.visual_layout",
    "VisualLayout": "latentlens.visual_layout",
    "visual_token_states": "latentlens.vlm",
    "video_token_states": "latentlens.vlm",
    "load_frames": "latentlens.vlm",
    "interpret": "latentlens.interpretation",
    "EmbeddingLens": "latentlens.lenses",
    "LatentLens": "latentlens.lenses",
    "Lens": "latentlens.lenses",
    "LogitLens": "latentlens.lenses",
    "Prediction": "latentlens.results",
    "MODEL_DEFAULTS": "latentlens.models.defaults",
    "SUPPORTED_MODELS": "latentlens.models.defaults",
    "get_hidden_states": "latentlens.models.hooks",
    "load_model": "latentlens.models.loading",
    "DistributedIndex": "latentlens.sharded",
    "MultiDeviceIndex": "latentlens.sharded",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from latentlens.corpus import load_corpus
    from latentlens.extract import BuildConfig, auto_layers, build_index
    from latentlens.index import ContextualIndex
    from latentlens.interpretation import interpret
    from latentlens.lenses import EmbeddingLens, LatentLens, Lens, LogitLens
    from latentlens.models.defaults import MODEL_DEFAULTS, SUPPORTED_MODELS
    from latentlens.models.hooks import get_hidden_states
    from latentlens.models.loading import load_model
    from latentlens.results import ImageExplanation, InterpretResult, Neighbor, Prediction
    from latentlens.sharded import DistributedIndex, MultiDeviceIndex


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a submodule: latentlens.models, latentlens.search, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BankFormatError",
    "BankNotFoundError",
    "BuildConfig",
    "ContextualIndex",
    "CorpusError",
    "DimensionMismatchError",
    "DistributedIndex",
    "EmbeddingLens",
    "ImageExplanation",
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
