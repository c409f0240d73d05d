"""The evaluation images: PixMo-Cap validation from the Hub, or a local JSONL / parquet / folder.

SPEC §7 takes PixMo-Cap validation images in index order. The Hub dataset
(``allenai/pixmo-cap``) has one ``train`` split of (``image_url``, ``caption``) rows;
Molmo's validation split is ``train_test_split(test_size=2048, seed=96817)`` of it, i.e.
validation row ``i`` is train row ``permutation[i]`` of ``numpy.random.default_rng(96817)``.
We apply that recipe to the full listing. (Molmo split the rows whose images it could
download at the time; URLs have died since, so the split cannot be recovered exactly.)

The listing is read without extra dependencies through the Hub's dataset-viewer API (one
small request per row, cached as JSONL), or from a local file. Images are fetched with
urllib into a content-addressed cache, checked by decoding them, and linked into the
run's image folder as ``00012.jpg`` (the name the judge looks for). Images that fail are
skipped and logged; the next index is taken until ``n`` images are in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentlens.atomic import atomic_path, write_json
from latentlens.errors import LatentLensError

logger = logging.getLogger(__name__)

PIXMO_CAP = "allenai/pixmo-cap"
MOLMO_VAL_SIZE = 2048
MOLMO_SPLIT_SEED = 96817
DATASET_VIEWER = "https://datasets-server.huggingface.co"
VIEWER_ENV = "LATENTLENS_DATASET_VIEWER"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_BYTES = 64 * 2**20
USER_AGENT = "latentlens-reproduce/0.1 (+https://github.com/McGill-NLP/latentlens)"


class ImageSourceError(LatentLensError):
    """The image listing cannot be read (missing file, no network while offline, bad rows)."""


@dataclass(frozen=True)
class ImageRow:
    """One listed image: its dataset index, where it comes from (URL or path), its caption."""

    index: int
    source: str
    caption: str = ""


@dataclass(frozen=True)
class ImageRecord:
    """One image ready for the lenses: ``path`` is ``<images>/<index:05d>.<ext>``."""

    index: int
    path: str
    caption: str
    source: str


# ── listings ────────────────────────────────────────────────────────────────────────────


def molmo_validation_order(n_rows: int, n_val: int = MOLMO_VAL_SIZE) -> list[int]:
    """Train-row indices of Molmo's PixMo-Cap validation split, in validation order.

    ``datasets.Dataset.train_test_split(test_size=n_val, seed=96817)`` draws
    ``numpy.random.default_rng(96817).permutation(n_rows)`` and takes its first ``n_val``
    entries as the test (validation) split.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    perm = np.random.default_rng(MOLMO_SPLIT_SEED).permutation(n_rows)
    return [int(x) for x in perm[: min(n_val, n_rows)]]


def _row_from_dict(obj: Any, position: int) -> ImageRow:
    if not isinstance(obj, dict):
        raise ImageSourceError(f"row {position}: expected a JSON object, got {type(obj).__name__}")
    source = next(
        (obj[k] for k in ("image", "image_url", "url", "path", "file") if obj.get(k)), None
    )
    if not isinstance(source, str):
        raise ImageSourceError(f"row {position}: no 'image' / 'image_url' / 'path' field")
    caption = obj.get("caption") or obj.get("text") or ""
    index = obj.get("index", obj.get("image_idx", position))
    return ImageRow(int(index), source, str(caption))


def read_listing(path: str | os.PathLike[str]) -> list[ImageRow]:
    """Rows of a local listing, in file order.

    - ``.jsonl``: one object per line with ``image`` (a path, relative to the file, or a
      URL) or ``image_url``, optional ``caption`` and ``index`` (default: the line number
      among non-empty lines);
    - ``.parquet``: the same columns (needs ``pyarrow``), e.g. PixMo-Cap's own files;
    - a folder: its images sorted by name; the index is the file stem when every stem is
      a number, else the position; a ``captions.jsonl`` beside them may give captions.

    Raises:
        ImageSourceError: missing or unreadable listing.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return _folder_rows(p)
    if not p.is_file():
        raise ImageSourceError(f"image listing {p} does not exist")
    if p.suffix == ".parquet":
        rows = _parquet_rows(p)
    else:
        rows = []
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(_row_from_dict(json.loads(line), len(rows)))
                    except ValueError as e:
                        raise ImageSourceError(f"{p}: line {len(rows) + 1}: {e}") from e
    return [_resolve_local(r, p.parent) for r in rows]


def _resolve_local(row: ImageRow, base: Path) -> ImageRow:
    if _is_url(row.source) or Path(row.source).is_absolute():
        return row
    return ImageRow(row.index, str((base / row.source).resolve()), row.caption)


def _parquet_rows(path: Path) -> list[ImageRow]:
    try:
        import pyarrow.parquet as pq  # pyright: ignore[reportMissingImports]  # optional
    except ImportError as e:
        raise ImageSourceError(
            f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL"
        ) from e
    table = pq.read_table(path)
    return [_row_from_dict(obj, i) for i, obj in enumerate(table.to_pylist())]


def _folder_rows(folder: Path) -> list[ImageRow]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageSourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    numeric = all(f.stem.isdigit() for f in files)
    captions: dict[str, str] = {}
    side = folder / "captions.jsonl"
    if side.is_file():
        for line in side.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                captions[Path(str(obj.get("image", ""))).name] = str(obj.get("caption", ""))
    return [
        ImageRow(int(f.stem) if numeric else i, str(f.resolve()), captions.get(f.name, ""))
        for i, f in enumerate(files)
    ]


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class HubListing:
    """PixMo-Cap's validation rows through the Hub's dataset-viewer API, cached as JSONL.

    Validation row ``i`` is train row ``molmo_validation_order(n)[i]``. Each train row is
    fetched once (``/rows?offset=…&length=1``) and appended to ``<cache>/listing.jsonl``;
    offline (``HF_HUB_OFFLINE=1``) only the cache is read.

    Args:
        cache_dir: where ``listing.jsonl`` lives.
        dataset: the Hub dataset (train split, ``default`` config).
        endpoint: the dataset-viewer root (env ``LATENTLENS_DATASET_VIEWER`` overrides).
        timeout: seconds per request.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        dataset: str = PIXMO_CAP,
        endpoint: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        self.cache = Path(cache_dir)
        self.dataset = dataset
        self.endpoint = (endpoint or os.environ.get(VIEWER_ENV) or DATASET_VIEWER).rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.path = self.cache / "listing.jsonl"
        self._rows: dict[int, dict[str, Any]] = {}
        self._n_rows: int | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if "num_rows" in obj:
                self._n_rows = int(obj["num_rows"])
            elif "row_idx" in obj:
                self._rows[int(obj["row_idx"])] = obj

    def _append(self, obj: dict[str, Any]) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def _get(self, route: str, **params: Any) -> Any:
        if _offline():
            raise ImageSourceError(
                f"the PixMo-Cap listing is not cached in {self.path} and HF_HUB_OFFLINE is set"
            )
        url = f"{self.endpoint}/{route}?" + urllib.parse.urlencode(
            {"dataset": self.dataset, **params}
        )
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
                if isinstance(e, urllib.error.HTTPError) and e.code not in (429, 500, 502, 503):
                    break
                time.sleep(min(2.0**attempt, 30.0))
        raise ImageSourceError(f"dataset viewer request {url} failed: {last}")

    def num_rows(self) -> int:
        """Rows of the train split (asked once, then cached)."""
        if self._n_rows is None:
            info = self._get("size")
            splits = info.get("size", {}).get("splits", [])
            train = [s for s in splits if s.get("split") == "train"]
            if not train:
                raise ImageSourceError(f"{self.dataset}: the viewer reports no train split")
            self._n_rows = int(train[0]["num_rows"])
            self._append({"num_rows": self._n_rows})
        return self._n_rows

    def train_row(self, row_idx: int) -> dict[str, Any]:
        """``{"row_idx", "image_url", "caption"}`` of one train row."""
        if row_idx not in self._rows:
            data = self._get("rows", config="default", split="train", offset=row_idx, length=1)
            rows = data.get("rows", [])
            if not rows:
                raise ImageSourceError(f"{self.dataset}: no train row {row_idx}")
            row = rows[0].get("row", {})
            obj = {
                "row_idx": row_idx,
                "image_url": str(row.get("image_url", "")),
                "caption": str(row.get("caption", "")),
            }
            self._rows[row_idx] = obj
            self._append(obj)
        return self._rows[row_idx]

    def rows(self) -> Iterator[ImageRow]:
        """Validation rows in index order (fetched lazily)."""
        for i, row_idx in enumerate(molmo_validation_order(self.num_rows())):
            row = self.train_row(row_idx)
            yield ImageRow(i, row["image_url"], row["caption"])


def molmo_split(rows: Sequence[ImageRow]) -> list[ImageRow]:
    """Molmo's validation split of a full PixMo-Cap train listing, re-indexed 0..2047."""
    order = molmo_validation_order(len(rows))
    return [ImageRow(i, rows[j].source, rows[j].caption) for i, j in enumerate(order)]


# ── fetching ────────────────────────────────────────────────────────────────────────────


def _decode_check(data: bytes) -> str:
    """The PIL format of an image's bytes; raises when they do not decode."""
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format or ""
        img.load()
        if img.width < 1 or img.height < 1:
            raise ValueError("empty image")
    return fmt


def _store(data: bytes, stem: Path) -> Path:
    """Write image bytes as ``stem.jpg`` / ``stem.png`` (other formats re-encoded as PNG)."""
    fmt = _decode_check(data)
    if fmt == "JPEG":
        out = stem.with_suffix(".jpg")
    else:
        out = stem.with_suffix(".png")
        if fmt != "PNG":
            with Image.open(io.BytesIO(data)) as img:
                buf = io.BytesIO()
                frame = img if img.mode in ("RGB", "RGBA", "L", "LA", "P") else img.convert("RGB")
                frame.save(buf, format="PNG")
                data = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


def fetch_url(url: str, cache_dir: str | os.PathLike[str], *, timeout: float = 20.0) -> Path:
    """The cached copy of an image URL, fetched (and checked by decoding) when missing.

    The cache is content-addressed by the URL: ``<cache>/<sha256(url)[:24]>.jpg|png``.

    Raises:
        OSError / ValueError: the fetch failed or the bytes are not an image.
    """
    stem = Path(cache_dir) / hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    for suffix in (".jpg", ".png"):
        if stem.with_suffix(suffix).exists():
            return stem.with_suffix(suffix)
    if _offline():
        raise OSError(f"not in the image cache and HF_HUB_OFFLINE is set: {url}")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = resp.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"larger than {MAX_IMAGE_BYTES} bytes")
    return _store(data, stem)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links
        shutil.copyfile(src, dst)


def _existing(images_dir: Path, index: int) -> Path | None:
    for suffix in (".jpg", ".png"):
        p = images_dir / f"{index:05d}{suffix}"
        if p.exists():
            return p
    return None


def prepare_images(
    rows: Iterable[ImageRow],
    images_dir: str | os.PathLike[str],
    n: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 20.0,
    retry_failed: bool = False,
    source_name: str = "",
) -> list[ImageRecord]:
    """Take rows in order until ``n`` images load; write them and ``manifest.json``.

    Each image lands in ``images_dir`` as ``<index:05d>.jpg`` (or ``.png``). A URL goes
    through the cache (and is hard-linked from it); a local file is checked and copied.
    Failures are logged, listed in the manifest under ``failed`` and skipped; a later call
    does not try them again unless ``retry_failed`` (so the selection stays the same from run to run).

    Args:
        rows: the listing, in index order (may be lazy).
        images_dir: the run's image folder.
        n: images wanted.
        cache_dir: the URL cache (default ``<images_dir>/.cache``).
        timeout: seconds per URL fetch.
        retry_failed: try again the rows an earlier call recorded as failed.
        source_name: recorded in the manifest.

    Returns:
        The records, in index order (fewer than ``n`` if the listing ran out).
    """
    out = Path(images_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / ".cache"
    manifest_path = out / MANIFEST
    old_failed: dict[int, dict[str, Any]] = {}
    if manifest_path.exists() and not retry_failed:
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            old_failed = {int(f["index"]): f for f in old.get("failed", [])}
        except (ValueError, KeyError, TypeError):
            old_failed = {}
    records: list[ImageRecord] = []
    failed: list[dict[str, Any]] = []
    for row in rows:
        if len(records) >= n:
            break
        if row.index in old_failed and old_failed[row.index].get("source") == row.source:
            failed.append(old_failed[row.index])
            continue
        have = _existing(out, row.index)
        try:
            if have is None:
                if _is_url(row.source):
                    cached = fetch_url(row.source, cache, timeout=timeout)
                    have = out / f"{row.index:05d}{cached.suffix}"
                    _link(cached, have)
                else:
                    have = _store(Path(row.source).read_bytes(), out / f"{row.index:05d}")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            logger.warning("image %d (%s) skipped: %s", row.index, row.source, e)
            failed.append({"index": row.index, "source": row.source, "error": str(e)})
            continue
        records.append(ImageRecord(row.index, str(have), row.caption, row.source))
    if len(records) < n:
        logger.warning("only %d of %d images could be loaded", len(records), n)
    write_json(
        manifest_path,
        {
            "source": source_name,
            "num_images": len(records),
            "images": [_manifest_entry(r) for r in records],
            "failed": failed,
        },
    )
    if failed:
        logger.info("%d image(s) failed and were skipped (see %s)", len(failed), manifest_path)
    return records


def _manifest_entry(record: ImageRecord) -> dict[str, Any]:
    entry = asdict(record)
    entry["path"] = Path(record.path).name  # relative: the folder may move
    return entry


def read_manifest(images_dir: str | os.PathLike[str]) -> list[ImageRecord] | None:
    """The records of a prepared image folder, or ``None`` when it has no valid manifest."""
    folder = Path(images_dir)
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        records = [
            ImageRecord(**{**r, "path": str(folder.resolve() / r["path"])}) for r in data["images"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(Path(r.path).exists() for r in records):
        return None
    return records
