"""The evaluation images: PixMo-Cap validation from its parquet files, or a local listing.

SPEC §7 takes PixMo-Cap validation images in index order. The Hub dataset
(``allenai/pixmo-cap``) has one ``train`` split of (``image_url``, ``caption``) rows, in
four parquet files. Molmo dropped the rows whose image failed to download, THEN took
``train_test_split(test_size=2048, seed=96817)``: validation row ``i`` is row
``numpy.random.default_rng(96817).permutation(n)[i]`` of the *filtered* rows. Which
rows survived is not published, so:

- given the listing of the rows Molmo had (``available``: their URLs or train-row
  indices), :func:`molmo_split` recomputes the split exactly;
- given the authors' lens result files, :func:`match_captions` recovers their exact
  validation images by each image's ``ground_truth_caption``;
- otherwise the split of the unfiltered rows is an approximation (it shares only ~130 of
  2,048 rows with the authors'), and a warning says so.

The parquet files come through ``huggingface_hub`` at a pinned revision (resumable,
cached, offline from the cache with ``HF_HUB_OFFLINE=1``) and are read with ``pyarrow``
(the ``pixmo`` extra). Local ``.jsonl`` / ``.parquet`` listings and image folders work
too. Images are fetched with urllib into a content-addressed cache, checked by decoding
them, and linked into the run's image folder as ``00012.jpg`` (the name the judge looks
for). Images that fail are skipped and logged; the next index is taken until ``n``
images are in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from latentlens.atomic import atomic_path, write_json
from latentlens.errors import LatentLensError

logger = logging.getLogger(__name__)

PIXMO_CAP = "allenai/pixmo-cap"
# the last commit that changed data/ (four train shards); later ones touch the README only
PIXMO_CAP_REVISION = "fd3f09ba9ed0058f23b55109ad3d6d0f214a6f1e"
PIXMO_PARQUET_GLOB = "data/train-*.parquet"
MOLMO_VAL_SIZE = 2048
MOLMO_SPLIT_SEED = 96817
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
    return [_row_from_dict(obj, i) for i, obj in enumerate(_parquet_table(path).to_pylist())]


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


def _parquet_table(path: Path, columns: Sequence[str] | None = None) -> Any:
    try:
        import pyarrow.parquet as pq  # pyright: ignore[reportMissingImports]  # optional
    except ImportError:
        raise ImageSourceError(
            f'reading {path} needs pyarrow: pip install -e ".[pixmo]" (or convert it to JSONL)'
        ) from None
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors derive from these
        raise ImageSourceError(f"{path}: not a readable parquet file with {columns}: {e}") from e


def pixmo_parquet_files(
    *,
    revision: str = PIXMO_CAP_REVISION,
    hub_cache: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    token: str | bool | None = None,
) -> list[Path]:
    """PixMo-Cap's own parquet files at ``revision``, downloaded (resumably) when missing.

    Args:
        revision: a commit of ``allenai/pixmo-cap`` (default: pinned) or a branch.
        hub_cache: the Hugging Face cache (default ``HF_HUB_CACHE``).
        offline: read the cache only (default: ``HF_HUB_OFFLINE`` is set).
        token: a Hub token (default: the logged-in one, if any).

    Returns:
        The train split's files, in row order (``data/train-00000-of-0000N.parquet``, …).

    Raises:
        ImageSourceError: not in the cache while offline, or the download failed.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _offline() if offline is None else offline
    kwargs: dict[str, Any] = dict(
        repo_type="dataset",
        revision=revision,
        cache_dir=hub_cache,
        allow_patterns=[PIXMO_PARQUET_GLOB],
        token=token,
    )
    folder = None
    if re.fullmatch(r"[0-9a-f]{40}", revision):  # a commit never changes: the cache is enough
        try:
            folder = snapshot_download(PIXMO_CAP, local_files_only=True, **kwargs)
        except LocalEntryNotFoundError:
            folder = None
        if folder is not None and not any(Path(folder).glob(PIXMO_PARQUET_GLOB)):
            folder = None
    try:
        if folder is None:
            folder = snapshot_download(PIXMO_CAP, local_files_only=offline, **kwargs)
    except LocalEntryNotFoundError as e:
        where = f" {hub_cache}" if hub_cache else ""
        raise ImageSourceError(
            f"PixMo-Cap's parquet files at revision {revision} are not in the Hub cache{where} "
            f"and the Hub cannot be reached (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '')!r}): {e}"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ImageSourceError(f"downloading PixMo-Cap ({revision}) failed: {e}") from None
    files = sorted(Path(folder).glob(PIXMO_PARQUET_GLOB))
    if not files:
        raise ImageSourceError(
            f"no {PIXMO_PARQUET_GLOB} in {folder}: is {revision} a revision of {PIXMO_CAP}?"
        )
    return files


def read_pixmo_rows(files: Sequence[str | os.PathLike[str]]) -> list[ImageRow]:
    """The train rows of PixMo-Cap parquet files, in file order: index = train row."""
    rows: list[ImageRow] = []
    for f in files:
        table = _parquet_table(Path(f), ["image_url", "caption"])
        urls = table.column("image_url").to_pylist()
        caps = table.column("caption").to_pylist()
        start = len(rows)
        rows.extend(
            ImageRow(start + i, str(u or ""), str(c or ""))
            for i, (u, c) in enumerate(zip(urls, caps, strict=True))
        )
    return rows


def read_available(path: str | os.PathLike[str]) -> set[str] | set[int]:
    """The train rows Molmo had: image URLs or train-row indices.

    ``.txt``: one per line (all numbers: indices); ``.jsonl`` or ``.parquet``: an
    ``image_url`` column (or ``index``).

    Raises:
        ImageSourceError: missing, empty or unreadable.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageSourceError(f"listing of available rows {p} does not exist")
    lines = [] if p.suffix == ".parquet" else p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".parquet":
        objs: list[Any] = _parquet_table(p).to_pylist()
    elif p.suffix == ".jsonl":
        try:
            objs = [json.loads(line) for line in lines if line.strip()]
        except ValueError as e:
            raise ImageSourceError(f"{p}: {e}") from e
    else:
        objs = [line.strip() for line in lines if line.strip()]
    values = [
        next((o[k] for k in ("image_url", "url", "index") if o.get(k) is not None), None)
        if isinstance(o, dict)
        else o
        for o in objs
    ]
    if not values or any(v is None or v == "" for v in values):
        raise ImageSourceError(f"{p}: expected one image URL or train-row index per row")
    if all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in values):
        return {int(v) for v in values}
    return {str(v) for v in values}


def molmo_split(
    rows: Sequence[ImageRow], available: set[str] | set[int] | None = None
) -> list[ImageRow]:
    """Molmo's validation split of PixMo-Cap's train rows, re-indexed 0..2047.

    ``available`` (URLs or train-row indices, see :func:`read_available`) keeps only the
    rows Molmo could download, before the split, as Molmo did.
    """
    if available is not None:
        by_index = bool(available) and isinstance(next(iter(available)), int)
        rows = [r for r in rows if (r.index if by_index else r.source) in available]
        if not rows:
            raise ImageSourceError("no train row is in the listing of available rows")
    order = molmo_validation_order(len(rows))
    return [ImageRow(i, rows[j].source, rows[j].caption) for i, j in enumerate(order)]


def match_captions(rows: Sequence[ImageRow], captions: Mapping[int, str]) -> list[ImageRow]:
    """The images whose ``ground_truth_caption`` the authors' lens files record.

    Args:
        rows: PixMo-Cap's train rows.
        captions: ``image_idx → ground_truth_caption`` of the authors' files.

    Returns:
        One row per ``image_idx``, in index order, with the train row's URL and caption.

    Raises:
        ImageSourceError: a caption matches no train row, or rows with different images.
    """
    by_caption: dict[str, set[str]] = {}
    for r in rows:
        by_caption.setdefault(r.caption.strip(), set()).add(r.source)
    out, missing, ambiguous = [], [], []
    for idx in sorted(captions):
        urls = by_caption.get(captions[idx].strip(), set())
        if len(urls) == 1:
            out.append(ImageRow(idx, next(iter(urls)), captions[idx]))
        elif urls:
            ambiguous.append(idx)
        else:
            missing.append(idx)
    if missing or ambiguous:
        raise ImageSourceError(
            f"{len(missing)} image caption(s) match no PixMo-Cap train row (image_idx "
            f"{missing[:10]}) and {len(ambiguous)} match rows with different images "
            f"({ambiguous[:10]}): are these lens files from PixMo-Cap?"
        )
    return out


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
    does not try them again unless ``retry_failed`` (the selection stays the same).

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
