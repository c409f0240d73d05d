"""Run several lenses on the hidden states of one forward pass: ``interpret`` and its result."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from latentlens.index import ContextualIndex
from latentlens.lenses.base import Lens, Prediction, TokenDecoder, as_tokenizer
from latentlens.models.hooks import get_hidden_states, validate_layers
from latentlens.models.registry import num_layers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

LensName = Literal["latent", "logit", "embedding"]
LENS_NAMES: tuple[str, ...] = ("latent", "logit", "embedding")


@dataclass
class InterpretResult:
    """What each lens reads at each (layer, position) of one sequence.

    Attributes:
        tokens: decoded input token at each chosen position.
        token_ids: input token id at each chosen position.
        positions: the chosen positions (indices into the model's input sequence).
        layers: the hidden-state layers read (0 = embeddings, i = output of block i).
        predictions: ``{lens name: [layer][position][rank] Prediction}``, aligned with
            :attr:`layers` and :attr:`positions`.
        score_names: ``{lens name: "logit" | "cosine"}``.
        text: the input text ('' when token ids were given).
        model_name: the model's name or path, if known.
    """

    tokens: list[str]
    token_ids: list[int]
    positions: list[int]
    layers: list[int]
    predictions: dict[str, list[list[list[Prediction]]]]
    score_names: dict[str, str]
    text: str = ""
    model_name: str = ""
    lens_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def lenses(self) -> list[str]:
        """Names of the lenses run, in order."""
        return list(self.predictions)

    def get(self, lens: str, layer: int, position: int) -> list[Prediction]:
        """Predictions of ``lens`` at one ``layer`` and input ``position``, best first.

        Raises:
            KeyError: the lens, layer or position was not part of the run.
        """
        preds = self._lens(lens)
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not read; layers: {self.layers}")
        if position not in self.positions:
            raise KeyError(f"position {position} was not read; positions: {self.positions}")
        return preds[self.layers.index(layer)][self.positions.index(position)]

    def top_tokens(self, lens: str) -> list[list[str]]:
        """Top-1 token string per ``[layer][position]``."""
        return [[p[0].token_str if p else "" for p in row] for row in self._lens(lens)]

    def top_scores(self, lens: str) -> torch.Tensor:
        """Top-1 score per ``[layer, position]``, float32 (NaN where nothing was found)."""
        return torch.tensor(
            [[p[0].score if p else float("nan") for p in row] for row in self._lens(lens)],
            dtype=torch.float32,
        )

    def _lens(self, lens: str) -> list[list[list[Prediction]]]:
        if lens not in self.predictions:
            raise KeyError(f"lens {lens!r} was not run; lenses: {self.lenses}")
        return self.predictions[lens]

    # ── output ────────────────────────────────────────────────────────────────────────

    def table(self, lenses: Sequence[str] | None = None, top_k: int | None = None) -> str:
        """A plain-text report: per lens and layer, each position's predictions.

        LatentLens neighbours get one line each with their bank layer and caption; the
        baselines list their tokens on one line per position.
        """
        lines: list[str] = []
        width = max((len(_show(t)) for t in self.tokens), default=4)
        width = min(max(width, 5), 24)
        for name in lenses or self.lenses:
            preds = self._lens(name)
            fmt = "{:.2f}" if self.score_names.get(name) == "logit" else "{:.3f}"
            head = f"== {name} lens (score: {self.score_names.get(name, 'score')}) "
            lines.append(head + "=" * max(3, 78 - len(head)))
            for li, layer in enumerate(self.layers):
                lines.append(f"layer {layer}")
                for pi, pos in enumerate(self.positions):
                    row = preds[li][pi][:top_k]
                    label = f"  {pos:>4} {_show(self.tokens[pi]):<{width}}"
                    if row and row[0].is_contextual:
                        lines.append(label.rstrip())
                        for p in row:
                            lines.append(
                                f"{'':>8}{p.score:7.3f}  L{p.contextual_layer:<3} "
                                f"{_show(p.token_str):<14} {_clip(p.caption, 90)}"
                            )
                    else:
                        cells = "  ".join(
                            f"{_show(p.token_str)} {fmt.format(p.score)}" for p in row
                        )
                        lines.append(f"{label}  {cells}")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``lenses[name]["predictions"]`` is ``[layer][position][rank]``."""
        return {
            "text": self.text,
            "model": self.model_name,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "lenses": {
                name: {
                    "score": self.score_names.get(name, ""),
                    **({"info": self.lens_info[name]} if name in self.lens_info else {}),
                    "predictions": [
                        [[p.to_dict() for p in cell] for cell in row] for row in preds
                    ],
                }
                for name, preds in self.predictions.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InterpretResult:
        """Inverse of :meth:`to_dict`."""
        lenses = d.get("lenses", {})
        return cls(
            tokens=[str(t) for t in d["tokens"]],
            token_ids=[int(t) for t in d["token_ids"]],
            positions=[int(p) for p in d["positions"]],
            layers=[int(x) for x in d["layers"]],
            predictions={
                name: [
                    [[Prediction.from_dict(p) for p in cell] for cell in row]
                    for row in v["predictions"]
                ]
                for name, v in lenses.items()
            },
            score_names={name: str(v.get("score", "")) for name, v in lenses.items()},
            text=str(d.get("text", "")),
            model_name=str(d.get("model", "")),
            lens_info={name: dict(v["info"]) for name, v in lenses.items() if "info" in v},
        )

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int | None = 1) -> str:
        """The :meth:`to_dict` form as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def plot(self, path: str | os.PathLike[str] | None = None, lens: str | None = None) -> Figure:
        """Tokens × layers grid of the top word per cell, coloured by score.

        Args:
            path: save the figure here (format from the suffix, e.g. ``.png``).
            lens: one lens's grid; default: that lens if only one ran, else all side by side.

        Returns:
            The matplotlib ``Figure`` (not shown; no pyplot state is touched).
        """
        from latentlens.viz import compare_lenses, lens_grid

        if lens is None and len(self.lenses) > 1:
            fig = compare_lenses(self)
        else:
            fig = lens_grid(self, lens)
        if path is not None:
            fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
        return fig


def _show(s: str) -> str:
    """A token for display: quoted like repr, so spaces and newlines are visible."""
    return repr(s)


def _clip(s: str, n: int) -> str:
    s = s.replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


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
    from latentlens.lenses import EmbeddingLens, LatentLens, LogitLens

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
