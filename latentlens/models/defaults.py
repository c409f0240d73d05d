"""Per-checkpoint defaults: the paper's three LLMs, and any you add.

`MODEL_DEFAULTS` (alias `SUPPORTED_MODELS`, the original release's name) maps a model
name as passed to `build_index` to `{"num_hidden_layers", "hidden_size",
"default_layers"}`. `build_index` uses an entry's `default_layers` when no `layers=` is
given; other models get `auto_layers(n)`. Add an entry by plain assignment:

    latentlens.SUPPORTED_MODELS["my-org/my-model"] = {
        "num_hidden_layers": 24, "hidden_size": 2048, "default_layers": [4, 12, 23]}
"""

from __future__ import annotations

from typing import Any

MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "allenai/OLMo-7B-1024-preview": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "default_layers": [1, 2, 4, 8, 16, 24, 30, 31],
    },
    "meta-llama/Meta-Llama-3-8B": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "default_layers": [1, 2, 4, 8, 16, 24, 30, 31],
    },
    "Qwen/Qwen2-7B": {
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "default_layers": [1, 2, 4, 8, 16, 24, 26, 27],
    },
}
SUPPORTED_MODELS = MODEL_DEFAULTS  # the original release's name; the same dict


def default_layers_for(model_name: str | None) -> list[int] | None:
    """The `default_layers` of a `MODEL_DEFAULTS` entry, or None when there is none.

    Raises:
        ValueError: the entry exists but its `default_layers` is not a list of ints.
    """
    if not model_name or model_name not in MODEL_DEFAULTS:
        return None
    layers = MODEL_DEFAULTS[model_name].get("default_layers")
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in layers
    ):
        raise ValueError(
            f"MODEL_DEFAULTS[{model_name!r}]['default_layers'] must be a list of ints, "
            f"got {layers!r}"
        )
    return [int(x) for x in layers]
