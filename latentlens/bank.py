"""On-disk bank format (safetensors + JSON, no pickle) and safe reading of the legacy layout.

Our layout, one directory::

    config.json                 manifest: format, model, hidden size, layers, dtype, counts, build
    entries.safetensors         token_id, caption_id, position: int64 [M] (stored once)
    captions.json               list[str] indexed by caption_id
    tokens.json                 {token_id: token string}
    layer_XX.safetensors        "embeddings" [N, d]; optional "entry" int64 [N] → entries row

A layer without an "entry" key maps row i to entry i. Loading one layer reads only its file.

The original release's layout (``layer_N/embeddings_cache.pt`` + ``metadata.json``) is read
with ``torch.load(weights_only=True)``: a file whose unpickling would run code is refused.
"""

from __future__ import annotations

import json as _json
import logging
import pickle
import re
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from latentlens import __version__
from latentlens import constants as C
from latentlens.atomic import atomic_path, read_json, write_json
from latentlens.errors import BankFormatError, LayerNotFoundError
from latentlens.search.standardize import LayerStats

logger = logging.getLogger(__name__)

_MANIFEST_KEYS = {
    "format",
    "format_version",
    "latentlens_version",
    "model_name",
    "model_revision",
    "hidden_dim",
    "layers",
    "dtype",
    "normalized",
    "num_entries",
    "rows_per_layer",
    "build",
    "corpus",
    "embedding_hash",
    "bank_id",
}
BANK_ID_KEY = "bank_id"  # safetensors metadata key tying each file to one write


@dataclass(frozen=True)
class Entries:
    """Per-entry metadata shared by all layers.

    Attributes:
        token_id: ``[M]`` int64 vocabulary id of the token.
        caption_id: ``[M]`` int64 index into ``captions``.
        position: ``[M]`` int64 index of the token among its sentence's non-pad tokens.
        captions: the distinct captions.
        token_strs: decoded string of each token id that occurs.
        span: ``[M, 2]`` int64 character span of each token in its caption (``-1`` when
            unknown), or ``None``.
        span_source: ``"stored"`` (recorded at build time), ``"computed"`` (from a
            tokenizer, for banks without spans) or ``"none"``.
    """

    token_id: torch.Tensor
    caption_id: torch.Tensor
    position: torch.Tensor
    captions: list[str]
    token_strs: dict[int, str]
    span: torch.Tensor | None = None
    span_source: str = "none"

    def char_span(self, i: int) -> tuple[int, int] | None:
        """The character span of entry ``i`` in its caption, if known."""
        if self.span is None:
            return None
        start, end = (int(x) for x in self.span[i])
        return (start, end) if start >= 0 else None

    def __len__(self) -> int:
        return int(self.token_id.shape[0])

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Entries:
        """Build from dicts with ``token_str``, ``token_id``, ``caption``, ``position``."""
        caption_ids: dict[str, int] = {}
        token_strs: dict[int, str] = {}
        tid, cid, pos, spans = [], [], [], []
        for i, r in enumerate(records):
            try:
                t = int(r.get("token_id", -1))
                caption = str(r.get("caption", ""))
                p = int(r.get("position", -1))
                s = str(r["token_str"]) if "token_str" in r else None
            except (TypeError, ValueError, AttributeError) as e:
                raise BankFormatError(f"entry {i} is malformed ({e}): {r!r:.200}") from e
            if s is not None:
                prev = token_strs.setdefault(t, s)
                if prev != s and t == -1:
                    # Entries without ids: give each distinct string its own negative id.
                    t = -2 - len(token_strs)
                    token_strs[t] = s
            tid.append(t)
            cid.append(caption_ids.setdefault(caption, len(caption_ids)))
            pos.append(p)
            span = r.get("char_span")
            spans.append(tuple(int(x) for x in span) if span is not None else None)
        known = bool(spans) and all(x is not None and len(x) == 2 for x in spans)
        return cls(
            token_id=torch.tensor(tid, dtype=torch.int64),
            caption_id=torch.tensor(cid, dtype=torch.int64),
            position=torch.tensor(pos, dtype=torch.int64),
            captions=list(caption_ids),
            token_strs=token_strs,
            span=torch.tensor(spans, dtype=torch.int64).reshape(-1, 2) if known else None,
            span_source="stored" if known else "none",
        )

    def record(self, i: int) -> dict[str, Any]:
        """Entry ``i`` as a dict (token_str, token_id, caption, position; char_span when
        known)."""
        t = int(self.token_id[i])
        out: dict[str, Any] = {
            "token_str": self.token_strs.get(t, ""),
            "token_id": t,
            "caption": self.captions[int(self.caption_id[i])],
            "position": int(self.position[i]),
        }
        span = self.char_span(i)
        if span is not None:
            out["char_span"] = list(span)
        return out


def select_layers(available: Sequence[int], wanted: Sequence[int] | None, where: str) -> list[int]:
    """The requested layers (default: all), sorted and distinct.

    Raises:
        BankFormatError: ``where`` holds no layers.
        LayerNotFoundError: a requested layer is missing (the message lists the available).
    """
    if not available:
        raise BankFormatError(f"{where} holds no layers")
    if wanted is None:
        return sorted(available)
    chosen = sorted({int(x) for x in wanted})
    missing = [x for x in chosen if x not in available]
    if missing:
        raise LayerNotFoundError(
            f"layer(s) {missing} not in {where}; available: {sorted(available)}"
        )
    return chosen


def check_entry_map(
    idx: torch.Tensor | None, n_rows: int, n_entries: int, where: str
) -> torch.Tensor | None:
    """Validate a row → entry map (``None`` = identity); returns it as CPU int64.

    Every entry point that pairs rows with entries (index, sharded indexes, legacy reader)
    calls this one check.

    Raises:
        BankFormatError: wrong shape, or an index outside ``[0, n_entries)``.
    """
    if idx is None:
        if n_rows > n_entries:
            raise BankFormatError(f"{where} has {n_rows} rows but only {n_entries} entries")
        return None
    idx = idx.to("cpu", torch.int64)
    if idx.shape != (n_rows,):
        raise BankFormatError(
            f"{where}: entry map has shape {tuple(idx.shape)}, expected ({n_rows},)"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_entries):
        raise BankFormatError(
            f"{where}: entry map points outside the entry table (values "
            f"{int(idx.min())}..{int(idx.max())}, {n_entries} entries)"
        )
    return idx


def layer_path(root: Path, layer: int) -> Path:
    """Path of one layer's safetensors file."""
    return root / C.LAYER_FILE.format(layer=layer)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"fp16"``/``torch.float16`` → ``torch.float16`` (storage dtypes only)."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "fp32": "float32",
        "float": "float32",
        "fp8": "float8_e4m3fn",
        "float8": "float8_e4m3fn",
    }
    key = aliases.get(name.lower(), name.lower())
    if key not in C.STORAGE_DTYPES:
        raise ValueError(
            f"unsupported bank dtype {name!r}; choose one of {', '.join(C.STORAGE_DTYPES)}"
        )
    return getattr(torch, key)


def to_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast rows for storage; fp8 is clipped to ±448 first (e4m3fn has no inf)."""
    if dtype == getattr(torch, "float8_e4m3fn", None):
        x = x.float().clamp(-C.FP8_MAX, C.FP8_MAX)
    return x.to(dtype)


def new_bank_id() -> str:
    """A fresh id for one write of a bank: every file of that write carries it."""
    return uuid.uuid4().hex


def invalidate(root: Path) -> None:
    """Remove the manifest first: a directory being (re)written never loads as complete."""
    for name in (C.CONFIG_FILE, C.LEGACY_META_FILE):
        (root / name).unlink(missing_ok=True)


def write_entries(root: Path, entries: Entries, bank_id: str = "") -> None:
    """Write the shared entry table (atomically, file by file)."""
    with atomic_path(root / C.ENTRIES_FILE) as tmp:
        save_file(
            {
                "token_id": entries.token_id.contiguous(),
                "caption_id": entries.caption_id.contiguous(),
                "position": entries.position.contiguous(),
                **(
                    {"char_span": entries.span.contiguous()}
                    if entries.span is not None and entries.span_source == "stored"
                    else {}
                ),
            },
            str(tmp),
            metadata={BANK_ID_KEY: bank_id},
        )
    write_json(root / C.CAPTIONS_FILE, entries.captions, indent=None)
    write_json(
        root / C.TOKENS_FILE, {str(k): v for k, v in entries.token_strs.items()}, indent=None
    )


def write_layer(
    root: Path, layer: int, emb: torch.Tensor, entry: torch.Tensor | None, bank_id: str = ""
) -> None:
    """Write one layer file atomically (streamed rows are read in full first)."""
    if not isinstance(emb, torch.Tensor):
        emb = emb.read_all()
    tensors = {C.EMBEDDINGS_KEY: emb.detach().cpu().contiguous()}
    if entry is not None:
        tensors[C.ENTRY_KEY] = entry.detach().cpu().to(torch.int64).contiguous()
    with atomic_path(layer_path(root, layer)) as tmp:
        save_file(tensors, str(tmp), metadata={"layer": str(layer), BANK_ID_KEY: bank_id})


def write_stats(root: Path, stats: Mapping[int, LayerStats], bank_id: str = "") -> None:
    """Write each layer's :class:`LayerStats` (atomic)."""
    tensors, meta = {}, {BANK_ID_KEY: bank_id}
    for layer, st in stats.items():
        tensors[f"mean_{layer}"] = st.mean.detach().cpu().to(torch.float64).contiguous()
        tensors[f"std_{layer}"] = st.std.detach().cpu().to(torch.float64).contiguous()
        meta[f"count_{layer}"] = str(int(st.count))
    with atomic_path(root / C.STATS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_stats(root: Path, layers: Sequence[int], bank_id: str | None) -> dict[int, LayerStats]:
    """The stored statistics of ``layers`` written with this bank (others: absent).

    A file of another write (``bank_id`` differs) or an unreadable one is ignored: the
    statistics are then computed from the rows.
    """
    path = root / C.STATS_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if bank_id and meta.get(BANK_ID_KEY) != bank_id:
                return {}
            keys = set(f.keys())
            return {
                layer: LayerStats(
                    f.get_tensor(f"mean_{layer}"),
                    f.get_tensor(f"std_{layer}"),
                    int(meta.get(f"count_{layer}", 0)),
                )
                for layer in layers
                if f"mean_{layer}" in keys and f"std_{layer}" in keys
            }
    except SafetensorError:
        return {}


_ST_DTYPES = {
    torch.float64: ("F64", torch.int64),
    torch.float32: ("F32", torch.int32),
    torch.float16: ("F16", torch.int16),
    torch.bfloat16: ("BF16", torch.int16),
    torch.float8_e4m3fn: ("F8_E4M3", torch.int8),
}


class LayerWriter:
    """Write one layer file row by row in any order, without holding the layer in memory.

    The safetensors file (``embeddings`` ``[n, d]``) is laid out on disk first and rows are
    placed through a memory map; on success it is renamed into place (atomic). Every row
    must be written exactly once.
    """

    def __init__(
        self, root: Path, layer: int, n: int, d: int, dtype: torch.dtype, bank_id: str = ""
    ) -> None:
        """Prepare ``layer``'s file for ``n`` rows of width ``d`` stored as ``dtype``."""
        self.bank_id = bank_id
        if dtype not in _ST_DTYPES:
            raise ValueError(f"cannot stream-write dtype {dtype}")
        self.path, self.layer, self.n, self.d, self.dtype = (
            layer_path(root, layer),
            layer,
            n,
            d,
            dtype,
        )
        self._seen = torch.zeros(n, dtype=torch.bool)

    def __enter__(self) -> LayerWriter:

        import numpy as np

        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        name, self._int = _ST_DTYPES[self.dtype]
        nbytes = self.n * self.d * torch.empty(0, dtype=self.dtype).element_size()
        header = _json.dumps(
            {
                C.EMBEDDINGS_KEY: {
                    "dtype": name,
                    "shape": [self.n, self.d],
                    "data_offsets": [0, nbytes],
                },
                "__metadata__": {"layer": str(self.layer), BANK_ID_KEY: self.bank_id},
            },
            separators=(",", ":"),
        ).encode()
        header += b" " * (-len(header) % 8)
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            f.truncate(8 + len(header) + nbytes)
        np_dtype = {
            torch.int64: np.int64,
            torch.int32: np.int32,
            torch.int16: np.int16,
            torch.int8: np.int8,
        }
        self._mm = (
            np.memmap(
                tmp,
                mode="r+",
                dtype=np_dtype[self._int],
                offset=8 + len(header),
                shape=(self.n, self.d),
            )
            if self.n
            else None
        )
        return self

    def put(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Place ``rows`` ``[m, d]`` (already in the storage dtype) at row indices ``slots``."""
        if rows.dtype != self.dtype or rows.shape != (slots.numel(), self.d):
            raise ValueError(
                f"expected [{slots.numel()}, {self.d}] {self.dtype}, got {tuple(rows.shape)} {rows.dtype}"
            )
        if bool(self._seen[slots].any()) or slots.unique().numel() != slots.numel():
            raise ValueError(f"layer {self.layer}: a row was written twice")
        self._seen[slots] = True
        if self._mm is not None:
            self._mm[slots.numpy()] = rows.contiguous().view(self._int).numpy()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._mm is not None:
            self._mm.flush()
            del self._mm
        if exc_type is None and not bool(self._seen.all()):
            missing = int((~self._seen).sum())
            exc = BankFormatError(
                f"layer {self.layer}: {missing} of {self.n} rows were never written"
            )
            self._ctx.__exit__(type(exc), exc, None)
            raise exc
        self._ctx.__exit__(exc_type, exc, tb)


def make_manifest(
    *,
    hidden_dim: int,
    layers: Sequence[int],
    dtype: torch.dtype,
    num_entries: int,
    rows_per_layer: Mapping[int, int],
    extra: Mapping[str, Any] | None = None,
    bank_id: str = "",
) -> dict[str, Any]:
    """The ``config.json`` content of a bank (known keys of ``extra`` are kept)."""

    manifest = {k: v for k, v in (extra or {}).items() if k in _MANIFEST_KEYS}
    manifest.update(
        format=C.FORMAT_NAME,
        format_version=C.FORMAT_VERSION,
        latentlens_version=__version__,
        hidden_dim=int(hidden_dim),
        layers=sorted(int(x) for x in layers),
        dtype=dtype_name(dtype),
        num_entries=int(num_entries),
        rows_per_layer={str(k): int(v) for k, v in sorted(rows_per_layer.items())},
        bank_id=bank_id,
    )
    manifest.setdefault("model_name", "")
    return manifest


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Write config.json last: its presence marks a complete bank.

    Also writes the original release's ``metadata.json`` (layers, hidden_dim), so tools
    written for it can discover the layers.
    """
    write_json(root / C.CONFIG_FILE, dict(manifest))
    write_json(
        root / C.LEGACY_META_FILE,
        {"layers": list(manifest["layers"]), "hidden_dim": int(manifest["hidden_dim"])},
    )


def _file_bank_id(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(BANK_ID_KEY)
    except (SafetensorError, OSError) as e:
        raise BankFormatError(f"{path} is not a readable safetensors file: {e}") from e


def check_consistent(root: Path, manifest: Mapping[str, Any], layers: Sequence[int]) -> None:
    """Cross-check the entry table and layer files against the manifest before use.

    Every file of one write carries the manifest's ``bank_id``; a file left by another
    (interrupted) write, or a row count that disagrees, is refused.

    Raises:
        BankFormatError: a file from another write, or counts that disagree.
    """
    bank_id = manifest.get("bank_id")
    if bank_id:
        for path in [root / C.ENTRIES_FILE, *(layer_path(root, x) for x in layers)]:
            if path.exists() and _file_bank_id(path) != bank_id:
                raise BankFormatError(
                    f"{path.name} in {root} comes from another write of this bank (an "
                    "interrupted save or rebuild?): its rows and entries may disagree. "
                    "Rebuild or re-save the bank."
                )


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and check ``config.json``; warn on and drop unknown keys."""
    path = root / C.CONFIG_FILE
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise BankFormatError(f"{root} has no {C.CONFIG_FILE}: not a latentlens bank") from None
    except ValueError as e:
        raise BankFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BankFormatError(f"{path} must hold a JSON object")
    unknown = set(manifest) - _MANIFEST_KEYS
    if unknown:
        logger.warning("ignoring unknown keys in %s: %s", path, sorted(unknown))
        manifest = {k: v for k, v in manifest.items() if k in _MANIFEST_KEYS}
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    if not major.isdigit():
        raise BankFormatError(f"{path}: missing or malformed format_version {version!r}")
    if int(major) > int(C.FORMAT_VERSION.split(".")[0]):
        raise BankFormatError(
            f"{path} has format_version {version}, newer than this latentlens reads "
            f"({C.FORMAT_VERSION}); upgrade latentlens"
        )
    for key in ("hidden_dim", "layers"):
        if key not in manifest:
            raise BankFormatError(f"{path} lacks the required key {key!r}")
    manifest["layers"] = [int(x) for x in manifest["layers"]]
    return manifest


def read_entries(root: Path) -> Entries:
    """Read the shared entry table."""
    for name in (C.ENTRIES_FILE, C.CAPTIONS_FILE, C.TOKENS_FILE):
        if not (root / name).exists():
            raise BankFormatError(f"bank {root} is incomplete: missing {name}")
    try:
        with safe_open(str(root / C.ENTRIES_FILE), framework="pt") as f:
            cols = {k: f.get_tensor(k) for k in ("token_id", "caption_id", "position")}
            span = f.get_tensor("char_span") if "char_span" in f.keys() else None
        captions = read_json(root / C.CAPTIONS_FILE)
        tokens = read_json(root / C.TOKENS_FILE)
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise BankFormatError(f"bank {root} has a corrupt entry table: {e}") from e
    if not isinstance(captions, list) or not isinstance(tokens, dict):
        raise BankFormatError(f"bank {root}: captions.json must be a list, tokens.json an object")
    n = cols["token_id"].shape[0]
    if cols["caption_id"].shape[0] != n or cols["position"].shape[0] != n:
        raise BankFormatError(f"bank {root}: entry columns have different lengths")
    if n and int(cols["caption_id"].max()) >= len(captions):
        raise BankFormatError(f"bank {root}: caption_id points past captions.json")
    for key in ("caption_id", "position"):
        if n and int(cols[key].min()) < 0:
            raise BankFormatError(f"bank {root}: negative {key} in the entry table")
    if span is not None and tuple(span.shape) != (n, 2):
        raise BankFormatError(f"bank {root}: char_span is {tuple(span.shape)}, not [{n}, 2]")
    return Entries(
        token_id=cols["token_id"].to(torch.int64),
        caption_id=cols["caption_id"].to(torch.int64),
        position=cols["position"].to(torch.int64),
        captions=[str(c) for c in captions],
        token_strs={int(k): str(v) for k, v in tokens.items()},
        span=span.to(torch.int64) if span is not None else None,
        span_source="stored" if span is not None else "none",
    )


def read_layer(
    root: Path,
    layer: int,
    *,
    device: torch.device | str = "cpu",
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read one layer's rows (optionally only ``rows=(start, stop)``) without touching others.

    Returns:
        ``(embeddings [N, d], entry [N] int64 or None)``.
    """
    path = layer_path(root, layer)
    if not path.exists():
        raise BankFormatError(f"bank {root} is missing {path.name} (layer {layer})")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            if C.EMBEDDINGS_KEY not in keys:
                raise BankFormatError(f"{path} has no {C.EMBEDDINGS_KEY!r} tensor")
            if rows is None:
                emb = f.get_tensor(C.EMBEDDINGS_KEY)
                entry = f.get_tensor(C.ENTRY_KEY) if C.ENTRY_KEY in keys else None
            else:
                emb = f.get_slice(C.EMBEDDINGS_KEY)[rows[0] : rows[1]]
                entry = f.get_slice(C.ENTRY_KEY)[rows[0] : rows[1]] if C.ENTRY_KEY in keys else None
    except SafetensorError as e:
        raise BankFormatError(f"{path} is not a readable safetensors file: {e}") from e
    if emb.ndim != 2:
        raise BankFormatError(f"{path}: embeddings must be 2-D [N, d], got {tuple(emb.shape)}")
    return emb, (entry.to(torch.int64) if entry is not None else None)


def layer_rows(root: Path, layer: int) -> tuple[int, torch.Tensor | None]:
    """Row count of a layer and its entry map, without reading its embeddings."""
    path = layer_path(root, layer)
    if not path.exists():
        raise BankFormatError(f"bank {root} is missing {path.name} (layer {layer})")
    try:
        with safe_open(str(path), framework="pt") as f:
            n = int(f.get_slice(C.EMBEDDINGS_KEY).get_shape()[0])
            entry = (
                f.get_tensor(C.ENTRY_KEY).to(torch.int64) if C.ENTRY_KEY in set(f.keys()) else None
            )
    except SafetensorError as e:
        raise BankFormatError(f"{path} is not a readable safetensors file: {e}") from e
    return n, entry


# ── legacy layout ─────────────────────────────────────────────────────────────────────

_LEGACY_DIR = re.compile(r"^layer_(\d+)$")


def is_legacy(root: Path) -> bool:
    """Whether ``root`` holds the original release's layout."""
    return not (root / C.CONFIG_FILE).exists() and any(legacy_layers(root))


def is_partial(root: Path) -> bool:
    """Whether ``root`` holds pieces of our layout without its manifest (an interrupted write)."""
    return not (root / C.CONFIG_FILE).exists() and (
        (root / C.ENTRIES_FILE).exists() or any(root.glob("layer_*.safetensors"))
    )


def legacy_layers(root: Path) -> list[int]:
    """Layers present as ``layer_N/embeddings_cache.pt``."""
    found = []
    for p in root.glob("layer_*"):
        m = _LEGACY_DIR.match(p.name)
        if m and (p / "embeddings_cache.pt").exists():
            found.append(int(m.group(1)))
    return sorted(found)


MAX_INFLATION = 2.0  # uncompressed size a legacy .pt may claim, as a multiple of the file


def check_inflation(path: Path, limit: float = MAX_INFLATION) -> None:
    """Refuse a zip-format torch file whose records inflate far past its size on disk.

    ``torch.save`` stores records uncompressed, so a genuine file inflates to about its own
    size; a small file claiming gigabytes (compressed records) is refused before anything
    is allocated.
    """
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            claimed = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise BankFormatError(f"{path} is not a readable torch file: {e}") from e
    if claimed > limit * size + 2**20:
        raise BankFormatError(
            f"refusing to load {path}: its records claim {claimed:,} bytes uncompressed, "
            f"{claimed / max(size, 1):.0f}× the file's {size:,} bytes (torch.save writes "
            "uncompressed records; this file is not one)"
        )


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with weights-only unpickling, bounded in size; never runs code."""
    check_inflation(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BankFormatError(
            f"refusing to load {path}: it holds pickled objects outside the safe set "
            f"(tensors, dicts, lists, str, numbers), so reading it could run code. "
            f"Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise BankFormatError(f"{path} is not a readable torch file: {e}") from e


def load_legacy_layer(path: Path) -> tuple[torch.Tensor, list[Mapping[str, Any]]]:
    """Read one ``embeddings_cache.pt`` → ``(embeddings [N, d], metadata dicts)``."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "embeddings" not in obj or "metadata" not in obj:
        raise BankFormatError(f"{path}: expected a dict with 'embeddings' and 'metadata'")
    emb, meta = obj["embeddings"], obj["metadata"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise BankFormatError(f"{path}: 'embeddings' must be a 2-D tensor")
    if not isinstance(meta, list) or len(meta) != emb.shape[0]:
        raise BankFormatError(
            f"{path}: 'metadata' must be a list with one dict per row "
            f"({emb.shape[0]} rows, got {type(meta).__name__} of {len(meta) if isinstance(meta, list) else '?'})"
        )
    return emb, meta


def merge_legacy(
    per_layer: Mapping[int, Sequence[Mapping[str, Any]]],
) -> tuple[Entries, dict[int, torch.Tensor | None]]:
    """Combine per-layer metadata lists into one entry table plus per-layer row maps.

    Layers whose metadata match the first layer's row for row share it (map ``None``).
    """
    layers = sorted(per_layer)
    keyed: dict[tuple[Any, ...], int] = {}
    records: list[Mapping[str, Any]] = []
    maps: dict[int, torch.Tensor | None] = {}
    for layer in layers:
        idx = []
        for r in per_layer[layer]:
            if not isinstance(r, Mapping):
                raise BankFormatError(
                    f"layer {layer}: metadata rows must be dicts, got {type(r).__name__}"
                )
            key = (r.get("token_id"), r.get("token_str"), r.get("caption"), r.get("position"))
            if key not in keyed:
                keyed[key] = len(records)
                records.append(r)
            idx.append(keyed[key])
        maps[layer] = None if idx == list(range(len(idx))) else torch.tensor(idx, dtype=torch.int64)
    return Entries.from_records(records), maps
