"""The lens files of SPEC §8: run the three lenses over a VLM and images, write them, read them.

The one place that knows the original release's lens-file names and JSON layout: the
lens runs write them (`run_lenses`) and the judge reads them (`load_lens_layer`,
`find_layer_files`).

One forward pass per batch of images serves every lens and layer. Files (SPEC §8), each
in `<output_dir>/<lens folder>/<run name>/`:

- LatentLens → `contextual_nearest_neighbors/…/contextual_neighbors_visual{L}_allLayers.json`
- LogitLens → `logit_lens/…/logit_lens_layer{L}_topk{k}_multi-gpu.json`
- EmbeddingLens → `nearest_neighbors/…/nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{L}.json`

The lens folders and the run name (`<parent>_<name>` of the checkpoint directory, e.g.
`checkpoints_olmo-vit`) follow the original scripts' defaults, so existing analysis tools
(the LLM judge, the aggregation) find and read the files. Layer 0 is the connector output
for LatentLens and EmbeddingLens and `hidden_states[0]` (connector output + <im_patch>
embedding) for LogitLens, as in the original runs.

Deviations, by design: the EmbeddingLens skips padding / special / never-trained rows
unless `embedding_original=True` (SPEC §4); the original's caption-word matching
statistics (`match_type`, `caption_match`, ...) are not computed, only
`total_visual_tokens`. Under torch.distributed (`torchrun`) whole batches of images go to
the ranks round-robin and rank 0 writes the merged files, equal to a single process's
(`num_processes` records the world size).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from latentlens import distributed as D
from latentlens.atomic import write_json
from latentlens.index import ContextualIndex
from latentlens.interpretation import make_lens
from molmo.config import default_query_layers
from molmo.model import VisualStates
from molmo.processing import ImageInput

logger = logging.getLogger(__name__)

LensName = Literal["latentlens", "logitlens", "embeddinglens"]
ALL_LENSES: tuple[LensName, ...] = ("latentlens", "logitlens", "embeddinglens")
LENS_DIRS: dict[LensName, str] = {
    "latentlens": "contextual_nearest_neighbors",
    "logitlens": "logit_lens",
    "embeddinglens": "nearest_neighbors",
}
"""Default output folder of each lens in the original scripts."""
LENS_KINDS: dict[LensName, str] = {
    "latentlens": "latent",
    "logitlens": "logit",
    "embeddinglens": "embedding",
}
"""The library's name (`Lens.name`, `make_lens`) of each lens file's kind."""


class LensSubject(Protocol):
    """What the lens runs read of a model: a `MolmoModel`, or an adapter around another VLM.

    `config` needs `name`, `prompt`, `llm.d_model` and `llm.num_layers`; `encode` returns
    the visual tokens' states of a batch of images, `grid` × `grid` of them, row-major.
    """

    config: Any
    llm: nn.Module
    tokenizer: Any
    checkpoint_path: Path | None

    @property
    def grid(self) -> int:  # noqa: D102
        ...

    def encode(self, images: Any, layers: Any) -> VisualStates:  # noqa: D102
        ...


def latentlens_filename(layer: int) -> str:
    """`contextual_neighbors_visual{layer}_allLayers.json`."""
    return f"contextual_neighbors_visual{layer}_allLayers.json"


def logitlens_filename(layer: int, top_k: int) -> str:
    """`logit_lens_layer{layer}_topk{top_k}_multi-gpu.json`."""
    return f"logit_lens_layer{layer}_topk{top_k}_multi-gpu.json"


def embeddinglens_filename(layer: int) -> str:
    """`nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{layer}.json`."""
    return f"nearest_neighbors_analysis_pixmo_cap_multi-gpu_layer{layer}.json"


def default_run_name(model: LensSubject) -> str:
    """`<parent>_<name>` of the connector's directory, as the original scripts named runs.

    A connector from the Hub cache (or none) gives `checkpoints_<model name>`, the name
    the original pipeline's download step produced.
    """
    path = model.checkpoint_path
    if path is None or "snapshots" in path.parts:
        return f"checkpoints_{model.config.name}"
    folder = path.parent
    return f"{folder.parent.name}_{folder.name}" if folder.parent.name else folder.name


def _patch_entries(grid: int) -> list[dict[str, int]]:
    return [
        {"patch_idx": i, "patch_row": i // grid, "patch_col": i % grid} for i in range(grid * grid)
    ]


@dataclass
class _Collected:
    """Per-(lens, layer) image records keyed by the image's position in the run."""

    images: dict[tuple[LensName, int], dict[int, dict[str, Any]]] = field(default_factory=dict)

    def add(self, lens: LensName, layer: int, position: int, record: dict[str, Any]) -> None:
        self.images.setdefault((lens, layer), {})[position] = record

    def ordered(self, lens: LensName, layer: int) -> list[dict[str, Any]]:
        """The records of one (lens, layer) in image order."""
        recs = self.images.get((lens, layer), {})
        return [recs[i] for i in sorted(recs)]

    @classmethod
    def merge(cls, parts: Sequence[_Collected]) -> _Collected:
        """Union of several ranks' records."""
        out = cls()
        for part in parts:
            for key, recs in part.images.items():
                out.images.setdefault(key, {}).update(recs)
        return out


def _build_lenses(
    model: LensSubject,
    lenses: Sequence[LensName],
    index: ContextualIndex | None,
    contextual_layers: Sequence[int] | None,
    top_k: int,
    embedding_original: bool,
) -> dict[LensName, Any]:
    """The library's lenses (`latentlens.interpretation.make_lens`) under the files' names."""
    if (
        "latentlens" in lenses
        and index is not None
        and index.hidden_dim != model.config.llm.d_model
    ):
        raise ValueError(
            f"bank width {index.hidden_dim} differs from the LLM's {model.config.llm.d_model}"
        )
    options: dict[LensName, dict[str, Any]] = {
        "latentlens": {"layers": contextual_layers},
        "logitlens": {},
        "embeddinglens": {"original": embedding_original},
    }
    built: dict[LensName, Any] = {}
    for name in lenses:
        if name not in LENS_KINDS:
            raise ValueError(f"unknown lens {name!r}; choose from {ALL_LENSES}")
        built[name] = make_lens(
            LENS_KINDS[name], model.llm, model.tokenizer, top_k, index=index, **options[name]
        )
    return built


def _patch_records(lens_name: LensName, lens: Any, flat: torch.Tensor) -> list[dict[str, Any]]:
    """One dict of predictions per row of `flat` `[N, d]`, in the original's field names."""
    rows = lens.predict(flat)
    if lens_name == "latentlens":
        return [
            {
                "nearest_contextual_neighbors": [
                    {
                        "token_str": p.token_str,
                        "token_id": p.token_id,
                        "caption": p.caption,
                        "position": p.position,
                        "similarity": p.score,
                        "contextual_layer": p.contextual_layer,
                        # ours (the original evaluator ignores it): this occurrence's place
                        **({"char_span": list(p.char_span)} if p.char_span else {}),
                    }
                    for p in row
                ]
            }
            for row in rows
        ]
    if lens_name == "logitlens":
        return [
            {
                "top_predictions": [
                    {
                        "token": p.token_str,
                        "token_id": p.token_id,
                        "logit": p.score,
                        # ours (the original evaluator ignores it): softmax over the vocab
                        **({"probability": p.probability} if p.probability is not None else {}),
                    }
                    for p in row
                ]
            }
            for row in rows
        ]
    return [
        {"nearest_neighbors": [{"token": p.token_str, "similarity": p.score} for p in row]}
        for row in rows
    ]


def run_lenses(
    model: LensSubject,
    images: Sequence[ImageInput],
    output_dir: str | Path,
    *,
    lenses: Sequence[LensName] = ALL_LENSES,
    layers: Sequence[int] | None = None,
    index: ContextualIndex | None = None,
    contextual_layers: Sequence[int] | None = None,
    contextual_dir: str = "",
    top_k: int = 5,
    image_indices: Sequence[int] | None = None,
    captions: Sequence[str] | None = None,
    batch_size: int = 4,
    run_name: str | None = None,
    embedding_original: bool = False,
    split: str = "validation",
    skip_existing: bool = False,
    progress: bool = True,
) -> dict[LensName, list[Path]]:
    """Apply lenses to the visual tokens of `images` at `layers` and write one JSON per layer.

    Args:
        model: the VLM.
        images: paths, PIL images or uint8 arrays, processed `batch_size` at a time.
        output_dir: root; each lens writes into `<output_dir>/<LENS_DIRS[lens]>/<run_name>/`.
        lenses: any of "latentlens", "logitlens", "embeddinglens".
        layers: LLM query layers (default: the paper's, e.g. 0,1,2,4,8,16,24,30,31).
        index: contextual bank (needed for "latentlens").
        contextual_layers: bank layers searched (default: all the index holds).
        contextual_dir: recorded as `contextual_dir` in the LatentLens files.
        top_k: neighbours / predictions per patch.
        image_indices: dataset index of each image (default 0..n-1), `image_idx` in the files.
        captions: ground-truth caption of each image (`ground_truth_caption`; default "").
        batch_size: images per forward pass.
        run_name: folder name (default `default_run_name(model)`).
        embedding_original: EmbeddingLens over every embedding row, as the original did.
        split: dataset split recorded in the files.
        skip_existing: leave (lens, layer) files that already exist untouched.
        progress: show a progress bar.

    Returns:
        `{lens: [written paths]}`.

    Raises:
        ValueError: bad arguments (lens name, missing index, mismatched lengths).
    """
    from tqdm.auto import tqdm

    n = len(images)
    if n == 0:
        raise ValueError("no images given")
    indices = list(image_indices) if image_indices is not None else list(range(n))
    caps = list(captions) if captions is not None else [""] * n
    if len(indices) != n or len(caps) != n:
        raise ValueError(f"{n} images but {len(indices)} indices and {len(caps)} captions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    unknown = [lens for lens in lenses if lens not in LENS_DIRS]
    if unknown:
        raise ValueError(f"unknown lens(es) {unknown}; choose from {ALL_LENSES}")
    query_layers = (
        sorted(set(layers))
        if layers is not None
        else default_query_layers(model.config.llm.num_layers)
    )
    name = run_name or default_run_name(model)
    out_dirs = {lens: Path(output_dir) / LENS_DIRS[lens] / name for lens in lenses}
    paths = {
        (lens, layer): out_dirs[lens] / _filename(lens, layer, top_k)
        for lens in lenses
        for layer in query_layers
    }
    todo = [key for key, p in paths.items() if not (skip_existing and p.exists())]
    if not todo:
        logger.info("every requested lens file exists already; nothing to do")
        return {lens: [] for lens in lenses}
    todo_layers = sorted({layer for _, layer in todo})
    built = _build_lenses(
        model,
        sorted({lens for lens, _ in todo}),
        index,
        contextual_layers,
        top_k,
        embedding_original,
    )

    grid = model.grid
    d = model.config.llm.d_model
    collected = _Collected()
    t0 = time.perf_counter()
    # Data-parallel under torch.distributed: whole batches go round-robin to the ranks, so
    # every image is computed in the same batch as in one process (bitwise-equal results).
    world, me = D.world_size(), D.rank()
    starts = list(range(0, n, batch_size))[me::world]
    bar = tqdm(
        total=sum(len(images[s : s + batch_size]) for s in starts),
        desc=f"lenses {model.config.name}",
        unit="img",
        disable=not progress or me != 0,
    )
    for start in starts:
        batch = images[start : start + batch_size]
        states = model.encode(batch, todo_layers)
        for lens_name, layer in todo:
            layer0 = "hidden" if lens_name == "logitlens" else "connector"
            flat = states.layer(layer, layer0).reshape(-1, d)
            records = _patch_records(lens_name, built[lens_name], flat)
            per_image = grid * grid
            for b in range(len(batch)):
                patches = [
                    {**meta, **rec}
                    for meta, rec in zip(
                        _patch_entries(grid),
                        records[b * per_image : (b + 1) * per_image],
                        strict=True,
                    )
                ]
                i = start + b
                record: dict[str, Any] = {
                    "image_idx": indices[i],
                    "ground_truth_caption": caps[i],
                }
                if lens_name != "logitlens":
                    record["feature_shape"] = [1, 1, per_image, d]
                    record["llm_layer_used"] = layer
                record["chunks"] = [{"chunk_name": "Full Image", "patches": patches}]
                collected.add(lens_name, layer, i, record)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        parts = D.gather_objects(collected)
        if me != 0:
            D.barrier()  # rank 0 writes the merged files
            return {lens: [paths[(lens, layer)] for layer in query_layers] for lens in lenses}
        collected = _Collected.merge(parts)

    checkpoint = str(model.checkpoint_path) if model.checkpoint_path else model.config.name
    written: dict[LensName, list[Path]] = {lens: [] for lens in lenses}
    for lens_name, layer in todo:
        results = collected.ordered(lens_name, layer)
        common = {"checkpoint": checkpoint, "split": split, "num_images": n}
        if lens_name == "latentlens":
            doc: dict[str, Any] = {
                **common,
                "contextual_dir": contextual_dir,
                "visual_layer": layer,
                "contextual_layers_used": list(built["latentlens"].layers),
                "image_indices": indices,
                "top_k": top_k,
                "processing_time_seconds": elapsed,
                "results": results,
            }
        elif lens_name == "logitlens":
            doc = {
                **common,
                "num_processes": world,
                "top_k": top_k,
                "layer_idx": layer,
                "results": results,
            }
        else:
            doc = _embedding_document(checkpoint, model.config.prompt, split, layer, results, world)
        path = paths[(lens_name, layer)]
        write_json(path, doc)
        written[lens_name].append(path)
        logger.info("wrote %s", path)
    if world > 1:
        D.barrier()
    return written


def _filename(lens: LensName, layer: int, top_k: int) -> str:
    if lens == "latentlens":
        return latentlens_filename(layer)
    if lens == "logitlens":
        return logitlens_filename(layer, top_k)
    return embeddinglens_filename(layer)


def _statistics(images: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(len(img["chunks"][0]["patches"]) for img in images)
    return {"total_visual_tokens": total}


def _embedding_document(
    checkpoint: str,
    prompt: str,
    split: str,
    layer: int,
    images: list[dict[str, Any]],
    world: int = 1,
) -> dict[str, Any]:
    splits: dict[str, Any] = {
        "train": {"num_images": 0, "images": [], "statistics": _statistics([])},
        "validation": {"num_images": 0, "images": [], "statistics": _statistics([])},
    }
    splits[split] = {"num_images": len(images), "images": images, "statistics": _statistics(images)}
    return {
        "checkpoint": checkpoint,
        "prompt": prompt,
        "dataset": "PixMoCap",
        "num_processes": world,
        "preprocessing_mode": None,
        "llm_layer": layer,
        "splits": splits,
        "overall_statistics": _statistics(images),
    }


def run_latentlens(
    model: LensSubject,
    images: Sequence[ImageInput],
    index: ContextualIndex,
    output_dir: str | Path,
    **kwargs: Any,
) -> list[Path]:
    """LatentLens files only (see `run_lenses` for the arguments)."""
    return run_lenses(model, images, output_dir, lenses=("latentlens",), index=index, **kwargs)[
        "latentlens"
    ]


def run_logit_lens(
    model: LensSubject, images: Sequence[ImageInput], output_dir: str | Path, **kwargs: Any
) -> list[Path]:
    """LogitLens files only (see `run_lenses`)."""
    return run_lenses(model, images, output_dir, lenses=("logitlens",), **kwargs)["logitlens"]


def run_embedding_lens(
    model: LensSubject, images: Sequence[ImageInput], output_dir: str | Path, **kwargs: Any
) -> list[Path]:
    """EmbeddingLens files only (see `run_lenses`)."""
    return run_lenses(model, images, output_dir, lenses=("embeddinglens",), **kwargs)[
        "embeddinglens"
    ]


# ── reading the files (the judge's input) ─────────────────────────────────────────────

Method = LensName  # the judge's name for a lens file's kind
METHODS = ALL_LENSES

NEIGHBOR_FIELD: dict[Method, str] = {
    "latentlens": "nearest_contextual_neighbors",
    "logitlens": "top_predictions",
    "embeddinglens": "nearest_neighbors",
}


def detect_method(data: Mapping[str, Any]) -> Method:
    """Which lens wrote a result file, from its structure.

    Raises:
        ValueError: the structure is none of the three.
    """
    if "splits" in data:
        return "embeddinglens"
    for image in data.get("results") or []:
        for chunk in image.get("chunks") or []:
            for patch in chunk.get("patches") or []:
                if "nearest_contextual_neighbors" in patch:
                    return "latentlens"
                if "top_predictions" in patch:
                    return "logitlens"
                break
    raise ValueError(
        "not a lens result file: expected results[].chunks[].patches[] with "
        "nearest_contextual_neighbors or top_predictions, or splits.validation.images[]"
    )


@dataclass(frozen=True)
class LensImage:
    """One image of a lens result file.

    Attributes:
        image_idx: index of the image in the dataset (and in the images folder).
        caption: its ground-truth caption (may be empty).
        patches: ``(row, col) → patch record`` of the first chunk (the full image).
        grid: ``(H, W)`` of the patch grid, from the largest row and column present.
    """

    image_idx: int
    caption: str
    patches: dict[tuple[int, int], dict[str, Any]] = field(repr=False)
    grid: tuple[int, int]


@dataclass(frozen=True)
class LensLayer:
    """The contents of one lens result file (one query layer)."""

    method: Method
    layer: int
    images: list[LensImage]
    path: Path | None = None

    @property
    def grid_size(self) -> int:
        """Grid side as the original evaluator records it (``max(H, W)`` of the first image)."""
        return max(self.images[0].grid) if self.images else 0


def parse_lens_layer(data: Mapping[str, Any], layer: int, path: Path | None = None) -> LensLayer:
    """Read an already-loaded lens result file (see the module docstring for the formats)."""
    method = detect_method(data)
    if method == "embeddinglens":
        # The validation split (the paper's), else the first split that holds images.
        splits = data["splits"]
        named = [splits.get("validation", {})] + [v for k, v in splits.items() if k != "validation"]
        records: Sequence[Mapping[str, Any]] = next(
            (sp["images"] for sp in named if sp.get("images")), []
        )
    else:
        records = data["results"]
    images = []
    for rec in records:
        chunks = rec.get("chunks") or []
        patches = {}
        for p in (chunks[0].get("patches") or []) if chunks else []:
            patches[(int(p.get("patch_row", 0)), int(p.get("patch_col", 0)))] = p
        if not patches:
            continue
        grid = (max(r for r, _ in patches) + 1, max(c for _, c in patches) + 1)
        idx = rec.get("image_idx", rec.get("image_index", 0))
        images.append(LensImage(int(idx), str(rec.get("ground_truth_caption", "")), patches, grid))
    return LensLayer(method, layer, images, path)


_LAYER_IN_NAME = re.compile(r"(?:layer|visual)(\d+)(?!\d)")


def find_layer_files(results_dir: str | Path) -> dict[int, Path]:
    """``layer → file`` for the lens result files in a folder.

    A file belongs to layer L when its name holds ``layerL`` or ``visualL`` not followed by
    another digit (so ``layer2`` never matches ``layer24``); the first name in sorted order
    wins when several match.
    """
    found: dict[int, Path] = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        m = _LAYER_IN_NAME.search(f.name)
        if m is not None:
            found.setdefault(int(m.group(1)), f)
    return dict(sorted(found.items()))


def load_lens_layer(path: str | Path, layer: int | None = None) -> LensLayer:
    """Read one lens result file; the layer defaults to the number in its name."""
    path = Path(path)
    if layer is None:
        m = _LAYER_IN_NAME.search(path.name)
        if m is None:
            raise ValueError(f"cannot tell the layer of {path.name}; pass it explicitly")
        layer = int(m.group(1))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return parse_lens_layer(data, layer, path)


def lens_captions(results_dir: str | Path) -> dict[int, str]:
    """``image_idx → ground_truth_caption`` of a folder of lens result files (any lens).

    Read from the smallest layer file: every layer of a run holds the same images.

    Raises:
        ValueError: no lens file, or no image with a caption in it.
    """
    files = find_layer_files(results_dir)
    if not files:
        raise ValueError(f"no lens result files (*layer<N>*.json) in {results_dir}")
    layer, path = min(files.items(), key=lambda kv: kv[1].stat().st_size)
    captions = {im.image_idx: im.caption for im in load_lens_layer(path, layer).images}
    captions = {i: c for i, c in captions.items() if c.strip()}
    if not captions:
        raise ValueError(f"{path} records no ground_truth_caption")
    return captions
