"""``ContextualIndex``: a bank of contextual text-token vectors, searchable across layers."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from latentlens import bank as B
from latentlens import constants as C
from latentlens.atomic import read_json
from latentlens.errors import BankFormatError, BankNotFoundError, LatentLensError
from latentlens.hub import download_bank, push_bank
from latentlens.results import Neighbor
from latentlens.search import Precision, RowNorms, SearchHits, checked_norms, search_banks
from latentlens.search.standardize import (
    LayerStats,
    Standardized,
    layer_stats,
    search_standardized,
    standardize_rows,
)
from latentlens.spans import entry_spans
from latentlens.streaming import FileRows
from latentlens.vectors import VectorExplanation, Vectors

logger = logging.getLogger(__name__)


class ContextualIndex:
    """Contextual embeddings of an LLM at several layers, with their token/caption metadata.

    Rows of every layer refer to a shared entry table (token, caption, position). Layers
    live on one device in their stored dtype (fp16 by default) and are never upcast or
    copied as a whole by :meth:`search`.

    Build one with :func:`latentlens.build_index`, :meth:`from_tensors`,
    :meth:`from_directory` or :meth:`from_pretrained`.
    """

    def __init__(
        self,
        layers: Mapping[int, torch.Tensor] | Mapping[int, Mapping[str, Any]],
        entries: B.Entries | None = None,
        *,
        entry_index: Mapping[int, torch.Tensor | None] | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap already-prepared tensors (no copy).

        Two forms:

        - ``ContextualIndex(layers_data)`` (the original release's constructor):
          ``{layer: {"embeddings": Tensor[N, D], "metadata": [{"token_str", "caption",
          "position", "token_id"}, ...]}}``, one metadata dict per row;
        - ``ContextualIndex(layers, entries, entry_index=..., manifest=...)``: rows plus
          one shared entry table (what :meth:`from_directory` and ``build_index`` make).

        Args:
            layers: ``{layer: [N_l, d]}`` rows, any float/fp8 dtype, all on one device, or
                the ``layers_data`` dict above.
            entries: the shared entry table (omit it with ``layers_data``).
            entry_index: ``{layer: [N_l] int64}`` row → entry maps; missing/None = identity.
            manifest: extra metadata (model name, build parameters, …) kept on save.

        Raises:
            BankFormatError: inconsistent widths, row counts, entry maps or non-finite rows.
        """
        if not layers:
            raise BankFormatError("an index needs at least one layer")
        if entries is None:
            layers, entries, entry_index = _from_layers_data(layers)
            manifest = {"normalized": False, **(manifest or {})}
        dims = {int(t.shape[1]) if t.ndim == 2 else -1 for t in layers.values()}
        if len(dims) != 1 or -1 in dims:
            raise BankFormatError(
                f"all layers must be 2-D with one width; got widths {sorted(dims)}"
            )
        devices = {t.device for t in layers.values()}
        if len(devices) != 1:
            raise BankFormatError(f"all layers must be on one device; got {devices}")
        self._layers: dict[int, torch.Tensor] = {
            int(k): v  # type: ignore[misc]
            for k, v in sorted(layers.items())
        }
        self.entries = entries
        self._entry_index: dict[int, torch.Tensor | None] = {}
        for layer, emb in self._layers.items():
            idx = (entry_index or {}).get(layer)
            self._entry_index[layer] = B.check_entry_map(
                idx, int(emb.shape[0]), len(entries), f"layer {layer}"
            )
        self.manifest: dict[str, Any] = dict(manifest or {})
        self._norms: dict[int, RowNorms] = {
            layer: checked_norms(emb, f"layer {layer}") for layer, emb in self._layers.items()
        }
        self._legacy_view: dict[int, dict[str, Any]] | None = None
        self._stats: dict[int, LayerStats] = {}
        self._standard: dict[int, Standardized] = {}

    # ── construction ──────────────────────────────────────────────────────────────

    @classmethod
    def from_tensors(
        cls,
        layers: Mapping[int, torch.Tensor],
        metadata: Sequence[Mapping[str, Any]],
        *,
        dtype: torch.dtype | str | None = torch.float16,
        normalize: bool = True,
        device: torch.device | str | None = None,
        model_name: str = "",
    ) -> ContextualIndex:
        """Build an index from vectors and one metadata dict per row (shared by all layers).

        Args:
            layers: ``{layer: [N, d]}``; every layer has the same ``N`` rows as ``metadata``.
            metadata: dicts with ``token_str``, ``token_id``, ``caption``, ``position``.
            dtype: storage dtype (``None`` keeps the given one). fp8 is clipped to ±448.
            normalize: L2-normalise rows (in fp32) before casting to ``dtype``.
            device: where the rows live (default: where they are).
            model_name: recorded in the manifest.
        """
        entries = B.Entries.from_records(metadata)
        prepared = {}
        for layer, emb in layers.items():
            if emb.ndim != 2 or emb.shape[0] != len(entries):
                raise BankFormatError(
                    f"layer {layer}: expected [{len(entries)}, d] rows, got {tuple(emb.shape)}"
                )
            x = emb.to(device) if device is not None else emb
            if normalize:
                x = torch.nn.functional.normalize(x.float(), dim=-1)
            prepared[layer] = B.to_storage(x, B.parse_dtype(dtype)) if dtype is not None else x
        return cls(prepared, entries, manifest={"model_name": model_name, "normalized": normalize})

    @classmethod
    def from_directory(
        cls,
        path: str | os.PathLike[str],
        layers: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        mmap: bool = False,
    ) -> ContextualIndex:
        """Load a bank saved by :meth:`save`, or the original release's legacy layout.

        Args:
            path: bank directory.
            layers: layers to load (default all); others are not read.
            device: device for the rows (default CPU).
            dtype: convert rows once at load (default: keep the stored dtype).
            mmap: leave the rows on disk and stream them chunk by chunk at search time
                (CPU only, stored dtype): for banks larger than memory. See
                :class:`latentlens.streaming.FileRows`.

        Raises:
            BankFormatError: missing, corrupt or unsafe files.
            LayerNotFoundError: a requested layer is not in the bank.
        """
        root = Path(path)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if not root.is_dir() or not (
            (root / C.CONFIG_FILE).exists() or B.legacy_layers(root) or B.is_partial(root)
        ):
            what = "does not exist" if not root.is_dir() else "holds no bank"
            raise BankNotFoundError(
                f"{root} {what}: No embeddings_cache.pt files (the original layout "
                f"layer_N/embeddings_cache.pt) and no {C.CONFIG_FILE} (the latentlens layout)"
            )
        if B.is_legacy(root):
            return cls._from_legacy(root, layers, device, dtype)
        manifest = B.read_manifest(root)
        chosen = B.select_layers(manifest["layers"], layers, f"bank {root}")
        B.check_consistent(root, manifest, chosen)
        entries = B.read_entries(root)
        expected = manifest.get("num_entries")
        if expected is not None and int(expected) != len(entries):
            raise BankFormatError(
                f"bank {root}: the manifest says {expected} entries, entries.safetensors "
                f"holds {len(entries)} (an interrupted write?)"
            )
        if mmap:
            if device.type != "cpu" or dtype is not None:
                raise BankFormatError(
                    "mmap=True streams rows from disk on the CPU in their stored dtype"
                )

            streamed: dict[int, Any] = {x: FileRows(B.layer_path(root, x)) for x in chosen}
            maps = {x: B.layer_rows(root, x)[1] for x in chosen}
            index = cls(streamed, entries, entry_index=maps, manifest=manifest)
            index._stats = B.read_stats(root, chosen, manifest.get("bank_id"))
            return index
        embs, maps = {}, {}
        for layer in chosen:
            emb, entry = B.read_layer(root, layer, device=device)
            want = (manifest.get("rows_per_layer") or {}).get(str(layer))
            if want is not None and int(want) != emb.shape[0]:
                raise BankFormatError(
                    f"bank {root}: layer {layer} holds {emb.shape[0]} rows, the manifest "
                    f"says {want} (an interrupted write?)"
                )
            if emb.shape[1] != int(manifest["hidden_dim"]):
                raise BankFormatError(
                    f"layer {layer} has width {emb.shape[1]}, manifest says {manifest['hidden_dim']}"
                )
            embs[layer] = emb.to(B.parse_dtype(dtype)) if dtype is not None else emb
            maps[layer] = entry
        index = cls(embs, entries, entry_index=maps, manifest=manifest)
        if dtype is None:  # statistics of the stored rows (converted rows: computed anew)
            index._stats = B.read_stats(root, chosen, manifest.get("bank_id"))
        return index

    @classmethod
    def _from_legacy(
        cls,
        root: Path,
        layers: Sequence[int] | None,
        device: torch.device,
        dtype: torch.dtype | str | None,
    ) -> ContextualIndex:
        available = B.legacy_layers(root)
        chosen = B.select_layers(available, layers, f"bank {root}")
        embs, metas = {}, {}
        for layer in chosen:
            emb, meta = B.load_legacy_layer(root / C.LEGACY_LAYER_FILE.format(layer=layer))
            emb = emb.to(device)
            embs[layer] = emb.to(B.parse_dtype(dtype)) if dtype is not None else emb
            metas[layer] = meta
        entries, maps = B.merge_legacy(metas)
        manifest: dict[str, Any] = {"legacy": True}
        meta_path = root / C.LEGACY_META_FILE
        if meta_path.exists():
            try:
                legacy = read_json(meta_path)
                if isinstance(legacy, dict):
                    manifest["model_name"] = str(legacy.get("model_name", legacy.get("model", "")))
            except ValueError as e:
                raise BankFormatError(f"{meta_path} is not valid JSON: {e}") from e
        return cls(embs, entries, entry_index=maps, manifest=manifest)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        layers: Sequence[int] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> ContextualIndex:
        """Load a bank from a local directory or a Hugging Face Hub repo.

        Only the requested layers' files are downloaded. Works offline from the local
        cache (``HF_HUB_OFFLINE=1``). Reads our format and the original release's.
        """
        if Path(repo_id).is_dir():
            return cls.from_directory(repo_id, layers=layers, device=device, dtype=dtype)

        local = download_bank(repo_id, layers=layers, revision=revision, cache_dir=cache_dir)
        return cls.from_directory(local, layers=layers, device=device, dtype=dtype)

    def attach_spans(self, tokenizer: Any, max_length: int | None = None) -> ContextualIndex:
        """Character spans for a bank built without them (format 1.0, the original release's).

        Each caption is tokenized as the build did (special tokens, ``max_length`` from the
        bank's build settings, else 512) and each entry takes its token's offsets; the
        spans are marked ``"computed"``. A bank with stored spans is left as it is.

        Raises:
            LatentLensError: the tokenizer gives no offsets (a slow tokenizer).
        """
        if self.entries.span_source == "stored":
            return self
        build = self.manifest.get("build") or {}
        limit = max_length or int(build.get("max_length", 512))
        span = entry_spans(
            tokenizer, self.entries.captions, self.entries.caption_id, self.entries.position, limit
        )
        if span is None:
            raise LatentLensError(
                f"{type(tokenizer).__name__} gives no character offsets: load its fast version"
            )
        self.entries = dataclasses.replace(self.entries, span=span, span_source="computed")
        self._legacy_view = None
        return self

    # ── persistence ───────────────────────────────────────────────────────────────

    def save(self, path: str | os.PathLike[str], dtype: torch.dtype | str | None = None) -> Path:
        """Write the index in the pickle-free format (each file atomic, manifest last).

        Args:
            path: target directory (created).
            dtype: storage dtype (default: keep each layer's current dtype).

        Returns:
            The directory written.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        B.invalidate(root)  # first: an interrupted save never loads as complete
        bank_id = B.new_bank_id()
        B.write_entries(root, self.entries, bank_id)
        stored = self.dtype
        stats = {}
        for layer, emb in self._layers.items():
            out = B.to_storage(emb, B.parse_dtype(dtype)) if dtype is not None else emb
            stored = out.dtype
            B.write_layer(root, layer, out, self._entry_index[layer], bank_id)
            keep = dtype is None or out.dtype == self.dtype
            stats[layer] = self.layer_stats(layer) if keep else layer_stats(out)
        B.write_stats(root, stats, bank_id)
        manifest = B.make_manifest(
            hidden_dim=self.hidden_dim,
            layers=self.available_layers,
            dtype=stored,
            num_entries=len(self.entries),
            rows_per_layer={k: int(v.shape[0]) for k, v in self._layers.items()},
            extra=self.manifest,
            bank_id=bank_id,
        )
        B.write_manifest(root, manifest)
        return root

    def subset(self, layers: Sequence[int]) -> ContextualIndex:
        """The same bank with only ``layers`` (rows shared, nothing copied)."""
        chosen = self._selected(layers)
        sub = ContextualIndex(
            {x: self._layers[x] for x in chosen},
            self.entries,
            entry_index={x: self._entry_index[x] for x in chosen},
            manifest=self.manifest,
        )
        sub._stats = {x: v for x, v in self._stats.items() if x in chosen}
        return sub

    def push_to_hub(
        self,
        repo_id: str,
        *,
        layers: Sequence[int] | None = None,
        private: bool | None = None,
        token: str | None = None,
        license: str | None = None,
        corpus: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Publish the bank (or ``layers`` of it) to the Hub with a model card, in one commit.

        One file per layer, so users download only the layers they need
        (:meth:`from_pretrained` with ``layers=``); the card's YAML says
        ``library_name: latentlens`` and the model, corpus, layers, rows and dtype.

        Returns:
            The commit (or pull request) URL.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="latentlens-push-") as tmp:
            self.subset(layers or self.available_layers).save(tmp)
            return push_bank(
                tmp,
                repo_id,
                private=private,
                token=token,
                license=license,
                corpus=corpus,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    # ── properties ────────────────────────────────────────────────────────────────

    @property
    def available_layers(self) -> list[int]:
        """Sorted layers held."""
        return list(self._layers)

    @property
    def hidden_dim(self) -> int:
        """Width ``d`` of every row."""
        return int(next(iter(self._layers.values())).shape[1])

    @property
    def device(self) -> torch.device:
        """Device the rows live on."""
        return next(iter(self._layers.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the rows."""
        return next(iter(self._layers.values())).dtype

    @property
    def model_name(self) -> str:
        """Name of the model the bank was built from ('' if unknown)."""
        return str(self.manifest.get("model_name", ""))

    def embeddings(self, layer: int) -> torch.Tensor:
        """The stored rows of one layer ``[N, d]`` (a view, not a copy)."""
        self._selected([layer])
        return self._layers[layer]

    def num_rows(self, layer: int) -> int:
        """Row count of one layer."""
        return int(self.embeddings(layer).shape[0])

    def nbytes(self) -> int:
        """Memory held by the rows of every layer."""
        return sum(t.numel() * t.element_size() for t in self._layers.values())

    def __len__(self) -> int:
        """Total rows over all layers."""
        return sum(int(t.shape[0]) for t in self._layers.values())

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {v.shape[0]:,}" for k, v in self._layers.items())
        name = f"model={self.model_name!r}, " if self.model_name else ""
        return (
            f"ContextualIndex({name}layers={{{rows}}}, total_embeddings={len(self):,}, "
            f"hidden_dim={self.hidden_dim}, dtype={B.dtype_name(self.dtype)}, "
            f"device={self.device})"
        )

    @property
    def _layers_data(self) -> dict[int, dict[str, Any]]:
        """The original release's view: ``{layer: {"embeddings", "metadata"}}`` (built once).

        Kept for code written against the original ``ContextualIndex``; the embeddings are
        the stored rows (no copy), the metadata one dict per row.
        """
        if self._legacy_view is None:
            view = {}
            for layer, emb in self._layers.items():
                idx = self._entry_index[layer]
                rows = range(int(emb.shape[0])) if idx is None else idx.tolist()
                view[layer] = {
                    "embeddings": emb,
                    "metadata": [self.entries.record(i) for i in rows],
                }
            self._legacy_view = view
        return self._legacy_view

    def to(self, device: torch.device | str) -> ContextualIndex:
        """Move the rows to ``device`` (in place); returns self."""
        device = torch.device(device)
        self._layers = {k: v.to(device) for k, v in self._layers.items()}
        self._legacy_view = None
        self._norms = {
            k: RowNorms(n.norm.to(device), n.inv.to(device), n.max_deviation)
            for k, n in self._norms.items()
        }
        self._standard = {}
        return self

    # ── search ────────────────────────────────────────────────────────────────────

    def search_tensors(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
        standardize: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global top-k by cosine similarity across the selected layers, as tensors.

        Args:
            queries: ``[d]`` or ``[Q, d]``, any float dtype and device (normalised here).
            top_k: neighbours per query (fewer if the layers hold fewer rows).
            layers: bank layers to search (default all).
            precision: ``"auto"``/``"fast"`` (low-precision scoring + certified re-rank) or
                ``"exact"`` (fp32 scoring); both return exactly the fp64 answer.
            standardize: rank by cosine after z-scoring every dimension with each layer's
                own mean and standard deviation (:meth:`layer_stats`), exactly; for models
                whose few outlier dimensions make every raw cosine nearly 1.

        Returns:
            ``scores [Q, k]`` float32, ``layer [Q, k]`` int64, ``entry [Q, k]`` int64 (row in
            :attr:`entries`), best first; ties go to the lower layer, then lower row. A
            zero query (no cosine defined) gets scores NaN and layer / entry -1.
        """
        scores, layer, row = self.search_rows(
            queries, top_k, layers, precision=precision, standardize=standardize
        )
        entry = rows_to_entries(self._entry_index, layer, row)
        return scores.to(torch.float32), layer, entry

    def search_rows(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
        standardize: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`search_tensors` but returns float64 scores and the row in each layer."""
        if standardize:
            hits = self._search_standardized(queries, top_k, layers, precision)
        else:
            hits = self._search(queries, top_k, layers, precision)
        chosen = torch.tensor(self._selected(layers), dtype=torch.int64)
        bank = hits.bank.cpu()
        layer = torch.where(bank >= 0, chosen[bank.clamp_min(0)], bank)  # -1: a zero query
        return hits.scores.cpu(), layer, hits.row.cpu()

    def search(
        self,
        queries: torch.Tensor,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        precision: Precision = "auto",
        standardize: bool = False,
    ) -> list[list[Neighbor]]:
        """Nearest contextual neighbours of each query, best first.

        Args:
            queries: ``[d]`` or ``[Q, d]`` hidden states (any float dtype/device).
            top_k: neighbours per query.
            layers: bank layers to search (default all); the global top-k is kept.
            standardize: z-score every dimension per layer first (see
                :meth:`search_tensors`).

        Returns:
            ``Q`` lists of :class:`Neighbor` with ``contextual_layer`` set; an empty list
            for a zero query (e.g. the connector output of an all-black crop).
        """
        scores, layer, entry = self.search_tensors(
            queries, top_k, layers, precision=precision, standardize=standardize
        )
        return self.neighbors(scores, layer, entry)

    def explain_vectors(
        self,
        vectors: torch.Tensor | Vectors,
        top_k: int = 5,
        layers: Sequence[int] | None = None,
        *,
        standardize: bool = False,
    ) -> list[VectorExplanation]:
        """The nearest contexts of arbitrary directions: SAE decoder rows, steering vectors.

        Args:
            vectors: ``[n, d]`` or ``[d]`` tensor, or :func:`latentlens.vectors.load_vectors`'s
                result (its names are kept).
            top_k: contexts per vector.
            layers: bank layers to search, typically the one the vectors were trained at
                (default all; global top-k).
            standardize: z-score dimensions first (see :meth:`search_tensors`).

        Returns:
            One :class:`VectorExplanation` per vector, in order.
        """
        if isinstance(vectors, Vectors):
            names, matrix = vectors.names, vectors.vectors
        else:
            matrix = torch.as_tensor(vectors)
            matrix = matrix[None] if matrix.ndim == 1 else matrix
            names = [f"vector {i}" for i in range(matrix.shape[0])]
        found = self.search(matrix, top_k, layers, standardize=standardize)
        norms = matrix.detach().to(torch.float64).norm(dim=-1).tolist()
        return [
            VectorExplanation(name, i, float(n), nbs)
            for i, (name, n, nbs) in enumerate(zip(names, norms, found, strict=True))
        ]

    def layer_stats(self, layer: int) -> LayerStats:
        """Per-dimension mean and standard deviation of ``layer``'s stored rows (``[d]``
        float64 each): read from the bank when it stores them, else computed once (exactly,
        in float64) and kept."""
        if layer not in self._layers:
            self._selected([layer])  # raises the usual error
        if layer not in self._stats:
            self._stats[layer] = layer_stats(self._layers[layer])
        return self._stats[layer]

    def standardized(self, layer: int) -> Standardized:
        """The z-scored copy of ``layer``'s rows the standardised search scans (made once;
        as much memory as the layer, fp16 for fp8 banks)."""
        if layer not in self._standard:
            self._standard[layer] = standardize_rows(self._layers[layer], self.layer_stats(layer))
        return self._standard[layer]

    def neighbors(
        self, scores: torch.Tensor, layer: torch.Tensor, entry: torch.Tensor
    ) -> list[list[Neighbor]]:
        """Turn :meth:`search_tensors` output ``[Q, k]`` into :class:`Neighbor` lists."""
        return neighbors_from_entries(self.entries, scores, layer, entry)

    # ── internals ─────────────────────────────────────────────────────────────────

    def _selected(self, layers: Sequence[int] | None) -> list[int]:
        return B.select_layers(self.available_layers, layers, "this index")

    def _search_layers(self, top_k: int, layers: Sequence[int] | None) -> list[int]:
        """The layers a search covers, after checking ``top_k`` and the selection."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        chosen = self._selected(layers)
        if not chosen:
            raise LatentLensError("layers=[] selects nothing to search")
        return chosen

    def _search(
        self,
        queries: torch.Tensor,
        top_k: int,
        layers: Sequence[int] | None,
        precision: Precision,
    ) -> SearchHits:
        chosen = self._search_layers(top_k, layers)
        return search_banks(
            queries,
            [self._layers[x] for x in chosen],
            [self._norms[x] for x in chosen],
            top_k,
            precision=precision,
        )

    def _search_standardized(
        self,
        queries: torch.Tensor,
        top_k: int,
        layers: Sequence[int] | None,
        precision: Precision,
    ) -> SearchHits:
        chosen = self._search_layers(top_k, layers)
        parts_s, parts_b, parts_r = [], [], []
        for b, layer in enumerate(chosen):
            if self.num_rows(layer) == 0:
                continue
            s, r = search_standardized(
                queries,
                self._layers[layer],
                self.standardized(layer),
                top_k,
                precision=precision,
                unit_queries=bool(self.manifest.get("normalized", True)),
            )
            parts_s.append(s)
            parts_b.append(torch.where(r >= 0, b, -1))
            parts_r.append(r)
        if not parts_s:
            raise LatentLensError("nothing to search: every selected layer is empty")
        scores = torch.cat(parts_s, dim=1)
        # score desc; ties to the earlier layer, then the lower row (each part is row-sorted
        # on ties already); NaN (a query equal to the mean) sorts last
        key = torch.where(scores.isnan(), torch.full_like(scores, -torch.inf), scores)
        order = key.argsort(dim=1, descending=True, stable=True)[:, : min(top_k, key.shape[1])]
        return SearchHits(
            scores.gather(1, order),
            torch.cat(parts_b, 1).gather(1, order),
            torch.cat(parts_r, 1).gather(1, order),
        )


def _from_layers_data(
    layers_data: Mapping[int, Any],
) -> tuple[dict[int, torch.Tensor], B.Entries, dict[int, torch.Tensor | None]]:
    """The original constructor's ``{layer: {"embeddings", "metadata"}}`` → our parts."""
    embs: dict[int, torch.Tensor] = {}
    metas: dict[int, Sequence[Mapping[str, Any]]] = {}
    for layer, data in layers_data.items():
        if not isinstance(data, Mapping) or "embeddings" not in data or "metadata" not in data:
            raise BankFormatError(
                f"layer {layer}: expected {{'embeddings': Tensor[N, D], 'metadata': [dict, ...]}} "
                f"(or pass the entry table as the second argument), got {type(data).__name__}"
            )
        emb, meta = data["embeddings"], data["metadata"]
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
            raise BankFormatError(f"layer {layer}: 'embeddings' must be a 2-D tensor")
        if len(meta) != emb.shape[0]:
            raise BankFormatError(
                f"layer {layer}: {emb.shape[0]} rows but {len(meta)} metadata dicts"
            )
        embs[int(layer)], metas[int(layer)] = emb, meta
    entries, maps = B.merge_legacy(metas)
    return embs, entries, maps


def rows_to_entries(
    entry_maps: Mapping[int, torch.Tensor | None], layer: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """Entry-table row of each hit ``[Q, k]`` from its bank layer and row in that layer."""
    entry = row.clone()
    for lay, idx in entry_maps.items():
        if idx is not None:
            mask = (layer == lay) & (row >= 0)
            entry[mask] = idx[row[mask]]
    return entry


def neighbors_from_entries(
    entries: B.Entries, scores: torch.Tensor, layer: torch.Tensor, entry: torch.Tensor
) -> list[list[Neighbor]]:
    """``[Q, k]`` scores / bank layers / entry rows → ``Q`` lists of :class:`Neighbor`.

    Columns with layer -1 (no hit: a zero query) are left out.
    """
    safe = entry.clamp_min(0) if len(entries) else entry
    tok = entries.token_id[safe].tolist()
    cap = entries.caption_id[safe].tolist()
    pos = entries.position[safe].tolist()
    # one gather for all hits, like the columns above (not one tensor index per neighbour)
    spans = entries.span[safe].tolist() if entries.span is not None else None
    out = []
    for q, (qs, ql, qt, qc, qp) in enumerate(
        zip(scores.tolist(), layer.tolist(), tok, cap, pos, strict=True)
    ):
        qspan = spans[q] if spans is not None else [None] * len(qs)
        out.append(
            [
                Neighbor(
                    token_str=entries.token_strs.get(t, ""),
                    similarity=s,
                    caption=entries.captions[c],
                    position=p,
                    token_id=t,
                    contextual_layer=lay,
                    char_span=(a[0], a[1]) if a is not None and a[0] >= 0 else None,
                )
                for s, lay, t, c, p, a in zip(qs, ql, qt, qc, qp, qspan, strict=True)
                if lay >= 0
            ]
        )
    return out
