"""Build a contextual bank from a causal LM: plan entries, run batches, stream shards, merge.

A build with ``output_dir`` is resumable: the plan (which sentence/position fills which
slot) is derived from the corpus and settings alone, batches are grouped into numbered
shards written atomically under ``output_dir/.build/``, and a restarted build skips the
shards already on disk. The final bank (one file per layer) is written from the shards,
so an interrupted-and-resumed build equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
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
from latentlens.models.defaults import default_layers_for
from latentlens.models.hooks import get_hidden_states
from latentlens.models.loading import default_compute_dtype, load_model
from latentlens.models.registry import num_layers
from latentlens.search.standardize import RunningStats
from latentlens.selection import Plan, Sampling, plan_entries
from latentlens.spans import tokenize_with_spans

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


_PAPER = {
    "cap": 20,
    "sampling": "reservoir",
    "skip_first": 0,
    "dedup": False,
    "normalize": False,
    "storage_dtype": "float8_e4m3fn",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything besides the model and corpus that determines a bank (its manifest's "build").

    Two presets follow the paper (SPEC §2): :meth:`library` (the original
    ``build_index`` defaults) and :meth:`paper` (the extraction behind the paper's banks).

    Attributes:
        layers: hidden-state indices (0 = embeddings, i = output of block i); ``None``:
            the model's ``MODEL_DEFAULTS`` entry, else :func:`auto_layers`.
        cap: entries per decoded token string (``None``: no cap).
        sampling: ``"first"`` (first come first served) or ``"reservoir"`` (Algorithm R,
            seeded once with ``seed``).
        skip_first: positions skipped at the start of each sentence (BOS counts).
        dedup: prefix deduplication (identical prefixes give identical states).
        normalize: L2-normalise rows before storage.
        storage_dtype: float16, bfloat16, float32 or float8_e4m3fn (clipped ±448).
        seed: the reservoir's seed.
        max_length: sentences are truncated to this many tokens.
        batch_size: sentences per forward pass (length-sorted to minimise padding).
        shard_sentences: sentences per resumable shard.
    """

    layers: tuple[int, ...] | None = None
    cap: int | None = 50
    sampling: Sampling = "first"
    skip_first: int = 2
    dedup: bool = True
    normalize: bool = True
    storage_dtype: str = "float16"
    seed: int = 42
    max_length: int = 512
    batch_size: int = 32
    shard_sentences: int = 1000

    def __post_init__(self) -> None:  # noqa: D105
        if self.layers is not None:
            if not list(self.layers):
                raise ValueError("layers=[] selects no layer; pass None for the defaults")
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        object.__setattr__(self, "storage_dtype", B.dtype_name(B.parse_dtype(self.storage_dtype)))
        if self.sampling not in ("first", "reservoir"):
            raise ValueError(f"sampling must be 'first' or 'reservoir', got {self.sampling!r}")
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"cap must be >= 1 or None, got {self.cap}")
        for name in ("skip_first", "max_length", "batch_size", "shard_sentences"):
            value = getattr(self, name)
            low = 0 if name == "skip_first" else 1
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def library(cls, **changes: Any) -> BuildConfig:
        """The original ``build_index`` defaults: skip 0-1, prefix dedup, first 50, unit fp16."""
        return cls(**changes)

    @classmethod
    def paper(cls, **changes: Any) -> BuildConfig:
        """The paper's banks: no skip, no dedup, reservoir of 20 (seed 42), raw fp8 rows."""
        return cls(**{**_PAPER, **changes})

    def replace(self, **changes: Any) -> BuildConfig:
        """A copy with some fields changed.

        Raises:
            TypeError: a name that is not a field (the message lists the fields).
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unknown build setting(s) {unknown}; BuildConfig fields: {sorted(names)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


_FROM_CONFIG: Any = object()  # "not given": take the value from the BuildConfig


def build_index(
    model_name: str | None = None,
    corpus: str | os.PathLike[str] | Iterable[str] | None = None,
    layers: Sequence[int] | None = None,
    max_contexts_per_token: int | None = _FROM_CONFIG,
    batch_size: int = _FROM_CONFIG,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    *,
    config: BuildConfig | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    mmap: bool = False,
    **settings: Any,
) -> ContextualIndex:
    """Build a bank of contextual token embeddings from a causal LM and a corpus.

    The first eight parameters are the original release's. What the bank holds is a
    :class:`BuildConfig` (default :meth:`BuildConfig.library`; the paper's is
    :meth:`BuildConfig.paper`); ``layers``, ``max_contexts_per_token`` (its ``cap``),
    ``batch_size`` and any further keyword named like a field (``sampling=``,
    ``storage_dtype=``, ...) override it.

    Args:
        model_name: Hub id or local path (loaded with :func:`latentlens.models.load_model`
            unless ``model`` is given; then only recorded).
        corpus: path (.txt/.csv/.jsonl) or list of sentences.
        layers: hidden-state indices (0 = embeddings, i = output of block i); default: the
            config's, else the ``default_layers`` of ``model_name``'s
            ``latentlens.MODEL_DEFAULTS`` entry, else :func:`auto_layers`.
        max_contexts_per_token: cap per decoded token string (``None``: no cap); default
            the config's (50 library, 20 paper).
        batch_size: sentences per forward pass; default the config's (32).
        device: where the model runs (default CUDA if available, else CPU).
        dtype: model compute dtype when loading (default bf16 on a CUDA GPU that supports it,
            else fp16; fp32 on CPU, where half-precision matmuls have no fast kernels).
        show_progress: a tqdm bar over sentences.
        config: the build settings (see :class:`BuildConfig`).
        model, tokenizer: an already-loaded model and tokenizer.
        output_dir: stream shards here and write the final bank; enables resume.
        resume: reuse compatible shards of an interrupted build in ``output_dir``.
        mmap: with ``output_dir``, return the bank streamed from disk (see
            :meth:`ContextualIndex.from_directory`) instead of loading it into memory.
        **settings: :class:`BuildConfig` fields overriding ``config``.

    Returns:
        The :class:`ContextualIndex` (rows on CPU).

    Raises:
        CorpusError: empty or unreadable corpus.
        TypeError: an unknown setting.
        ValueError: bad layers or settings.
    """
    if corpus is None:
        raise CorpusError("build_index needs a corpus (a file path or a list of sentences)")
    cfg = config or BuildConfig.library()
    if layers is not None:
        settings["layers"] = layers
    if max_contexts_per_token is not _FROM_CONFIG:
        settings["cap"] = max_contexts_per_token
    if batch_size is not _FROM_CONFIG:
        settings["batch_size"] = batch_size
    cfg = cfg.replace(**settings)
    sentences = load_corpus(corpus)
    if model is None:
        if not model_name:
            raise LatentLensError("give a model name or an already-loaded model=")
        run_device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = default_compute_dtype(run_device)
        model, tokenizer = load_model(model_name, device=run_device, dtype=dtype)
    elif tokenizer is None:
        raise LatentLensError("model= was given without tokenizer=")
    else:
        run_device = torch.device(device) if device is not None else _model_device(model)
        model = model.to(run_device).eval()
    assert model is not None
    n_layers = num_layers(model)
    chosen = cfg.layers or default_layers_for(model_name) or auto_layers(n_layers)
    bad = [x for x in chosen if not 0 <= x <= n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{n_layers}")
    cfg = cfg.replace(layers=tuple(chosen))
    name = model_name or getattr(model.config, "_name_or_path", "") or ""
    ids, offsets = tokenize_with_spans(tokenizer, sentences, cfg.max_length)
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
    builder = _Builder(model, cfg, ids, plan, show_progress)
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
    caption_id = torch.tensor(plan.sentence, dtype=torch.int64)
    position = torch.tensor(plan.position, dtype=torch.int64)
    span = offsets.spans(sentences, caption_id, position) if offsets is not None else None
    entries = B.Entries(
        token_id=torch.tensor(plan.token_id, dtype=torch.int64),
        caption_id=caption_id,
        position=position,
        captions=sentences,
        token_strs={t: decode(t) for t in set(plan.token_id)},
        span=span,
        span_source="stored" if span is not None else "none",
    )
    entries = _compact_captions(entries)
    manifest = {
        "model_name": name,
        "normalized": cfg.normalize,
        "build": {"model_name": name, **cfg.to_dict()},
        # what the bank was built from (a model card shows it)
        "corpus": {
            "source": Path(corpus).name if isinstance(corpus, (str, os.PathLike)) else "a list",
            "sentences": len(sentences),
        },
    }
    if vectors is not None:
        return ContextualIndex(vectors, entries, manifest=manifest)
    assert root is not None  # streamed to disk: write the entry table and manifest last
    B.write_entries(root, entries, builder.bank_id)
    B.write_manifest(
        root,
        B.make_manifest(
            hidden_dim=builder.hidden_dim,
            layers=chosen,
            dtype=B.parse_dtype(cfg.storage_dtype),
            num_entries=len(entries),
            rows_per_layer=dict.fromkeys(chosen, len(entries)),
            extra=manifest,
            bank_id=builder.bank_id,
        ),
    )
    shutil.rmtree(root / _BUILD_DIR, ignore_errors=True)
    D.barrier()
    return ContextualIndex.from_directory(root, mmap=mmap)


def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each sentence with the tokenizer's own special tokens (e.g. BOS)."""
    return tokenize_with_spans(tokenizer, sentences, max_length, spans=False)[0]


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
    return dataclasses.replace(
        entries,
        caption_id=remap[entries.caption_id],
        captions=[entries.captions[i] for i in used.tolist()],
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
        show_progress: bool,
    ) -> None:
        self.model, self.cfg, self.ids, self.plan = model, cfg, ids, plan
        self.batch_size = cfg.batch_size
        shard_sentences = cfg.shard_sentences
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
        # the per-dimension statistics of the stored rows, for standardised search
        stats = {layer: RunningStats(v.shape[1]) for layer, v in first[1].items()}
        with contextlib.ExitStack() as stack:
            for w in writers.values():
                stack.enter_context(w)
            for i in range(len(self.shards)):
                slots, vecs = (
                    first if i == 0 else self._read_shard(build / f"shard_{i:05d}.safetensors")
                )
                for layer, v in vecs.items():
                    writers[layer].put(slots, v)
                    stats[layer].update(v)
        B.write_stats(root, {k: v.result() for k, v in stats.items()}, self.bank_id)
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
