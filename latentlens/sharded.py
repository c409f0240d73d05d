"""Banks split by row ranges: across torch.distributed ranks, or across devices in one process.

Each shard holds a contiguous slice of every layer's rows (read from the bank directory
without touching the other rows), searches it with the same engine as
:class:`~latentlens.index.ContextualIndex`, and the per-shard top-k candidates
``(score, layer, global row)`` are merged with the same order: similarity desc, then
layer asc, then row asc. Scores are exact fp64 cosines, so the merged answer equals one
index holding the whole bank, ties included.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from latentlens import bank as B
from latentlens import distributed as D
from latentlens.errors import BankFormatError
from latentlens.index import Neighbor, neighbors_from_entries, rows_to_entries
from latentlens.search import Precision, RowNorms, checked_norms, prepare_queries, search_layer


@dataclass
class _Slice:
    """Rows ``[start, start + len)`` of one layer on one device."""

    rows: torch.Tensor
    norms: RowNorms
    start: int


def merge_candidates(
    scores: torch.Tensor,
    layer: torch.Tensor,
    row: torch.Tensor,
    k: int,
    *,
    keep_padding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global top-k of candidate lists ``[Q, m]`` (padding has score -inf and row -1).

    Order: score desc, then layer asc, then row asc. Padding sorts last and is dropped
    unless ``keep_padding`` (then exactly ``min(k, m)`` columns are returned).
    """
    key = layer * (int(row.max()) + 2 if row.numel() else 1) + row
    order = key.argsort(dim=1, stable=True)
    scores, layer, row = scores.gather(1, order), layer.gather(1, order), row.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    scores, layer, row = scores.gather(1, order), layer.gather(1, order), row.gather(1, order)
    if not keep_padding:
        k = min(k, int((row >= 0).sum(1).max()) if row.numel() else 0)
    return scores[:, :k], layer[:, :k], row[:, :k]


def _blank_zero_queries(
    q64: torch.Tensor, hits: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A zero query has no cosine: score NaN, layer and row -1 (as the one-index search)."""
    zero = ~(q64 != 0).any(dim=1).cpu()
    if not bool(zero.any()):
        return hits
    scores, layer, row = (t.clone() for t in hits)
    scores[zero], layer[zero], row[zero] = float("nan"), -1, -1
    return scores, layer, row


class _ShardedBase:
    """Shared state: the entry table, per-layer entry maps and row counts."""

    def __init__(self, root: Path, layers: Sequence[int] | None) -> None:
        if not root.is_dir():
            raise BankFormatError(f"bank directory {root} does not exist")
        if B.is_legacy(root):
            raise BankFormatError(f"{root} is a legacy bank: convert it first (latentlens convert)")
        self.root = root
        self.manifest = B.read_manifest(root)
        chosen = B.select_layers(self.manifest["layers"], layers, f"bank {root}")
        B.check_consistent(root, self.manifest, chosen)
        self.layers = chosen
        self.entries = B.read_entries(root)
        self.hidden_dim = int(self.manifest["hidden_dim"])
        self.num_rows: dict[int, int] = {}
        self.entry_map: dict[int, torch.Tensor | None] = {}
        for layer in chosen:
            n, entry = B.layer_rows(root, layer)
            self.num_rows[layer] = n
            self.entry_map[layer] = B.check_entry_map(
                entry, n, len(self.entries), f"bank {root} layer {layer}"
            )

    def _load_slices(
        self, device: torch.device, part: int, parts: int, dtype: torch.dtype | str | None
    ) -> dict[int, _Slice]:
        """Read slice ``part`` of ``parts`` of every layer onto ``device`` (only those rows)."""
        out = {}
        for layer in self.layers:
            start, stop = D.shard_range(self.num_rows[layer], parts, part)
            rows, _ = B.read_layer(self.root, layer, device=device, rows=(start, stop))
            if dtype is not None:
                rows = rows.to(B.parse_dtype(dtype))
            norms = checked_norms(rows, f"bank {self.root} layer {layer} rows {start}..{stop}")
            out[layer] = _Slice(rows, norms, start)
        return out

    def _search_slices(
        self, q64: torch.Tensor, slices: dict[int, _Slice], k: int, precision: Precision
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of some local slices, padded to width k: ``[Q, k]`` scores/layer/global row."""
        nq = q64.shape[0]
        parts_s, parts_l, parts_r = [], [], []
        for layer, sl in sorted(slices.items()):
            if sl.rows.shape[0] == 0:
                continue
            s, r = search_layer(q64, sl.rows, sl.norms, k, precision=precision)
            parts_s.append(s.cpu())
            parts_r.append(r.cpu() + sl.start)
            parts_l.append(torch.full_like(parts_r[-1], layer))
        pad_s = torch.full((nq, k), float("-inf"), dtype=torch.float64)
        pad_i = torch.full((nq, k), -1, dtype=torch.int64)
        scores = torch.cat([*parts_s, pad_s], dim=1)
        layer_t = torch.cat([*parts_l, pad_i], dim=1)
        row_t = torch.cat([*parts_r, pad_i], dim=1)
        return merge_candidates(scores, layer_t, row_t, k, keep_padding=True)

    def search(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
    ) -> list[list[Neighbor]]:
        """Nearest contextual neighbours, as :meth:`ContextualIndex.search`."""
        scores, layer, row = self.search_rows(queries, top_k, layers, precision=precision)
        return neighbors_from_entries(
            self.entries, scores.float(), layer, rows_to_entries(self.entry_map, layer, row)
        )

    def search_rows(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, layers: Sequence[int] | None) -> list[int]:
        return B.select_layers(self.layers, layers, "the loaded layers")


class DistributedIndex(_ShardedBase):
    """Each torch.distributed rank holds a row slice of every layer; all ranks get the answer.

    Every rank must call :meth:`search` with the same queries (a collective operation).
    Without a process group it is a world of one (the whole bank in this process).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layers: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        """Load this rank's slice of each layer (only those rows are read from disk)."""
        super().__init__(Path(path), layers)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.slices = self._load_slices(self.device, D.rank(), D.world_size(), dtype)

    def search_rows(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global top-k ``(scores f64, layer, row-in-layer)``, each ``[Q, k]``, on every rank."""
        chosen = self._check(layers)
        q64 = prepare_queries(queries, self.hidden_dim, allow_zero=True).to(self.device)
        local = self._search_slices(q64, {x: self.slices[x] for x in chosen}, top_k, precision)
        gathered = [D.all_gather_tensor(t) for t in local]
        scores, layer, row = (torch.cat(g, dim=1) for g in gathered)
        return _blank_zero_queries(q64, merge_candidates(scores, layer, row, top_k))


class MultiDeviceIndex(_ShardedBase):
    """One process, the bank's rows split across several devices (e.g. every visible GPU)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        devices: Sequence[torch.device | str] | None = None,
        layers: Sequence[int] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        """Load an equal row slice of each layer onto each device (default: all GPUs, else CPU)."""
        super().__init__(Path(path), layers)
        if devices is None:
            n = torch.cuda.device_count()
            devices = [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
        self.devices = [torch.device(d) for d in devices]
        self.shards = [
            self._load_slices(dev, i, len(self.devices), dtype)
            for i, dev in enumerate(self.devices)
        ]

    def search_rows(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global top-k ``(scores f64, layer, row-in-layer)``, each ``[Q, k]``."""
        chosen = self._check(layers)
        q = prepare_queries(queries, self.hidden_dim, allow_zero=True)
        parts = [
            self._search_slices(q.to(dev), {x: shard[x] for x in chosen}, top_k, precision)
            for dev, shard in zip(self.devices, self.shards, strict=True)
        ]
        scores, layer, row = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        return _blank_zero_queries(q, merge_candidates(scores, layer, row, top_k))
