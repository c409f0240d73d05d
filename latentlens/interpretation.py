"""Run several lenses on the hidden states of one forward pass: ``interpret`` and its result."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from latentlens.index import ContextualIndex
from latentlens.lenses import EmbeddingLens, LatentLens, LogitLens
from latentlens.lenses.base import Lens, TokenDecoder, as_tokenizer
from latentlens.models.hooks import get_hidden_states, validate_layers
from latentlens.models.registry import num_layers
from latentlens.results import InterpretResult

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

LensName = Literal["latent", "logit", "embedding"]
LENS_NAMES: tuple[str, ...] = ("latent", "logit", "embedding")


# ── running the lenses ────────────────────────────────────────────────────────────────


def _inputs_of(tokenizer: Any, text_or_inputs: Any) -> tuple[dict[str, Any], str]:
    """Model inputs with a batch of one, and the text if one was given."""
    if isinstance(text_or_inputs, str):
        tok = as_tokenizer(tokenizer)
        enc = tok(text_or_inputs, return_tensors="pt")
        return dict(enc), text_or_inputs
    if isinstance(text_or_inputs, Mapping):
        inputs = dict(text_or_inputs)
        if "input_ids" not in inputs:
            raise ValueError("inputs must contain 'input_ids'")
    else:
        inputs = {"input_ids": text_or_inputs}
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
        if "attention_mask" in inputs:
            inputs["attention_mask"] = torch.as_tensor(inputs["attention_mask"]).reshape(1, -1)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"interpret reads one sequence; got input_ids of shape {tuple(ids.shape)} "
            "(pass a batch of one)"
        )
    if ids.shape[1] == 0:
        raise ValueError("the input has no tokens")
    inputs["input_ids"] = ids
    return inputs, ""


def _choose_positions(positions: Sequence[int] | None, mask: torch.Tensor) -> list[int]:
    """Validated positions (negative ones count from the end); default: every real token."""
    n = int(mask.shape[0])
    if positions is None:
        return mask.nonzero().flatten().tolist()
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -n <= p < n:
            raise ValueError(f"position {p!r} is out of range for a sequence of {n} tokens")
        out.append(p % n)
    if not out:
        raise ValueError("no positions chosen")
    return out


def make_lens(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    top_k: int = 5,
    index: ContextualIndex | None = None,
    **kwargs: Any,
) -> Lens:
    """Build a lens by name ("latent", "logit" or "embedding").

    Raises:
        ValueError: an unknown name, or "latent" without an ``index``.
    """

    if name == "logit":
        return LogitLens(model, tokenizer, top_k, **kwargs)
    if name == "embedding":
        return EmbeddingLens(model, tokenizer, top_k, **kwargs)
    if name == "latent":
        if index is None:
            raise ValueError("the latent lens needs a contextual bank: pass index= (or --bank)")
        return LatentLens(index, top_k, **kwargs)
    raise ValueError(f"unknown lens {name!r}; choose from {', '.join(LENS_NAMES)}")


def interpret(
    model: nn.Module,
    tokenizer: Any,
    text_or_inputs: str | Mapping[str, Any] | torch.Tensor | Sequence[int],
    layers: int | Sequence[int] | None = None,
    lenses: Sequence[LensName | str | Lens] | str | Lens = ("logit", "embedding"),
    positions: int | Sequence[int] | None = None,
    *,
    top_k: int | None = None,
    index: ContextualIndex | None = None,
) -> InterpretResult:
    """Read one sequence's hidden states through several lenses.

    One forward pass captures every requested layer with hooks and stops after the
    deepest (see :func:`latentlens.models.get_hidden_states`); each lens then reads all
    chosen (layer, position) vectors in one batch.

    Args:
        model: a registered HF model with its LM head (needed by the logit lens).
        tokenizer: its tokenizer (or processor).
        text_or_inputs: a string (tokenised with the tokenizer's special tokens), a dict
            of model inputs with a batch of one (e.g. a processor's output, images
            included), or token ids ``[T]`` / ``[1, T]``.
        layers: hidden-state layers to read (0 = embeddings, i = output of block i, n =
            last block before the final norm); default all ``0..n``.
        lenses: lens objects, or names ("latent", "logit", "embedding") built here with
            ``top_k`` (build lens objects once when interpreting many inputs: the
            embedding lens scans the vocabulary on construction).
        positions: input positions to read (negative = from the end); default every
            token the attention mask keeps.
        top_k: predictions per vector (default: each lens's own ``top_k``; 5 for lenses
            built here).
        index: the contextual bank for a "latent" lens given by name.

    Returns:
        An :class:`InterpretResult`.

    Raises:
        ValueError: bad layers, positions, lens names or inputs.
    """
    n = num_layers(model)
    chosen_layers = validate_layers(range(n + 1) if layers is None else layers, n)
    if isinstance(lenses, (str, Lens)):
        lenses = [lenses]
    built: list[Lens] = []
    for lens in lenses:
        if isinstance(lens, Lens):
            built.append(lens)
        else:
            built.append(make_lens(str(lens), model, tokenizer, top_k or 5, index=index))
    names = [lens.name for lens in built]
    if not built:
        raise ValueError("no lenses given")
    if len(set(names)) != len(names):
        raise ValueError(f"each lens may appear once; got {names}")

    inputs, text = _inputs_of(tokenizer, text_or_inputs)
    ids = inputs["input_ids"][0]
    mask = inputs.get("attention_mask")
    keep = torch.as_tensor(mask)[0].bool() if mask is not None else torch.ones_like(ids).bool()
    chosen_pos = _choose_positions(positions, keep.cpu())
    states = get_hidden_states(model, layers=chosen_layers, **inputs)
    # [L, P, d]: every chosen (layer, position) vector, read by each lens in one batch.
    pos_index = torch.tensor(chosen_pos)
    vectors = torch.stack([states[x][0, pos_index.to(states[x].device)] for x in chosen_layers])

    decode = TokenDecoder(tokenizer)
    token_ids = [int(ids[p]) for p in chosen_pos]
    predictions, score_names, info = {}, {}, {}
    for lens in built:
        predictions[lens.name] = lens(vectors, top_k)
        score_names[lens.name] = lens.score_name
        lens_layers = getattr(lens, "layers", None)
        if lens_layers is not None:
            info[lens.name] = {"bank_layers": list(lens_layers)}
    return InterpretResult(
        tokens=[decode(t) for t in token_ids],
        token_ids=token_ids,
        positions=chosen_pos,
        layers=chosen_layers,
        predictions=predictions,
        score_names=score_names,
        text=text,
        model_name=str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        lens_info=info,
    )
