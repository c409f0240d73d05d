"""Reading caption corpora: .txt (one per line), .csv (first column), .jsonl, or a list."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

from latentlens.errors import CorpusError

_HEADER_PREFIXES = ("text", "sentence", "caption", "id", "index")
_JSONL_KEYS = ("text", "caption", "sentence")


def load_corpus(source: str | os.PathLike[str] | Iterable[str]) -> list[str]:
    """Load sentences, stripped, with blank ones dropped (duplicates are kept).

    Args:
        source: a path to ``.txt`` (one sentence per line), ``.csv`` (the first column; row 1
            is a header when its first cell, lower-cased, starts with text, sentence,
            caption, id or index), ``.jsonl`` (a string per line, or an object with a
            ``text``/``caption``/``sentence`` field), or an iterable of strings.

    Returns:
        The sentences in corpus order.

    Raises:
        CorpusError: missing file, unknown extension, malformed line, or no sentences.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CorpusError(f"corpus file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            lines = _read_csv(path)
        elif suffix in (".jsonl", ".ndjson"):
            lines = _read_jsonl(path)
        elif suffix in (".txt", ""):
            lines = _split_lines(path.read_text(encoding="utf-8"))
        else:
            raise CorpusError(
                f"corpus {path}: unknown extension {suffix!r} (use .txt, .csv or .jsonl)"
            )
        where = str(path)
    else:
        lines = list(source)
        bad = next((i for i, s in enumerate(lines) if not isinstance(s, str)), None)
        if bad is not None:
            raise CorpusError(f"corpus item {bad} is {type(lines[bad]).__name__}, not a string")
        where = "the given list"
    sentences = [s.strip() for s in lines if s.strip()]
    if not sentences:
        raise CorpusError(f"corpus {where} holds no non-blank sentences")
    return sentences


def _split_lines(text: str) -> list[str]:
    """Lines ended by \\n or \\r\\n only: U+2028, NEL, form feed etc. stay inside a line."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_csv(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0].strip().lower().startswith(_HEADER_PREFIXES):
        rows = rows[1:]
    return [r[0] for r in rows]


def _read_jsonl(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if isinstance(obj, str):
                out.append(obj)
            elif isinstance(obj, dict) and any(isinstance(obj.get(k), str) for k in _JSONL_KEYS):
                out.append(next(obj[k] for k in _JSONL_KEYS if isinstance(obj.get(k), str)))
            else:
                raise CorpusError(
                    f"{path}:{n}: expected a string or an object with one of {_JSONL_KEYS}"
                )
    return out
