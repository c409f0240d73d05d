"""The judge's append-only verdict cache: one JSON line per answer, fsynced as it arrives.

A run that is killed loses at most the line being written; the reader skips a damaged
line, and the writer starts a fresh line after one. A success is final (that patch is
never sent again); a failure is retried by the next run. While a run holds the cache, a
second run on the same file is refused (``flock``), so two runs never bill the same patch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_FILE = "judge_cache.jsonl"


def read_cache(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``key → record`` from a cache file: the first success of a key, else its last failure.

    Lines that are not valid JSON objects with a ``key`` and a ``status`` (a line cut short
    by a crash) are skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return {}
    records: dict[str, dict[str, Any]] = {}
    bad = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key, status = rec["key"], rec["status"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if status == "ok" and records.get(key, {}).get("status") == "ok":
                continue  # the first success stands
            records[key] = rec
    if bad:
        log.warning("%s: skipped %d damaged line(s) (an interrupted write)", path, bad)
    return records


class JudgeCache:
    """An open cache file: load it, then append records from any thread.

    Use as a context manager; it holds an exclusive lock on the file while open.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: Any = None

    def __enter__(self) -> JudgeCache:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open for appending and take the lock.

        Raises:
            RuntimeError: another process holds this cache.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "ab")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RuntimeError(f"{self.path} is in use by another judge run") from None
        # A crash may have left a partial last line: start ours on a fresh one.
        if f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
                    f.flush()
        self._file = f

    def close(self) -> None:
        """Release the lock and close the file."""
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None

    def load(self) -> dict[str, dict[str, Any]]:
        """The records so far (see :func:`read_cache`)."""
        return read_cache(self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and make it durable before returning."""
        if self._file is None:
            raise RuntimeError("the cache is not open")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
