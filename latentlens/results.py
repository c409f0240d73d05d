"""Result types shared by every lens and face: one neighbour type, per-text and per-image results.

`Neighbor` is what any lens reads out of a hidden state (a contextual neighbour for
LatentLens, a vocabulary token for LogitLens / EmbeddingLens); `neighbor_line` is the one
text formatter of it. `InterpretResult` (a text, per layer and position) and
`ImageExplanation` (an image, per layer and patch) hold them. Figures and HTML live in
`latentlens.viz`, which reads these types; nothing here imports it at module level.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Neighbor:
    """One token a lens reads out of a hidden state (the original release's field names).

    Attributes:
        token_str: the decoded token (``tokenizer.decode([token_id])``).
        similarity: the lens score: cosine similarity (LatentLens, EmbeddingLens) or
            logit (LogitLens). Also available as :attr:`score`.
        caption: LatentLens: the sentence the contextual neighbour came from.
        position: LatentLens: the neighbour's index among its sentence's tokens.
        token_id: the vocabulary id (-1 when unknown).
        contextual_layer: LatentLens: the bank layer the neighbour was found in.
        char_span: LatentLens: ``(start, end)`` of this occurrence of the token in
            ``caption`` when the bank knows it (not in :meth:`to_dict`, which keeps the
            original's fields; see :meth:`to_json`).
        probability: LogitLens: the token's softmax probability over the whole vocabulary
            (not in :meth:`to_dict`; in :meth:`to_json`).
    """

    token_str: str
    similarity: float
    caption: str = ""
    position: int = -1
    token_id: int = -1
    contextual_layer: int = -1
    char_span: tuple[int, int] | None = field(default=None, compare=False)
    probability: float | None = field(default=None, compare=False)

    @property
    def score(self) -> float:
        """The lens score (same as :attr:`similarity`; a logit for LogitLens)."""
        return self.similarity

    @property
    def is_contextual(self) -> bool:
        """Whether this is a contextual-bank neighbour (it carries caption and bank layer)."""
        return self.contextual_layer >= 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the original release's field names."""
        d = asdict(self)
        del d["char_span"], d["probability"]
        return d

    def to_json(self) -> dict[str, Any]:
        """:meth:`to_dict` plus ``char_span`` when known (our JSON files and views)."""
        d = self.to_dict()
        if self.char_span is not None:
            d["char_span"] = list(self.char_span)
        if self.probability is not None:
            d["probability"] = self.probability
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Neighbor:
        """Inverse of :meth:`to_dict` (also reads ``score`` for ``similarity``)."""
        return cls(
            token_str=str(d["token_str"]),
            similarity=float(d["similarity"] if "similarity" in d else d["score"]),
            caption=str(d.get("caption", "")),
            position=int(d.get("position", -1)),
            token_id=int(d.get("token_id", -1)),
            contextual_layer=int(d.get("contextual_layer", -1)),
            char_span=tuple(d["char_span"]) if d.get("char_span") else None,  # type: ignore[arg-type]
            probability=float(d["probability"]) if d.get("probability") is not None else None,
        )


Prediction = Neighbor
"""The same type under the name the lenses used before (kept for existing code)."""


def neighbor_line(nb: Neighbor, *, caption_width: int = 90, score_format: str = "{:6.3f}") -> str:
    """The one text line of a neighbour: score, bank layer, token and caption.

    ``' 0.812  L16  ' dog'         a dog on the grass'`` for a contextual neighbour;
    ``' 0.812  ' dog''`` for a vocabulary token.
    """
    score = score_format.format(nb.similarity)
    if not nb.is_contextual:
        return f"{score}  {_show(nb.token_str)}"
    return (
        f"{score}  L{nb.contextual_layer:<3} {_show(nb.token_str):<14} "
        f"{_clip(nb.caption, caption_width)}"
    )


def neighbor_table(
    neighbors: Mapping[int, Sequence[Sequence[Neighbor]]], labels: Sequence[tuple[int, str]]
) -> str:
    """A text table per layer (ascending): each ``(token index, label)`` line, then that
    token's neighbours (the explanations' ``table()``)."""
    lines = []
    for layer in sorted(neighbors):
        lines.append(f"── layer {layer} " + "─" * 60)
        for token, label in labels:
            lines.append(label)
            lines += [
                f"{'':>5}" + neighbor_line(nb, caption_width=70) for nb in neighbors[layer][token]
            ]
    return "\n".join(lines)


def _show(s: str) -> str:
    """A token for display: quoted like repr, so spaces and newlines are visible."""
    return repr(s)


def _clip(s: str, n: int) -> str:
    s = s.replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass
class InterpretResult:
    """What each lens reads at each (layer, position) of one sequence.

    Attributes:
        tokens: decoded input token at each chosen position.
        token_ids: input token id at each chosen position.
        positions: the chosen positions (indices into the model's input sequence).
        layers: the hidden-state layers read (0 = embeddings, i = output of block i).
        predictions: ``{lens name: [layer][position][rank] Neighbor}``, aligned with
            :attr:`layers` and :attr:`positions`.
        score_names: ``{lens name: "logit" | "cosine"}``.
        text: the input text ('' when token ids were given).
        model_name: the model's name or path, if known.
    """

    tokens: list[str]
    token_ids: list[int]
    positions: list[int]
    layers: list[int]
    predictions: dict[str, list[list[list[Neighbor]]]]
    score_names: dict[str, str]
    text: str = ""
    model_name: str = ""
    lens_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def lenses(self) -> list[str]:
        """Names of the lenses run, in order."""
        return list(self.predictions)

    def get(self, lens: str, layer: int, position: int) -> list[Neighbor]:
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

    def _lens(self, lens: str) -> list[list[list[Neighbor]]]:
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
                        lines += [f"{'':>7}" + neighbor_line(p, caption_width=90) for p in row]
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
                    "predictions": [[[p.to_dict() for p in cell] for cell in row] for row in preds],
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
                    [[Neighbor.from_dict(p) for p in cell] for cell in row]
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


@dataclass
class ImageExplanation:
    """Nearest contextual neighbours of every visual token of one image, per query layer.

    Attributes:
        image: the image as the model saw it (after crop/resize).
        grid: ``(H, W)`` of the main patch grid.
        neighbors: ``{layer: [N lists of Neighbor]}``: the main grid's ``H·W`` first
            (patch index = r·W + c), then any other crop's tokens (see ``addresses``).
        patches: the highlighted patch indices (sampled or chosen).
        addresses: one address per visual token (sequence position, crop, row, col,
            pixel box in the original image), when the family's geometry is known.
        family: the VLM family (``config.model_type``).
        layout: the family's grids and separators (``VisualLayout.to_json()``).
        baselines: ``{"logitlens" | "embeddinglens": {layer: [N lists of Neighbor]}}``,
            the baseline lenses on the same states, when asked.
    """

    image: Image.Image
    grid: tuple[int, int]
    neighbors: dict[int, list[list[Neighbor]]]
    patches: list[int]
    top_k: int
    model_name: str = ""
    bank_name: str = ""
    bank_layers: list[int] = field(default_factory=list)
    image_name: str = ""
    addresses: list[Any] = field(default_factory=list)
    family: str = ""
    layout: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[int, list[list[Neighbor]]]] = field(default_factory=dict)
    image_path: str = ""

    @property
    def layers(self) -> list[int]:
        """Query layers, ascending."""
        return sorted(self.neighbors)

    def rc(self, patch: int) -> tuple[int, int]:
        """(row, col) of a patch index (in its crop's grid)."""
        if self.addresses:
            a = self.addresses[patch]
            return a.row, a.col
        return divmod(patch, self.grid[1])

    def table(self, patches: Sequence[int] | None = None) -> str:
        """A readable text table of the top neighbours of ``patches`` (default: highlighted)."""
        chosen = patches if patches is not None else self.patches
        labels = []
        for i, p in enumerate(chosen, 1):
            r, c = self.rc(p)
            labels.append((p, f"  #{i:<2} patch {p:>4} (row {r:>2}, col {c:>2})"))
        return neighbor_table(self.neighbors, labels)

    def to_dict(self, all_patches: bool = False) -> dict[str, Any]:
        """JSON-able results in the field names of the original release (SPEC §8), plus each
        token's ``sequence_position``, ``image_index``, ``frame``, ``crop`` and
        ``pixel_box`` ``[x0, y0, x1, y1]`` in the original image when known."""
        n = len(next(iter(self.neighbors.values()))) if self.neighbors else 0
        chosen = range(n) if all_patches else self.patches
        return {
            "model": self.model_name,
            "bank": self.bank_name,
            "image": self.image_name,
            **({"image_path": self.image_path} if self.image_path else {}),
            "family": self.family,
            "grid": list(self.grid),
            **({"grids": self.layout.get("grids", [])} if self.layout else {}),
            **({"separators": self.layout.get("separators", [])} if self.layout else {}),
            "top_k": self.top_k,
            "contextual_layers_used": self.bank_layers,
            "highlighted_patches": self.patches,
            "layers": {
                str(layer): {
                    "visual_layer": layer,
                    "patches": [
                        {
                            **patch_entry(
                                p,
                                self.rc(p),
                                self.addresses[p] if self.addresses else None,
                                self.neighbors[layer][p],
                            ),
                            **baseline_fields(self.baselines, layer, p),
                        }
                        for p in chosen
                    ],
                }
                for layer in self.layers
            },
        }


def patch_entry(
    index: int, rc: tuple[int, int], address: Any, neighbors: Sequence[Neighbor]
) -> dict[str, Any]:
    """One visual token in the JSON: the original's fields, then its address when known."""
    return {
        "patch_idx": index,
        "patch_row": rc[0],
        "patch_col": rc[1],
        **(address_fields(address) if address is not None else {}),
        "nearest_contextual_neighbors": [n.to_json() for n in neighbors],
    }


def baseline_fields(
    baselines: Mapping[str, Mapping[int, list[list[Neighbor]]]], layer: int, patch: int
) -> dict[str, Any]:
    """The baseline lenses' predictions of one patch, in the original files' field names
    (LogitLens ``top_predictions``: token, token_id, logit, and ours: probability; EmbeddingLens
    ``nearest_neighbors``: token, token_id, similarity)."""
    out: dict[str, Any] = {}
    if "logitlens" in baselines:
        out["top_predictions"] = [
            {
                "token": n.token_str,
                "token_id": n.token_id,
                "logit": n.similarity,
                **({"probability": n.probability} if n.probability is not None else {}),
            }
            for n in baselines["logitlens"][layer][patch]
        ]
    if "embeddinglens" in baselines:
        out["nearest_neighbors"] = [
            {"token": n.token_str, "token_id": n.token_id, "similarity": n.similarity}
            for n in baselines["embeddinglens"][layer][patch]
        ]
    return out


def address_fields(a: Any) -> dict[str, Any]:
    """The JSON fields of a visual token's address (``TokenAddress``)."""
    return {
        "sequence_position": a.sequence_position,
        "image_index": a.image_index,
        "frame": a.frame,
        "frames": list(a.frames) if a.frames else None,
        "crop": a.crop,
        "pixel_box": [round(float(x), 2) for x in a.pixel_box] if a.pixel_box else None,
    }


@dataclass
class VideoExplanation:
    """Nearest contextual neighbours of every visual token of one video, per query layer.

    Attributes:
        frames: the frames given to the model.
        addresses: one per visual token (temporal group, row, col, pixel box), in sequence
            order.
        neighbors: ``{layer: [N lists of Neighbor]}``, one list per address.
        patches: highlighted token indices (into ``addresses``).
        video_paths: where the frames came from (one video / folder, or frame images), so
            ``latentlens explore`` can show them again.
    """

    frames: list[Image.Image]
    addresses: list[Any]
    neighbors: dict[int, list[list[Neighbor]]]
    patches: list[int]
    top_k: int
    model_name: str = ""
    bank_name: str = ""
    bank_layers: list[int] = field(default_factory=list)
    family: str = ""
    layout: dict[str, Any] = field(default_factory=dict)
    video_name: str = ""
    video_paths: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        """Query layers, ascending."""
        return sorted(self.neighbors)

    @property
    def groups(self) -> list[int]:
        """The first frame of each temporal group, in order."""
        return sorted({a.frame for a in self.addresses})

    def table(self, patches: Sequence[int] | None = None) -> str:
        """A readable text table of the top neighbours of ``patches`` (default: highlighted)."""
        chosen = patches if patches is not None else self.patches
        labels = []
        for i, p in enumerate(chosen, 1):
            a = self.addresses[p]
            labels.append(
                (
                    p,
                    f"  #{i:<2} frames {a.frames[0]}-{a.frames[1]} (row {a.row:>2}, col {a.col:>2})",
                )
            )
        return neighbor_table(self.neighbors, labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able results: every visual token with its address and neighbours per layer."""
        return {
            "model": self.model_name,
            "bank": self.bank_name,
            "video": self.video_name,
            **({"video_paths": self.video_paths} if self.video_paths else {}),
            "family": self.family,
            "num_frames": len(self.frames),
            "grids": self.layout.get("grids", []),
            "separators": self.layout.get("separators", []),
            "top_k": self.top_k,
            "contextual_layers_used": self.bank_layers,
            "highlighted_patches": self.patches,
            "layers": {
                str(layer): {
                    "visual_layer": layer,
                    "patches": [
                        patch_entry(p, (a.row, a.col), a, self.neighbors[layer][p])
                        for p, a in enumerate(self.addresses)
                    ],
                }
                for layer in self.layers
            },
        }
