"""Molmo-style connector VLMs of the LatentLens paper (3 LLMs × 3 vision encoders).

Slim re-implementation on Hugging Face building blocks (`CLIPVisionModel`,
`Dinov2Model`, `SiglipVisionModel`, `AutoModelForCausalLM`) plus the released connector
weights, for analysis only::

    import molmo
    model = molmo.load("olmo-vit", device="cuda")          # fp16 on CUDA by default
    states = model.visual_hidden_states(["cat.jpg"], layers=[0, 8, 16])  # {L: [B, 24, 24, d]}
    print(model.generate("cat.jpg"))

`MODELS` holds the nine models' names, Hub ids and dimensions. Lens runs over many images
and their files (the original release's JSON) live in the paper's pipeline,
`reproduce/lens_files.py`.
"""

from __future__ import annotations

from molmo.checkpoint import (
    KEY_MAP,
    CheckpointError,
    convert_to_safetensors,
    download_connector,
    read_checkpoint,
)
from molmo.config import (
    MODELS,
    LLMConfig,
    MolmoConfig,
    VisionConfig,
    default_query_layers,
    get_config,
    resolve_name,
)
from molmo.connector import Connector
from molmo.model import MolmoModel, VisualStates, load
from molmo.processing import ImageProcessor, ProcessedImages, load_image
from molmo.vision import VisionEncoder

__all__ = [
    "KEY_MAP",
    "MODELS",
    "CheckpointError",
    "Connector",
    "ImageProcessor",
    "LLMConfig",
    "MolmoConfig",
    "MolmoModel",
    "ProcessedImages",
    "VisionConfig",
    "VisionEncoder",
    "VisualStates",
    "convert_to_safetensors",
    "default_query_layers",
    "download_connector",
    "get_config",
    "load",
    "load_image",
    "read_checkpoint",
    "resolve_name",
]
