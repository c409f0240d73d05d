"""Step 3: the three lenses at every query layer of each model, over N evaluation images.

Connector VLMs go through :func:`reproduce.lens_files.run_lenses`; Qwen2-VL through the same
function behind :class:`VLMSubject`, an adapter that finds its visual tokens with
:mod:`latentlens.vlm` (centre crop, 448 px, 16×16 tokens), so every model writes the same
SPEC §8 files. A model whose files are all there for the same images is skipped; a
missing file is recomputed alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

import molmo
from latentlens.atomic import write_json
from latentlens.index import ContextualIndex
from latentlens.models.loading import default_cache_dir, load_model, load_processor
from latentlens.models.registry import hidden_size, num_layers
from latentlens.vlm import (
    DEFAULT_PROMPT,
    visual_token_states,
)
from molmo.config import default_query_layers, get_config
from molmo.model import VisualStates
from reproduce.data.pixmo import (
    PIXMO_CAP_REVISION,
    ImageRecord,
    ImageRow,
    ImageSourceError,
    match_captions,
    molmo_split,
    pixmo_parquet_files,
    prepare_images,
    read_available,
    read_listing,
    read_manifest,
    read_pixmo_rows,
)
from reproduce.data.tiny import LAYERS, load_tiny_molmo, read_tiny
from reproduce.judge.names import LENSES, QWEN2VL
from reproduce.layout import (
    QWEN2VL_BANK,
    QWEN2VL_HUB_ID,
    QWEN2VL_IMAGE_SIZE,
    QWEN2VL_LAYERS,
    Layout,
    bank_name,
    model_kind,
    read_json_or_none,
    run_folder,
)
from reproduce.lens_files import (
    embeddinglens_filename,
    latentlens_filename,
    lens_captions,
    logitlens_filename,
    run_lenses,
)

logger = logging.getLogger(__name__)

PIXMO_SOURCE = "pixmo-cap"


# ── Qwen2-VL behind the lens-run interface ──────────────────────────────────────────────


class VLMSubject:
    """A Hugging Face VLM (Qwen2-VL, Qwen2.5-VL, LLaVA) with the interface `run_lenses` reads.

    Each image is centre-cropped and resized to ``image_size`` (Lanczos), fed with the
    plain-text prompt ``<image token>Describe this image in detail.`` (SPEC §6), and the
    states at its visual-token positions are returned as ``[B, grid², d]``. Layer 0 is the
    merged vision output at those positions (the "connector output" of this model).

    Args:
        model: the VLM (registered in :mod:`latentlens.models.registry`).
        processor: its processor.
        name: the model name recorded in the files.
        image_size: side of the square the image is resized to.
        prompt: text after the image token.
    """

    checkpoint_path: Path | None = None

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str = QWEN2VL,
        image_size: int = QWEN2VL_IMAGE_SIZE,
        prompt: str = DEFAULT_PROMPT,
    ) -> None:

        self.llm = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_size = image_size
        self.config = SimpleNamespace(
            name=name,
            prompt=prompt,
            llm=SimpleNamespace(d_model=hidden_size(model), num_layers=num_layers(model)),
        )
        ip = processor.image_processor
        patch = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 1))
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of {patch} px tokens")
        self._grid = image_size // patch

    @property
    def grid(self) -> int:
        """Visual tokens per side."""
        return self._grid

    @torch.inference_mode()
    def encode(self, images: Any, layers: Any) -> Any:
        """Visual-token states of each image at ``layers`` (one forward pass per image)."""

        wanted = sorted({int(x) for x in layers})
        per_layer: dict[int, list[torch.Tensor]] = {x: [] for x in wanted}
        seen = visual_token_states(
            self.llm,
            self.processor,
            images,
            wanted,
            size=self.image_size,
            prompt=self.config.prompt,
        )
        for one in seen:
            if one.grid != (self._grid, self._grid):
                raise ValueError(f"expected a {self._grid}² token grid, got {one.grid}")
            for x in wanted:
                per_layer[x].append(one.states[x])
        hidden = {x: torch.stack(v) for x, v in per_layer.items()}
        first = hidden[wanted[0]]
        return VisualStates(connector=hidden.get(0, first), hidden=hidden, grid=self._grid)


# ── images ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ImageSource:
    """Where step 3's images come from.

    Attributes:
        name: ``pixmo-cap`` (its parquet files on the Hub), or a local ``.jsonl`` /
            ``.parquet`` listing or image folder.
        split: apply Molmo's validation split to the listing (always for ``pixmo-cap``).
        available: a listing of the train rows Molmo had (URLs or row indices): the split
            is taken over those rows, as Molmo did.
        match_captions: a folder of the authors' lens files: their exact images, found by
            ``ground_truth_caption`` among the train rows.
        revision: the ``pixmo-cap`` revision.
    """

    name: str = PIXMO_SOURCE
    split: bool = False
    available: str | None = None
    match_captions: str | None = None
    revision: str = PIXMO_CAP_REVISION

    def describe(self) -> str:
        """The name recorded in the image manifest: a change of any setting clears the images."""
        parts = [self.name]
        if self.name == PIXMO_SOURCE:
            parts.append(f"@{self.revision[:12]}")
        if self.match_captions:
            parts.append(f" (captions of {Path(self.match_captions).resolve()})")
        elif self.split or self.name == PIXMO_SOURCE:
            parts.append(" (molmo split")
            if self.available:
                parts.append(f" of {Path(self.available).resolve()}")
            parts.append(")")
        return "".join(parts)


def image_rows(
    source: ImageSource, *, hub_cache: str | os.PathLike[str] | None = None
) -> list[ImageRow]:
    """The listing of an image source, in index order (see :class:`ImageSource`)."""
    if source.name == PIXMO_SOURCE:
        rows = read_pixmo_rows(pixmo_parquet_files(revision=source.revision, hub_cache=hub_cache))
    else:
        rows = read_listing(source.name)
    if source.match_captions:
        try:
            captions = lens_captions(source.match_captions)
        except (OSError, ValueError) as e:
            raise ImageSourceError(f"--match-captions: {e}") from e
        return match_captions(rows, captions)
    if source.name != PIXMO_SOURCE and not source.split:
        return rows
    if source.available is None:
        logger.warning(
            "Molmo's split of every train row is not the authors' (Molmo dropped the rows "
            "whose image failed to download first): pass --available with the rows Molmo "
            "had, or --match-captions with the authors' lens files, for their exact images"
        )
    available = read_available(source.available) if source.available else None
    return molmo_split(rows, available)


def default_image_cache() -> Path:
    """``$LATENTLENS_CACHE/pixmo-cap`` (default ``~/.cache/latentlens/pixmo-cap``)."""

    return default_cache_dir() / "pixmo-cap"


def images_for_run(
    layout: Layout,
    source: str | ImageSource,
    n: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    hub_cache: str | os.PathLike[str] | None = None,
    retry_failed: bool = False,
    timeout: float = 20.0,
) -> list[ImageRecord]:
    """The run's first ``n`` loadable images of ``source``, reusing a matching manifest.

    Images of another source are cleared first. ``cache_dir`` holds fetched images;
    ``hub_cache`` the Hugging Face cache (default ``HF_HUB_CACHE``).
    """
    if isinstance(source, str):
        source = ImageSource(source)
    name = source.describe()
    manifest = read_json_or_none(layout.images / "manifest.json")
    if isinstance(manifest, dict) and manifest.get("source") == name and not retry_failed:
        records = read_manifest(layout.images)
        if records is not None and len(records) == n:
            return records
    elif isinstance(manifest, dict) and manifest.get("source") != name:
        logger.warning("images of another source in %s; clearing them", layout.images)
        for f in layout.images.iterdir():
            if f.is_file() and f.stem.isdigit():
                f.unlink()
    cache = Path(cache_dir) if cache_dir is not None else default_image_cache()
    rows = image_rows(source, hub_cache=hub_cache)
    return prepare_images(
        rows,
        layout.images,
        n,
        cache_dir=cache / "images",
        timeout=timeout,
        retry_failed=retry_failed,
        source_name=name,
    )


# ── done-checks ─────────────────────────────────────────────────────────────────────────


def _file_indices(lens: str, path: Path) -> list[int] | None:
    doc = read_json_or_none(path)
    if not isinstance(doc, dict):
        return None
    try:
        if lens == "latentlens":
            return [int(x) for x in doc["image_indices"]]
        if lens == "logitlens":
            return [int(r["image_idx"]) for r in doc["results"]]
        return [int(r["image_idx"]) for r in doc["splits"]["validation"]["images"]]
    except (KeyError, TypeError, ValueError):
        return None


def lens_paths(
    layout: Layout, model: str, layers: Sequence[int], top_k: int, lenses: Sequence[str]
) -> dict[tuple[str, int], Path]:
    """The SPEC §8 file of each (lens, layer) of a model."""

    names = {
        "latentlens": latentlens_filename,
        "logitlens": lambda x: logitlens_filename(x, top_k),
        "embeddinglens": embeddinglens_filename,
    }
    return {
        (lens, x): layout.lens_dir(lens, model) / names[lens](x) for lens in lenses for x in layers
    }


def _rel(layout: Layout, path: Path) -> str:
    return str(path.relative_to(layout.lenses))


def _done_marker(layout: Layout, model: str) -> Path:
    return layout.lenses / f".done_{run_folder(model)}.json"


def llm_depth(model: str, tiny: bool = False) -> int:
    """Decoder blocks of a model's LLM (without loading it)."""

    if tiny:
        return LAYERS
    if model_kind(model) == "qwen2vl":
        return QWEN2VL_LAYERS
    return get_config(model).llm.num_layers


def default_layers(model: str, tiny: bool = False) -> list[int]:
    """The paper's query layers of a model: 0,1,2,4,8,16,24 below n, plus n-2, n-1."""

    return default_query_layers(llm_depth(model, tiny))


def lenses_done(
    layout: Layout,
    model: str,
    layers: Sequence[int],
    top_k: int,
    indices: Sequence[int],
    lenses: Sequence[str] = LENSES,
) -> bool:
    """Whether every lens file of ``model`` is there, for exactly these images."""
    paths = lens_paths(layout, model, layers, top_k, lenses)
    marker = read_json_or_none(_done_marker(layout, model))
    if isinstance(marker, dict) and marker.get("image_indices") == list(indices):
        sizes = marker.get("files", {})
        return all(
            p.exists() and sizes.get(_rel(layout, p)) == p.stat().st_size for p in paths.values()
        )
    return all(_file_indices(lens, p) == list(indices) for (lens, _), p in paths.items())


def _stale(paths: dict[tuple[str, int], Path], indices: list[int]) -> None:
    """Delete lens files made for other images, so they are recomputed."""
    for (lens, _), p in paths.items():
        if p.exists() and _file_indices(lens, p) != indices:
            logger.info("%s holds other images; recomputing it", p)
            p.unlink()


# ── the step ────────────────────────────────────────────────────────────────────────────


def load_subject(
    layout: Layout,
    model: str,
    *,
    tiny: bool,
    device: str | None,
    dtype: str | None,
    connector: str | None = None,
) -> Any:
    """The model as `run_lenses` wants it: a `MolmoModel`, or Qwen2-VL behind `VLMSubject`."""
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_kind(model) == "molmo":
        if tiny:
            return load_tiny_molmo(layout, model, device=run_device)

        return molmo.load(model, dtype=dtype or "auto", device=run_device, connector=connector)

    path = str(layout.models / QWEN2VL) if tiny else QWEN2VL_HUB_ID
    size = QWEN2VL_IMAGE_SIZE
    if tiny:
        size = int(read_tiny(layout)["qwen2vl_image_size"])
    run_dtype = dtype or ("float16" if run_device.startswith("cuda") else "float32")
    vlm, _ = load_model(path, device=run_device, dtype=run_dtype)
    return VLMSubject(vlm, load_processor(path), name=model, image_size=size)


def load_bank(layout: Layout, model: str, device: str | None) -> tuple[Any, str]:
    """The model's contextual bank (built in step 2, or the public Qwen2-VL bank)."""

    folder = layout.bank(bank_name(model))
    if (folder / "config.json").exists():
        source = str(folder)
        index = ContextualIndex.from_directory(folder)
    elif model_kind(model) == "qwen2vl":
        source = QWEN2VL_BANK
        record = read_json_or_none(layout.downloads)
        request = record.get("request", {}) if isinstance(record, dict) else {}
        index = ContextualIndex.from_pretrained(QWEN2VL_BANK, layers=request.get("bank_layers"))
    else:
        raise FileNotFoundError(f"no bank for {model} in {folder}: run step 2 first")
    if device:
        index.to(device)
    return index, source


def run_model(
    layout: Layout,
    model: str,
    records: Sequence[ImageRecord],
    image_indices: Sequence[int] | None = None,
    *,
    layers: Sequence[int] | Literal["all"] | None = None,
    top_k: int = 5,
    lenses: Sequence[str] = LENSES,
    tiny: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 4,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Write the lens files of one model for the images ``image_indices`` (default all).

    ``layers``: query layers; ``None`` = the paper's, ``"all"`` = 0..n. The per-image work
    is ``run_lenses`` over the chosen records, so a caller can shard the indices over
    processes later.

    Returns:
        ``"done"`` or ``"skipped"``.
    """

    chosen = (
        list(records)
        if image_indices is None
        else [r for r in records if r.index in set(image_indices)]
    )
    indices = [r.index for r in chosen]
    if layers == "all":
        query_layers = list(range(llm_depth(model, tiny) + 1))
    elif layers is not None:
        query_layers = sorted(set(layers))
    else:
        query_layers = default_layers(model, tiny)
    paths = lens_paths(layout, model, query_layers, top_k, lenses)
    if not force and lenses_done(layout, model, query_layers, top_k, indices, lenses):
        logger.info("step 3: %s already has every lens file for these images", model)
        return "skipped"
    if force:
        for p in paths.values():
            p.unlink(missing_ok=True)
    else:
        _stale(paths, indices)
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    subject = load_subject(layout, model, tiny=tiny, device=run_device, dtype=dtype)
    index, bank_source = (None, "")
    if "latentlens" in lenses:
        index, bank_source = load_bank(layout, model, run_device)
    logger.info("step 3: %s — lenses %s at layers %s", model, list(lenses), query_layers)
    run_lenses(
        subject,
        [r.path for r in chosen],
        layout.lenses,
        lenses=list(lenses),  # type: ignore[arg-type]
        layers=query_layers,
        index=index,
        contextual_dir=bank_source,
        top_k=top_k,
        image_indices=indices,
        captions=[r.caption for r in chosen],
        batch_size=batch_size,
        run_name=run_folder(model),
        skip_existing=True,
        progress=progress,
    )
    write_json(
        _done_marker(layout, model),
        {
            "model": model,
            "image_indices": indices,
            "layers": query_layers,
            "files": {_rel(layout, p): p.stat().st_size for p in paths.values()},
        },
    )
    return "done"
