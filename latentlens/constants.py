"""Artifact file names and format versions shared by writers and readers."""

from __future__ import annotations

FORMAT_NAME = "latentlens-bank"
FORMAT_VERSION = "1.1"  # major.minor; a newer major is refused on load (1.1: char_span)

CONFIG_FILE = "config.json"
ENTRIES_FILE = "entries.safetensors"  # token_id, caption_id, position: int arrays [N]
CAPTIONS_FILE = "captions.json"  # list[str], indexed by caption_id
TOKENS_FILE = "tokens.json"  # {token_id: decoded token string}
LAYER_FILE = "layer_{layer:02d}.safetensors"  # key "embeddings" [N, d]; optional "entry" [N]
STATS_FILE = "stats.safetensors"  # per layer "mean_{L}", "std_{L}": float64 [d] of the rows
EMBEDDINGS_KEY = "embeddings"
ENTRY_KEY = "entry"

LEGACY_META_FILE = "metadata.json"
LEGACY_LAYER_FILE = "layer_{layer}/embeddings_cache.pt"

STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn")
FP8_MAX = 448.0
