"""Capture residual-stream hidden states with forward hooks, stopping after the deepest layer."""

from __future__ import annotations

import inspect
import logging
import numbers
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import nn

from latentlens.errors import UnsupportedArchitectureError
from latentlens.models.registry import (
    get_blocks,
    get_forward_module,
    get_input_embeddings,
    hidden_size,
    num_layers,
)

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once every requested layer is stored.

    Private to this module's callers: `capture(stop_early=True)` and `get_hidden_states`
    catch it, so it never reaches user code.
    """


def validate_layers(layers: int | Iterable[int], n_layers: int) -> list[int]:
    """Check hidden-state indices and return them sorted without duplicates.

    Args:
        layers: One index or several (ints, numpy ints); each must lie in `[0, n_layers]`.
        n_layers: Number of blocks of the model.

    Returns:
        The sorted distinct indices.

    Raises:
        ValueError: `layers` is empty or holds a non-integer or out-of-range index.
    """
    items = list(layers) if isinstance(layers, Iterable) else [layers]
    if not items:
        raise ValueError("no layers requested")
    bad = [
        x
        for x in items
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x <= n_layers
    ]
    if bad:
        raise ValueError(
            f"invalid layer(s) {bad}: valid layers are integers 0..{n_layers} for this "
            f"{n_layers}-block model (0 = input embeddings, i = output of block i-1, "
            f"{n_layers} = output of the last block before the final norm)"
        )
    return sorted({int(x) for x in items})


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture(
    model: nn.Module, layers: int | Iterable[int], *, stop_early: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record hidden states of `layers` during the forward passes run inside the block.

    Layer 0 is recorded by a pre-hook on block 0 (its input, equal to HF's
    `hidden_states[0]`); layer i >= 1 by a hook on block i-1 (its output). Layer
    `num_layers` is the last block's output before the final norm. Tensors are stored as
    the model produced them (no copy, same device and dtype), shape `[batch, seq, d]`.

    With `stop_early=True` the hook of the deepest layer raises `StopForward`, so later
    blocks, the final norm and the LM head never run; the exception is swallowed when it
    leaves the `with` block, so make the forward call the last statement inside it.

    Args:
        model: A registered HF model (top-level, a VLM's inner model or the text model).
        layers: Hidden-state indices to record.
        stop_early: End the forward pass after the deepest requested layer.

    Yields:
        A dict `{layer: Tensor[batch, seq, d]}`, filled as the forward runs.

    Raises:
        ValueError: A layer is out of range.
    """
    wanted = validate_layers(layers, num_layers(model))
    deepest = wanted[-1]
    blocks = get_blocks(model)
    store: dict[int, torch.Tensor] = {}

    def record(layer: int, hidden: torch.Tensor) -> None:
        store[layer] = hidden
        if stop_early and layer == deepest:
            raise StopForward

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and isinstance(args[0], torch.Tensor):
            record(0, args[0])
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            record(0, kwargs["hidden_states"])
        else:  # a block whose first input has another name
            record(0, next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record(layer, _first(output))

        return hook

    handles = []
    try:
        if wanted[0] == 0:
            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in wanted:
            if layer > 0:
                handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
        try:
            yield store
        except StopForward:
            if not stop_early:
                raise
    finally:
        for handle in handles:
            handle.remove()


def _to_device(
    inputs: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Tensors moved to ``device``; pixel inputs also cast to the model's ``dtype`` (some
    processors return bf16 pixels that a fp32 vision tower would refuse, and vice versa)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and k.startswith("pixel_values") and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_finite(
    states: dict[int, torch.Tensor], attention_mask: torch.Tensor | None, model: nn.Module
) -> None:
    """Raise on NaN/inf at real (unmasked) positions, e.g. an fp16 overflow."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(next(iter(states.values())).device).bool()
    for layer, h in states.items():
        bad = ~torch.isfinite(h).all(dim=-1)  # [batch, seq]; no copy of the states
        if mask is not None and mask.shape == bad.shape:
            bad &= mask
        if bool(bad.any()):
            dtype = next((p.dtype for p in model.parameters()), None)
            hint = (
                " The model runs in float16, whose range some models overflow in early "
                "layers: load it in bfloat16 or float32."
                if dtype == torch.float16
                else ""
            )
            raise FloatingPointError(
                f"hidden state of layer {layer} holds NaN or inf values at real tokens.{hint}"
            )


@overload
def get_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: None = None,
    check_finite: bool = True,
    **inputs: Any,
) -> tuple[torch.Tensor, ...]: ...


@overload
def get_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: int | Iterable[int],
    check_finite: bool = True,
    **inputs: Any,
) -> dict[int, torch.Tensor]: ...


def get_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    check_finite: bool = True,
    **inputs: Any,
) -> tuple[torch.Tensor, ...] | dict[int, torch.Tensor]:
    """Hidden states of a forward pass, indexed like HF's `hidden_states` (0 = embeddings).

    Without `layers` (the original latentlens call) every layer 0..n comes back as a
    tuple, so `hidden_states[27].squeeze(0)` works as with HF. With `layers=` only those
    are captured, as a dict `{layer: tensor}`, and the forward stops after the deepest
    one: later blocks, the final norm and the LM head never run.

    The module called has no LM head (see `registry.get_forward_module`): the text base
    model for text models, the inner multimodal model for VLMs (which merges vision
    features into the embeddings and computes M-RoPE positions exactly as the full model
    does). It runs under `torch.inference_mode()` with `use_cache=False`.

    Layers 0..n-1 equal HF's `output_hidden_states=True` values exactly. Layer n (the last
    block's output) is taken before the final norm, whereas HF's `hidden_states[n]` is
    normed when `ArchSpec.last_hidden_is_normed` (most architectures).

    Args:
        model: a HF model (registered, or discovered from its modules).
        input_ids: `[batch, seq]` token ids (or pass `inputs_embeds=` in `inputs`).
        attention_mask: `[batch, seq]`, 1 = real token, 0 = padding.
        layers: hidden-state indices in `[0, num_layers(model)]`; default all.
        check_finite: raise `FloatingPointError` when a state holds NaN/inf at a real
            token (e.g. fp16 overflow; the message suggests bfloat16).
        **inputs: further model inputs, e.g. `pixel_values`, `image_grid_thw`,
            `mm_token_type_ids` for a VLM. Tensors are moved to the device of the input
            embeddings.

    Returns:
        A tuple of `n + 1` tensors `[batch, seq, d]` without `layers`, else
        `{layer: Tensor[batch, seq, d]}` in ascending layer order; in the model's dtype
        and on its device. They are inference tensors: combine them with the model's
        weights under `torch.inference_mode()` or `torch.no_grad()`, or `.clone()` them.

    Raises:
        TypeError: `input_ids` is not a tensor (layers go in `layers=`).
        ValueError: a layer is out of range, or `output_hidden_states` was passed.
        RuntimeError: the forward pass ended without reaching a requested layer.
        FloatingPointError: non-finite states (see `check_finite`).
    """
    if input_ids is not None and not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            "get_hidden_states(model, input_ids, attention_mask=None, *, layers=None): "
            f"input_ids must be a tensor, got {type(input_ids).__name__}; pass the layers "
            "to capture as layers=[...]"
        )
    if inputs.get("output_hidden_states"):
        raise ValueError(
            "get_hidden_states captures states itself; do not pass output_hidden_states"
        )
    inputs.pop("output_hidden_states", None)
    if input_ids is not None:
        inputs["input_ids"] = input_ids
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    n_layers = num_layers(model)
    wanted = validate_layers(range(n_layers + 1) if layers is None else layers, n_layers)
    runner = get_forward_module(model)
    weight = get_input_embeddings(model).weight
    inputs = _to_device(inputs, weight.device, weight.dtype)
    if _accepts(runner, "use_cache"):
        inputs["use_cache"] = False
    with torch.inference_mode(), capture(model, wanted, stop_early=True) as store:
        runner(**inputs)
    missing = [layer for layer in wanted if layer not in store]
    if missing:
        raise RuntimeError(
            f"the forward pass of {type(runner).__name__} never reached layers {missing}"
        )
    states = {layer: store[layer] for layer in wanted}
    d = hidden_size(model)
    for layer, h in states.items():
        if h.ndim != 3 or h.shape[-1] != d:
            raise UnsupportedArchitectureError(
                f"layer {layer} of {type(model).__name__} has shape {tuple(h.shape)}, not "
                f"[batch, seq, {d}]: its residual stream is not one d-wide vector per token "
                "(several parallel streams, as with hyper-connections?), which a contextual "
                "bank cannot hold"
            )
    if check_finite:
        _check_finite(states, inputs.get("attention_mask"), model)
    if layers is None:
        return tuple(states[layer] for layer in wanted)
    return states
