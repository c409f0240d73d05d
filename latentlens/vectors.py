"""Explain any vector by its nearest contexts: SAE features, steering vectors, probe weights.

`load_vectors` reads ``[n, d]`` directions from a ``.safetensors`` / ``.npy`` / ``.pt`` file
or from a sparse autoencoder saved in SAELens' artefact layout (``cfg.json`` +
``sae_weights.safetensors``, one decoder row ``W_dec[i]`` per feature; read directly, SAELens
is not needed). `ContextualIndex.explain_vectors` searches them in a bank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from latentlens.bank import safe_torch_load
from latentlens.errors import InvalidQueryError, LatentLensError
from latentlens.results import Neighbor, neighbor_line

SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_DECODER = "W_dec"


@dataclass
class Vectors:
    """Directions to explain.

    Attributes:
        vectors: ``[n, d]`` float32.
        names: one label per row (``feature 12``, ``vector 0``, …).
        source: where they came from (path, and the tensor or SAE read).
        config: the SAE's ``cfg.json`` when read from one.
    """

    vectors: torch.Tensor
    names: list[str]
    source: str
    config: dict[str, Any] = field(default_factory=dict)

    def select(self, indices: Sequence[int]) -> Vectors:
        """Only the rows ``indices`` (e.g. a few SAE features), names kept.

        Raises:
            InvalidQueryError: an index outside ``0..n-1``.
        """
        n = self.vectors.shape[0]
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise InvalidQueryError(f"indices {bad} outside the {n} vectors of {self.source}")
        idx = [i % n for i in indices]
        return Vectors(self.vectors[idx], [self.names[i] for i in idx], self.source, self.config)


def _as_matrix(x: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise LatentLensError(f"{where}: expected float vectors, got {t.dtype}")
    if t.ndim == 1:
        t = t[None]  # one steering vector
    if t.ndim != 2 or t.shape[0] == 0:
        raise LatentLensError(
            f"{where}: expected [d] or [n, d] vectors, got shape {tuple(t.shape)}"
        )
    t = t.to(torch.float32)
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        raise InvalidQueryError(f"{where}: vector {int(bad.nonzero()[0])} holds NaN or inf")
    return t


def _pick(tensors: dict[str, Any], key: str | None, where: str) -> tuple[str, Any]:
    if key is not None:
        if key not in tensors:
            raise LatentLensError(f"{where} has no tensor {key!r}; it holds {sorted(tensors)}")
        return key, tensors[key]
    if SAE_DECODER in tensors:
        return SAE_DECODER, tensors[SAE_DECODER]
    floats = [k for k, v in tensors.items() if torch.as_tensor(v).is_floating_point()]
    if len(floats) == 1:
        return floats[0], tensors[floats[0]]
    raise LatentLensError(f"{where} holds several tensors {sorted(tensors)}: choose one with --key")


def load_vectors(path: str | os.PathLike[str], key: str | None = None) -> Vectors:
    """Read directions ``[n, d]`` (a ``[d]`` vector counts as one).

    ``path``: a SAELens artefact folder (``cfg.json`` + ``sae_weights.safetensors``: the
    decoder rows ``W_dec``), a ``.safetensors`` file (``key``, else ``W_dec``, else its only
    float tensor), a ``.npy`` file (no pickles) or a ``.pt`` file (weights-only, bounded).

    Raises:
        LatentLensError: unreadable, ambiguous or non-float content; NaN/inf vectors.
    """
    p = Path(path)
    if p.is_dir():
        weights = p / SAE_WEIGHTS
        if not weights.is_file():
            raise LatentLensError(f"{p}: not an SAE folder (no {SAE_WEIGHTS})")
        cfg: dict[str, Any] = {}
        if (p / SAE_CONFIG).is_file():
            try:
                cfg = json.loads((p / SAE_CONFIG).read_text(encoding="utf-8"))
            except ValueError as e:
                raise LatentLensError(f"{p / SAE_CONFIG} is not valid JSON: {e}") from e
        got = load_vectors(weights, key or SAE_DECODER)
        d_in = cfg.get("d_in")
        if d_in is not None and int(d_in) != got.vectors.shape[1]:
            raise LatentLensError(
                f"{p}: W_dec is [{got.vectors.shape[0]}, {got.vectors.shape[1]}] but cfg.json "
                f"says d_in={d_in} (W_dec must be [d_sae, d_in])"
            )
        names = [f"feature {i}" for i in range(got.vectors.shape[0])]
        return Vectors(got.vectors, names, f"{p} (SAE decoder {got.source.split(':')[-1]})", cfg)
    if not p.is_file():
        raise LatentLensError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise LatentLensError(f"{p} is not a readable safetensors file: {e}") from e
        name, value = _pick(tensors, key, str(p))
    elif suffix == ".npy":
        try:
            value, name = np.load(p, allow_pickle=False), "array"
        except ValueError as e:
            raise LatentLensError(f"{p}: not a plain numeric .npy array ({e})") from e
    elif suffix in (".pt", ".pth", ".bin"):
        obj = safe_torch_load(p)
        if isinstance(obj, dict):
            name, value = _pick(obj, key, str(p))
        else:
            name, value = "tensor", obj
    else:
        raise LatentLensError(
            f"{p}: unknown vector file (expected .safetensors, .npy, .pt or an SAE folder)"
        )
    matrix = _as_matrix(value, f"{p}:{name}")
    return Vectors(matrix, [f"vector {i}" for i in range(matrix.shape[0])], f"{p}:{name}")


@dataclass
class VectorExplanation:
    """The nearest contexts of one vector.

    Attributes:
        name: its label (``feature 12``).
        index: its row in the vectors given.
        norm: its L2 norm (the search uses its direction).
        neighbors: best first; empty for a zero vector.
    """

    name: str
    index: int
    norm: float
    neighbors: list[Neighbor]

    def to_json(self) -> dict[str, Any]:
        """JSON-able: name, index, norm and each neighbour (with ``char_span``)."""
        return {
            "name": self.name,
            "index": self.index,
            "norm": self.norm,
            "neighbors": [n.to_json() for n in self.neighbors],
        }


def explanations_table(items: Sequence[VectorExplanation]) -> str:
    """A readable text table: each vector, then its contexts."""
    lines = []
    for it in items:
        lines.append(f"── {it.name} (norm {it.norm:.3g}) " + "─" * 40)
        lines += [f"    {neighbor_line(n, caption_width=80)}" for n in it.neighbors] or [
            "    (zero vector: no direction)"
        ]
    return "\n".join(lines)
