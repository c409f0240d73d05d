"""Build a contextual bank from a causal LM: plan entries, run batches, stream shards, merge.

A build with ``output_dir`` is resumable: the plan (which sentence/position fills which
slot) is derived from the corpus and settings alone, batches are grouped into numbered
shards written atomically under ``output_dir/.build/``, and a restarted build skips the
shards already on disk. The final bank (one file per layer) is written from the shards,
so an interrupted-and-resumed build equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from latentlens import bank as B
from latentlens import distributed as D
from latentlens.atomic import atomic_path, read_json, sweep_temporary, write_json
from latentlens.corpus import load_corpus
from latentlens.errors import CorpusError, LatentLensError
from latentlens.index import ContextualIndex
from latentlens.selection import Plan, Sampling, plan_entries

logger = logging.getLogger(__name__)

_BUILD_DIR = ".build"
_STATE_FILE = "state.json"


def auto_layers(n_layers: int) -> list[int]:
    """Default bank layers for an ``n_layers``-block LLM: {1,2,4,8,16,24} below n, n-2, n-1.

    >>> auto_layers(32)
    [1, 2, 4, 8, 16, 24, 30, 31]
    >>> auto_layers(12)
    [1, 2, 4, 8, 10, 11]
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    chosen = {x for x in (1, 2, 4, 8, 16, 24) if x < n_layers}
    chosen |= {x for x in (n_layers - 2, n_layers - 1) if x >= 1}
    return sorted(chosen)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a bank's content (recorded in its manifest)."""

    model_name: str
    layers: tuple[int, ...]
    cap: int | None
    sampling: Sampling
    skip_first: int
    dedup: bool
    normalize: bool
    storage_dtype: str
    seed: int
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = dict(self.__dict__)
        d["layers"] = list(self.layers)
        return d


def build_index(
    model_name: str | None,
    corpus: str | os.PathLike[str] | Iterable[str],
    layers: Sequence[int] | None = None,
    max_contexts_per_token: int | None = 50,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    sampling: Sampling = "first",
    seed: int = 42,
    skip_first: int | None = None,
    *,
    dedup: bool | None = None,
    normalize: bool | None = None,
    storage_dtype: str | torch.dtype | None = None,
    max_length: int = 512,
    shard_sentences: int = 1000,
    mmap: bool = False,
) -> ContextualIndex:
    """Build a bank of contextual token embeddings from a causal LM and a corpus.

    Two presets follow the paper (SPEC §2). *Library mode* (defaults): skip positions 0-1,
    prefix dedup, first ``max_contexts_per_token`` per token string, rows normalised, fp16.
    *Paper mode* (``sampling="reservoir"``, cap 20, ``skip_first=0``): no dedup, reservoir
    sample, raw rows; pass ``storage_dtype="float8_e4m3fn"`` for the paper's storage.

    Args:
        model_name: Hub id or local path (loaded with :func:`latentlens.models.load_model`
            unless ``model`` is given; then only recorded).
        corpus: path (.txt/.csv/.jsonl) or list of sentences.
        layers: hidden-state indices (0 = embeddings, i = output of block i); default: the
            ``default_layers`` of ``model_name``'s ``latentlens.MODEL_DEFAULTS`` entry, else
            :func:`auto_layers`.
        max_contexts_per_token: cap per decoded token string (``None``: no cap).
        batch_size: sentences per forward pass (length-sorted to minimise padding).
        device: where the model runs (default CUDA if available, else CPU).
        dtype: model compute dtype when loading (default fp16 on CUDA, fp32 on CPU, where
            fp16 matmuls have no fast kernels).
        model, tokenizer: an already-loaded model and tokenizer.
        output_dir: stream shards here and write the final bank; enables resume.
        resume: reuse compatible shards of an interrupted build in ``output_dir``.
        sampling: ``"first"`` or ``"reservoir"`` (Algorithm R, seeded once with ``seed``).
        skip_first: positions skipped at the start of each sentence (default 2 for
            ``"first"``, 0 for ``"reservoir"``); BOS counts when the tokenizer adds one.
        dedup: prefix deduplication (default on for ``"first"``, off for ``"reservoir"``).
        normalize: L2-normalise rows before storage (default on for ``"first"``).
        storage_dtype: float16 (default), bfloat16, float32 or float8_e4m3fn (clipped ±448).
        max_length: sentences are truncated to this many tokens.
        shard_sentences: sentences per resumable shard.
        mmap: with ``output_dir``, return the bank streamed from disk (see
            :meth:`ContextualIndex.from_directory`) instead of loading it into memory.
            The bank is assembled on disk one shard at a time either way.

    Returns:
        The :class:`ContextualIndex` (rows on CPU).

    Raises:
        CorpusError: empty or unreadable corpus.
        ValueError: bad layers or settings.
    """
    from latentlens.models.defaults import default_layers_for
    from latentlens.models.registry import num_layers

    sentences = load_corpus(corpus)
    if model is None:
        if not model_name:
            raise LatentLensError("give a model name or an already-loaded model=")
        run_device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.float16 if run_device.type == "cuda" else torch.float32
        from latentlens.models.loading import load_model

        model, tokenizer = load_model(model_name, device=run_device, dtype=dtype)
    elif tokenizer is None:
        raise LatentLensError("model= was given without tokenizer=")
    else:
        run_device = torch.device(device) if device is not None else _model_device(model)
        model = model.to(run_device).eval()
    assert model is not None
    n_layers = num_layers(model)
    if layers is None:  # a MODEL_DEFAULTS entry, else the paper's rule
        layers = default_layers_for(model_name) or auto_layers(n_layers)
    chosen = sorted(set(layers))
    bad = [x for x in chosen if not 0 <= x <= n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{n_layers}")
    reservoir = sampling == "reservoir"
    cfg = BuildConfig(
        model_name=model_name or getattr(model.config, "_name_or_path", "") or "",
        layers=tuple(chosen),
        cap=max_contexts_per_token,
        sampling=sampling,
        skip_first=(0 if reservoir else 2) if skip_first is None else skip_first,
        dedup=(not reservoir) if dedup is None else dedup,
        normalize=(not reservoir) if normalize is None else normalize,
        storage_dtype=B.dtype_name(B.parse_dtype(storage_dtype or "float16")),
        seed=seed,
        max_length=max_length,
    )
    ids = tokenize(tokenizer, sentences, max_length)
    decode = _decoder(tokenizer)
    plan = plan_entries(
        ids,
        decode,
        cap=cfg.cap,
        sampling=cfg.sampling,
        skip_first=cfg.skip_first,
        dedup=cfg.dedup,
        seed=cfg.seed,
    )
    if not len(plan):
        raise CorpusError(
            f"no token survives the selection (skip_first={cfg.skip_first}): sentences too short?"
        )
    builder = _Builder(model, cfg, ids, plan, batch_size, shard_sentences, show_progress)
    root = Path(output_dir) if output_dir is not None else None
    if root is not None and D.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        B.invalidate(root)  # a bank being rebuilt never loads as complete
        sweep_temporary(root)
    D.barrier()
    vectors = builder.run(root, resume)
    if vectors is None and D.rank() != 0:  # a distributed build: rank 0 writes the bank
        D.barrier()
        assert root is not None
        return ContextualIndex.from_directory(root, mmap=mmap)
    entries = B.Entries(
        token_id=torch.tensor(plan.token_id, dtype=torch.int64),
        caption_id=torch.tensor(plan.sentence, dtype=torch.int64),
        position=torch.tensor(plan.position, dtype=torch.int64),
        captions=sentences,
        token_strs={t: decode(t) for t in set(plan.token_id)},
    )
    entries = _compact_captions(entries)
    manifest = {"model_name": cfg.model_name, "normalized": cfg.normalize, "build": cfg.to_dict()}
    if vectors is not None:
        return ContextualIndex(vectors, entries, manifest=manifest)
    assert root is not None  # streamed to disk: write the entry table and manifest last
    B.write_entries(root, entries, builder.bank_id)
    B.write_manifest(
        root,
        B.make_manifest(
            hidden_dim=builder.hidden_dim,
            layers=cfg.layers,
            dtype=B.parse_dtype(cfg.storage_dtype),
            num_entries=len(entries),
            rows_per_layer=dict.fromkeys(cfg.layers, len(entries)),
            extra=manifest,
            bank_id=builder.bank_id,
        ),
    )
    shutil.rmtree(root / _BUILD_DIR, ignore_errors=True)
    D.barrier()
    return ContextualIndex.from_directory(root, mmap=mmap)


def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each sentence with the tokenizer's own special tokens (e.g. BOS)."""
    out = tokenizer(
        list(sentences), add_special_tokens=True, truncation=True, max_length=max_length
    )
    return [list(x) for x in out["input_ids"]]


def _decoder(tokenizer: Any):
    cache: dict[int, str] = {}

    def decode(t: int) -> str:
        s = cache.get(t)
        if s is None:
            s = cache[t] = tokenizer.decode([t])
        return s

    return decode


def _compact_captions(entries: B.Entries) -> B.Entries:
    """Keep only the captions that entries refer to (renumbered in first-use order)."""
    used = torch.unique(entries.caption_id)
    remap = torch.full((len(entries.captions),), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    return B.Entries(
        token_id=entries.token_id,
        caption_id=remap[entries.caption_id],
        position=entries.position,
        captions=[entries.captions[i] for i in used.tolist()],
        token_strs=entries.token_strs,
    )


def model_identity(model: torch.nn.Module) -> str:
    """A digest of the model's name, revision, dtypes and (sampled) weights.

    Every parameter contributes its name, shape, dtype and up to 4096 evenly strided
    values, so other weights, another dtype or another checkpoint give another digest
    at the cost of a few kilobytes per tensor.
    """
    config = getattr(model, "config", None)
    h = hashlib.sha256()
    for key in ("_name_or_path", "_commit_hash"):
        h.update(f"{key}={getattr(config, key, '')};".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta:  # offloaded: shape and dtype only
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:meta;".encode())
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _Builder:
    """Runs the forward passes of a plan, shard by shard."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: BuildConfig,
        ids: list[list[int]],
        plan: Plan,
        batch_size: int,
        shard_sentences: int,
        show_progress: bool,
    ) -> None:
        self.model, self.cfg, self.ids, self.plan = model, cfg, ids, plan
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.device = _model_device(model)
        self.storage = B.parse_dtype(cfg.storage_dtype)
        wanted = plan.by_sentence()
        # Length-sorted (longest first) so batches carry little padding; ties by corpus order.
        order = sorted(wanted, key=lambda s: (-len(ids[s]), s))
        self.wanted = wanted
        self.shard_sentences = shard_sentences
        self.shards = [
            order[i : i + shard_sentences] for i in range(0, len(order), shard_sentences)
        ]
        self.bank_id = B.new_bank_id()

    def fingerprint(self) -> str:
        """Everything that changes the bank's bytes: settings, plan, sharding, batching, model."""
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        h.update(f"shard={self.shard_sentences};batch={self.batch_size};".encode())
        h.update(model_identity(self.model).encode())
        for s, p, t in zip(self.plan.sentence, self.plan.position, self.plan.token_id, strict=True):
            h.update(f"{s},{p},{t};".encode())
        h.update(str(len(self.shards)).encode())
        return h.hexdigest()

    def run(self, root: Path | None, resume: bool) -> dict[int, torch.Tensor] | None:
        """Compute every planned vector: ``{layer: [M, d]}`` in the storage dtype.

        Under torch.distributed, rank r computes shards ``i ≡ r (mod world)`` and writes them
        to the shared ``root``; rank 0 then assembles the bank (other ranks return None).
        """
        world, me = D.world_size(), D.rank()
        build = root / _BUILD_DIR if root is not None else None
        if world > 1 and build is None:
            raise LatentLensError(
                "a distributed build needs output_dir= (a folder every rank can reach)"
            )
        done: set[int] = set()
        if build is not None:
            if me == 0:
                self._prepare_dir(build, resume)
                sweep_temporary(build)  # a killed writer's temporary files
            D.barrier()
            done = self._existing(build)
        mine = [i for i in range(len(self.shards)) if i % world == me and i not in done]
        bar = tqdm(
            total=sum(len(self.shards[i]) for i in mine),
            unit="sent",
            desc="building bank",
            disable=not self.show_progress or me != 0,
        )
        start, tokens_run = time.perf_counter(), 0
        computed: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        for i in mine:
            part = self._run_shard(self.shards[i], bar)
            tokens_run += sum(len(self.ids[s]) for s in self.shards[i])
            if build is not None:
                self._write_shard(build / f"shard_{i:05d}.safetensors", part)
            else:
                computed[i] = part
            bar.set_postfix(tok_s=f"{tokens_run / max(time.perf_counter() - start, 1e-9):,.0f}")
        bar.close()
        D.barrier()
        if me != 0:
            return None
        if root is not None:
            self._assemble_on_disk(root)
            return None
        out: dict[int, torch.Tensor] = {}
        for slots, vecs in computed.values():
            for layer, v in vecs.items():
                if layer not in out:
                    out[layer] = torch.empty(len(self.plan), v.shape[1], dtype=self.storage)
                out[layer][slots] = v
        return out

    def _assemble_on_disk(self, root: Path) -> None:
        """Write the final layer files from the shards, one shard in memory at a time."""
        build = root / _BUILD_DIR
        first = self._read_shard(build / "shard_00000.safetensors")
        writers = {
            layer: B.LayerWriter(
                root, layer, len(self.plan), v.shape[1], self.storage, self.bank_id
            )
            for layer, v in first[1].items()
        }
        with contextlib.ExitStack() as stack:
            for w in writers.values():
                stack.enter_context(w)
            for i in range(len(self.shards)):
                slots, vecs = (
                    first if i == 0 else self._read_shard(build / f"shard_{i:05d}.safetensors")
                )
                for layer, v in vecs.items():
                    writers[layer].put(slots, v)
        self.hidden_dim = next(iter(first[1].values())).shape[1]

    def _existing(self, build: Path) -> set[int]:
        return {
            i for i in range(len(self.shards)) if (build / f"shard_{i:05d}.safetensors").exists()
        }

    def _prepare_dir(self, build: Path, resume: bool) -> set[int]:
        fp = self.fingerprint()
        state_path = build / _STATE_FILE
        if build.exists():
            state = read_json(state_path) if state_path.exists() else {}
            if resume and state.get("fingerprint") == fp:
                done = self._existing(build)
                logger.info(
                    "resuming build: %d of %d shards already done", len(done), len(self.shards)
                )
                return done
            if resume and state:
                logger.warning(
                    "%s holds shards of a build with other settings, sharding, batch size or "
                    "model weights; discarding them and starting over",
                    build,
                )
            shutil.rmtree(build)
        build.mkdir(parents=True)
        write_json(
            state_path,
            {"fingerprint": fp, "config": self.cfg.to_dict(), "shards": len(self.shards)},
        )
        return set()

    @torch.inference_mode()
    def _run_shard(
        self, shard: list[int], bar: tqdm
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        from latentlens.models.hooks import get_hidden_states

        slots_all: list[int] = []
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.cfg.layers}
        for b in range(0, len(shard), self.batch_size):
            batch = shard[b : b + self.batch_size]
            lengths = [len(self.ids[s]) for s in batch]
            width = max(lengths)
            # Right padding: real tokens keep positions 0..len-1 and never see the pads.
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols = [], []
            for r, s in enumerate(batch):
                input_ids[r, : lengths[r]] = torch.tensor(self.ids[s])
                mask[r, : lengths[r]] = 1
                for p, slot in self.wanted[s]:
                    rows.append(r)
                    cols.append(p)
                    slots_all.append(slot)
            hidden = get_hidden_states(
                self.model,
                layers=list(self.cfg.layers),
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
            )
            r_idx = torch.tensor(rows, device=self.device)
            c_idx = torch.tensor(cols, device=self.device)
            for layer, h in hidden.items():
                v = h[r_idx, c_idx].float()
                if self.cfg.normalize:
                    v = torch.nn.functional.normalize(v, dim=-1)
                parts[layer].append(B.to_storage(v, self.storage).cpu())
            bar.update(len(batch))
        return torch.tensor(slots_all, dtype=torch.int64), {
            k: torch.cat(v) for k, v in parts.items()
        }

    def _write_shard(self, path: Path, part: tuple[torch.Tensor, dict[int, torch.Tensor]]) -> None:
        slots, vecs = part
        tensors = {"slots": slots.contiguous()}
        tensors.update({f"layer_{k}": v.contiguous() for k, v in vecs.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    def _read_shard(self, path: Path) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        with safe_open(str(path), framework="pt") as f:
            slots = f.get_tensor("slots")
            vecs = {layer: f.get_tensor(f"layer_{layer}") for layer in self.cfg.layers}
        return slots, vecs
