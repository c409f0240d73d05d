"""Model access: the architecture registry, hidden-state capture and loading."""

from __future__ import annotations

from latentlens.models.defaults import MODEL_DEFAULTS, SUPPORTED_MODELS
from latentlens.models.discovery import discover
from latentlens.models.hooks import capture, get_hidden_states, validate_layers
from latentlens.models.loading import (
    LoadedModel,
    default_cache_dir,
    load_config,
    load_model,
    load_processor,
    load_smollm2,
    smollm2_path,
)
from latentlens.models.registry import (
    ARCHITECTURES,
    MODEL_TYPE_ALIASES,
    ArchSpec,
    embedding_scale,
    finalize_logits,
    get_arch,
    get_blocks,
    get_config_attr,
    get_final_norm,
    get_forward_module,
    get_input_embeddings,
    get_output_embeddings,
    get_submodule,
    get_text_model,
    hidden_size,
    image_token_id,
    num_layers,
    register_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "MODEL_DEFAULTS",
    "SUPPORTED_MODELS",
    "discover",
    "MODEL_TYPE_ALIASES",
    "ArchSpec",
    "LoadedModel",
    "capture",
    "default_cache_dir",
    "embedding_scale",
    "finalize_logits",
    "get_arch",
    "get_blocks",
    "get_config_attr",
    "get_final_norm",
    "get_forward_module",
    "get_hidden_states",
    "get_input_embeddings",
    "get_output_embeddings",
    "get_submodule",
    "get_text_model",
    "hidden_size",
    "image_token_id",
    "load_config",
    "load_model",
    "load_processor",
    "load_smollm2",
    "num_layers",
    "register_architecture",
    "smollm2_path",
    "validate_layers",
]
