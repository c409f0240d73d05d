"""Per-architecture facts (module paths, config keys, norms) keyed by `config.model_type`.

This is the only place in latentlens that knows how a given Hugging Face architecture is
laid out. Everything else asks the helpers below (`get_blocks`, `get_final_norm`, ...).

Layer indexing
    A captured state is addressed by its Hugging Face `hidden_states` index: layer 0 is the
    input to block 0 exactly as HF reports it in `hidden_states[0]` (token embeddings after
    any embedding scaling, plus learned position embeddings for GPT-2, plus the merged
    vision features at the image positions of a VLM), and layer i (1 <= i <= n) is the
    output of block i-1, i.e. the residual stream after i blocks. Layer n (the output of
    the last block) is taken BEFORE the final norm. HF replaces `hidden_states[-1]` (= index n)
    with the normed `last_hidden_state` whenever `ArchSpec.last_hidden_is_normed` is true,
    which holds for every architecture registered here in transformers 5; so our layer n
    differs from HF's `hidden_states[n]` while all layers 0..n-1 are identical.

Paths
    `layers`, `final_norm`, `embed_tokens` and `position_embeddings` are dotted paths
    relative to the *text base model* (what `get_text_model` returns: `LlamaModel`,
    `GPT2Model`, `Qwen2VLTextModel`, ...). `text_model_path`, `inner_model_path` and
    `lm_head` are relative to the top-level model (`...ForCausalLM` or
    `...ForConditionalGeneration`). Config keys such as `num_layers_attr` are dotted
    attribute paths on `model.config`. A VLM entry names its `text_config_attr` and leaves
    the text-side facts empty: `get_arch` fills them in from the text sub-config's own
    entry (so LLaVA with a Mistral or Qwen2 backbone resolves correctly).

Add an architecture
    1. Build a tiny model from its config (see `tests/tiny.py`) and print
       `[n for n, _ in model.named_modules()]` to find the text base model, the blocks,
       the final norm and the embeddings.
    2. Write an `ArchSpec`; call `register_architecture("<config.model_type>", spec)`
       (or add it to `_BUILTIN` below).
    3. Check `last_hidden_is_normed`: is `hidden_states[-1]` equal to
       `final_norm(output of the last block)` in a full forward with
       `output_hidden_states=True`?
    4. Check layer 0: does `hidden_states[0]` equal `get_input_embeddings()(ids)`? If it
       is scaled (Gemma) record `embed_scale`; learned positions: `position_embeddings`.
    5. Note any logit post-processing (soft-capping, logit scale) by config key.
    6. Add the type to `TEXT_MODEL_TYPES` / `VLM_KINDS` in `tests/tiny.py`; the
       parametrized tests in `tests/test_models.py` then check all of the above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from latentlens.errors import UnsupportedArchitectureError
from latentlens.models.discovery import config_keys, discover
from latentlens.models.spec import TEXT_CONFIG_KEYS, TEXT_FIELDS, ArchSpec

logger = logging.getLogger(__name__)

# Every fact here was checked on transformers 5.23 with the tiny models of tests/tiny.py.
_LLAMA_LIKE = ArchSpec(
    layers="layers", final_norm="norm", embed_tokens="embed_tokens", last_hidden_is_normed=True
)
_QWEN_VL = ArchSpec(
    text_model_path="model.language_model",
    inner_model_path="model",
    text_config_attr="text_config",
    image_token_id_attr="image_token_id",
    is_vlm=True,
    visual_grid="grid_thw",
    merge_size_attr="vision_config.spatial_merge_size",
)

_BUILTIN: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="h",
        final_norm="ln_f",
        embed_tokens="wte",
        position_embeddings="wpe",
        last_hidden_is_normed=True,
        text_model_path="transformer",
        notes="hidden_states[0] = dropout(wte + wpe).",
    ),
    "llama": dataclasses.replace(_LLAMA_LIKE, notes="Llama 2 and 3 (3.x: rope_type llama3)."),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "olmo": dataclasses.replace(_LLAMA_LIKE, notes="OLMo 1: pre-norm, non-parametric LayerNorm."),
    "olmo2": dataclasses.replace(
        _LLAMA_LIKE,
        notes=(
            "OLMo 2: post-norm blocks with QK-norm. The paper's allenai/OLMo-7B-1024-preview "
            "is this class (its config first shipped as model_type 'olmo_1124', the pre-release "
            "name of olmo2; see MODEL_TYPE_ALIASES)."
        ),
    ),
    "gemma": dataclasses.replace(_LLAMA_LIKE, embed_scale="sqrt_hidden_size"),
    "gemma2": dataclasses.replace(
        _LLAMA_LIKE,
        embed_scale="sqrt_hidden_size",
        logit_softcapping_attr="final_logit_softcapping",
    ),
    "cohere": dataclasses.replace(_LLAMA_LIKE, logit_scale_attr="logit_scale"),
    # Text halves of the VLMs: bare `Qwen2VLTextModel` etc., reached through text_config.
    "qwen2_vl_text": dataclasses.replace(_LLAMA_LIKE, text_model_path=""),
    "qwen2_5_vl_text": dataclasses.replace(_LLAMA_LIKE, text_model_path=""),
    "qwen2_vl": dataclasses.replace(
        _QWEN_VL, notes="Qwen2-VL; M-RoPE positions come from model.model."
    ),
    "qwen2_5_vl": _QWEN_VL,
    "llava": ArchSpec(
        text_model_path="model.language_model",
        inner_model_path="model",
        text_config_attr="text_config",
        image_token_id_attr="image_token_index",
        is_vlm=True,
        visual_grid="square",
        notes="config.image_token_id is an alias of image_token_index.",
    ),
}

ARCHITECTURES: dict[str, ArchSpec] = dict(_BUILTIN)
"""The registry: `config.model_type` -> `ArchSpec`. Extend it with `register_architecture`."""

MODEL_TYPE_ALIASES: dict[str, str] = {"olmo_1124": "olmo2"}
"""Model types found in published configs that transformers knows under another name."""


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Add an architecture to the registry.

    Args:
        model_type: The `config.model_type` string the entry is for.
        spec: Its facts.
        overwrite: Replace an existing entry instead of raising.

    Raises:
        ValueError: `model_type` is already registered and `overwrite` is false.
        TypeError: `spec` is not an `ArchSpec`.
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    if model_type in ARCHITECTURES and not overwrite:
        raise ValueError(
            f"architecture {model_type!r} is already registered; pass overwrite=True to replace it"
        )
    ARCHITECTURES[model_type] = spec
    logger.debug("registered architecture %r", model_type)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(
            f"expected a Hugging Face model or config, got {type(model_or_config).__name__}"
        )
    return config


def get_config_attr(model_or_config: Any, path: str) -> Any:
    """Read a dotted attribute path such as "text_config.hidden_size" from a model's config."""
    obj = _config_of(model_or_config)
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {path!r})")
        obj = getattr(obj, part)
    return obj


def get_arch(model_or_config: Any) -> ArchSpec:
    """The architecture facts of a model or config: its registry entry, or discovered.

    Args:
        model_or_config: A Hugging Face model (anything with `.config`) or a config.

    Returns:
        The resolved `ArchSpec`. A registered entry wins. For a VLM the text-side fields
        come from the entry of its text sub-config, and config keys are prefixed (e.g.
        "text_config.hidden_size"). A model whose type (or text type) is not registered
        is described by `latentlens.models.discovery.discover` (module tree + one tiny
        forward, cached per model).

    Raises:
        UnsupportedArchitectureError: a config (not a model) of an unregistered type, or a
            model whose pieces discovery cannot find (the message names the piece).
    """
    config = _config_of(model_or_config)
    model_type = MODEL_TYPE_ALIASES.get(config.model_type, config.model_type)
    spec = ARCHITECTURES.get(model_type)
    is_model = isinstance(model_or_config, nn.Module)
    if spec is None:
        if is_model:
            return discover(model_or_config, None)
        raise UnsupportedArchitectureError(
            f"latentlens has no architecture entry for model_type {model_type!r} "
            f"({type(config).__name__}); pass the model itself and its layout is discovered "
            f"from its modules. Registered: {', '.join(sorted(ARCHITECTURES))}. To register "
            "it, describe it with latentlens.models.ArchSpec and add it with "
            f"latentlens.models.register_architecture({model_type!r}, spec); the checklist is "
            "in the docstring of latentlens.models.registry."
        )
    if spec.text_config_attr is None:
        return spec
    try:
        text_spec = get_arch(get_config_attr(config, spec.text_config_attr))
    except UnsupportedArchitectureError:
        if is_model:
            return discover(model_or_config, spec)
        raise
    prefix = spec.text_config_attr + "."
    filled: dict[str, Any] = {
        name: getattr(text_spec, name)
        for name in (*TEXT_FIELDS, "position_embeddings", "embed_scale")
        if getattr(spec, name) is None
    }
    for name in TEXT_CONFIG_KEYS:
        key = getattr(text_spec, name)
        filled[name] = None if key is None else prefix + key
    return dataclasses.replace(spec, **filled, text_config_attr=None)


def _config_key(model_or_config: Any, field: str) -> str:
    """A config-key field of the spec; for an unregistered bare config, found by probing."""
    try:
        key = getattr(get_arch(model_or_config), field)
    except UnsupportedArchitectureError:
        if isinstance(model_or_config, nn.Module):
            raise
        key = config_keys(_config_of(model_or_config)).get(field)
        if key is None:
            raise
    return key


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path such as "model.layers.3.mlp" ("" is `root` itself).

    Raises:
        AttributeError: A component of the path does not exist (the message names it).
    """
    module = root
    if not path:
        return module
    for part in path.split("."):
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if child is None:
            raise AttributeError(
                f"{type(module).__name__} has no submodule {part!r} (resolving {path!r} "
                f"from {type(root).__name__})"
            )
        module = child
    return module


def _suffixes(path: str) -> Iterator[str]:
    """Suffixes of a dotted path, longest first: a.b.c, b.c, c and the empty path."""
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        yield ".".join(parts[i:])


def _resolve(model: nn.Module, path: str, must_contain: str | None) -> nn.Module | None:
    for candidate in _suffixes(path):
        try:
            module = get_submodule(model, candidate)
            if must_contain is not None:
                get_submodule(module, must_contain)
        except AttributeError:
            continue
        return module
    return None


def get_text_model(model: nn.Module) -> nn.Module:
    """The text base model (e.g. `LlamaModel`, `GPT2Model`, `Qwen2VLTextModel`).

    Accepts the top-level model, a VLM's inner model or the text base model itself.

    Raises:
        UnsupportedArchitectureError: The architecture is not registered, or its layout
            does not match the registry entry.
    """
    spec = get_arch(model)
    assert spec.layers is not None
    text_model = _resolve(model, spec.text_model_path, must_contain=spec.layers)
    if text_model is None:
        raise UnsupportedArchitectureError(
            f"cannot find the text model of {type(model).__name__}: no {spec.layers!r} under "
            f"{spec.text_model_path!r}; the registry entry for {model.config.model_type!r} "
            "does not match this model"
        )
    return text_model


def get_forward_module(model: nn.Module) -> nn.Module:
    """The module to call for hidden states: no LM head, so no logits are computed.

    For a VLM this is the inner model (`model.model`), which places the vision features
    into the input embeddings and computes the positions (M-RoPE) before the text model;
    for a text model it is the text base model.
    """
    spec = get_arch(model)
    if spec.inner_model_path is None:
        return get_text_model(model)
    inner = _resolve(model, spec.inner_model_path, must_contain=None)
    assert inner is not None  # the empty suffix always resolves
    return inner


def num_layers(model_or_config: Any) -> int:
    """Number of decoder blocks of the (text) model; valid layers are 0..num_layers."""
    return int(get_config_attr(model_or_config, _config_key(model_or_config, "num_layers_attr")))


def hidden_size(model_or_config: Any) -> int:
    """Width d of the residual stream of the (text) model."""
    return int(get_config_attr(model_or_config, _config_key(model_or_config, "hidden_size_attr")))


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (`len == num_layers(model)`)."""
    spec = get_arch(model)
    assert spec.layers is not None
    blocks = get_submodule(get_text_model(model), spec.layers)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{spec.layers!r} of {type(model).__name__} is a {type(blocks).__name__}, "
            "not a ModuleList"
        )
    return blocks


def get_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (input of the LM head)."""
    spec = get_arch(model)
    assert spec.final_norm is not None
    if spec.final_norm == "":
        return nn.Identity()
    text_model = get_text_model(model)
    chain = [get_submodule(text_model, p) for p in spec.final_norm.split(",")]
    return chain[0] if len(chain) == 1 else nn.Sequential(*chain)


def get_input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding module (HF accessor). Calling it applies any `embed_scale`."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    if embeddings is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no input embeddings")
    return embeddings


def get_output_embeddings(model: nn.Module) -> nn.Module:
    """The unembedding (`lm_head`): hidden state `[..., d]` -> logits `[..., vocab]`.

    Raises:
        ValueError: `model` is a base model without a head (pass the `...ForCausalLM` /
            `...ForConditionalGeneration` model instead).
    """
    spec = get_arch(model)
    if spec.discovered:  # the module discovery verified against the model's logits
        with contextlib.suppress(AttributeError):
            return get_submodule(model, spec.lm_head)
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        try:
            head = get_submodule(model, spec.lm_head)
        except AttributeError:
            raise ValueError(
                f"{type(model).__name__} has no LM head; load the model with its head "
                "(AutoModelForCausalLM / AutoModelForImageTextToText)"
            ) from None
    return head


def embedding_scale(model_or_config: Any) -> float:
    """Factor between an embedding row and HF's `hidden_states[0]` (sqrt(d) for Gemma, else 1)."""
    spec = get_arch(model_or_config)
    if spec.embed_scale == "sqrt_hidden_size":
        return math.sqrt(hidden_size(model_or_config))
    return 1.0


def finalize_logits(model_or_config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Apply the architecture's logit scale and soft-cap, as its LM head model does.

    Args:
        model_or_config: The model (or config) the logits come from.
        logits: `lm_head(final_norm(h))`, shape `[..., vocab]`.

    Returns:
        The logits HF's `...ForCausalLM` would return, same shape.
    """
    spec = get_arch(model_or_config)
    if spec.logit_scale_attr is not None:
        scale = get_config_attr(model_or_config, spec.logit_scale_attr)
        if scale is not None:
            logits = logits * scale
    if spec.logit_divisor_attr is not None:
        divisor = get_config_attr(model_or_config, spec.logit_divisor_attr)
        if divisor:
            logits = logits / divisor
    if spec.logit_softcapping_attr is not None:
        cap = get_config_attr(model_or_config, spec.logit_softcapping_attr)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    return logits


def image_token_id(model_or_config: Any) -> int:
    """The id of the image placeholder token whose positions hold the visual tokens.

    Raises:
        ValueError: The model is not a VLM.
    """
    spec = get_arch(model_or_config)
    if spec.image_token_id_attr is None:
        raise ValueError(
            f"{_config_of(model_or_config).model_type!r} is not a vision-language model"
        )
    return int(get_config_attr(model_or_config, spec.image_token_id_attr))
