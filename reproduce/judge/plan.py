"""Which patches to judge: per query layer, one sampled patch per image, with its candidate words.

Each :class:`PatchTask` carries everything needed to draw the patch for the judge and to
key its verdict in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from reproduce.judge.prompt import PROMPT_VERSION
from reproduce.judge.render import WINDOW, Encoder, load_rgb
from reproduce.judge.sampling import (
    Convention,
    ImageGrid,
    make_rng,
    real_patch_mask,
    sample_centres,
)
from reproduce.judge.words import candidate_words
from reproduce.lens_files import LensImage, Method, find_layer_files, load_lens_layer

log = logging.getLogger(__name__)

IMAGE_NAMES = ("{i:05d}.jpg", "{i}.jpg", "{i:05d}.png", "{i}.png", "{i:05d}.jpeg", "{i}.jpeg")


@dataclass(frozen=True)
class PatchTask:
    """One patch to judge: where it is, what the lens said, and how to draw it."""

    lens: str
    model: str
    layer: int
    method: Method
    grid: tuple[int, int]
    image_idx: int
    patch_row: int
    patch_col: int
    candidate_words: tuple[str, ...]
    image_path: str
    encoder: Encoder

    def key(self, judge_model: str) -> str:
        """Cache key: the patch, and a hash of its words, the judge model and the prompt version."""
        blob = json.dumps(
            [list(self.candidate_words), judge_model, PROMPT_VERSION], ensure_ascii=False
        )
        digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
        return (
            f"{self.lens}/{self.model}/L{self.layer}/img{self.image_idx}"
            f"/r{self.patch_row}c{self.patch_col}/{digest}"
        )


Seeding = Literal["per-layer", "once"]
SEEDINGS: tuple[Seeding, ...] = ("per-layer", "once")


def find_image(images_dir: str | Path, image_idx: int) -> Path | None:
    """The file of image ``image_idx``: ``00012.jpg``, ``12.jpg``, then ``.png``/``.jpeg``."""
    for pattern in IMAGE_NAMES:
        path = Path(images_dir) / pattern.format(i=image_idx)
        if path.exists():
            return path
    return None


def plan_tasks(
    results_dir: str | Path,
    images_dir: str | Path,
    *,
    lens: str,
    model: str,
    encoder: Encoder,
    layers: Sequence[int] | None = None,
    patches_per_layer: int = 100,
    seed: int = 42,
    convention: Convention = "encoder",
    input_size: int | None = None,
    seeding: Seeding = "per-layer",
) -> list[PatchTask]:
    """The patches to judge, layer after layer, from one lens's result files (SPEC §7).

    With ``seeding="per-layer"`` (the paper: one judge process per layer, each seeded 42)
    every layer's draw starts from a fresh generator seeded ``seed``, so every layer
    judges the same patches wherever its files hold the same images; ``"once"`` (the
    released script, which seeds once before its layer loop) runs one generator through
    all layers in the given order. Per layer the
    images are walked in file order; images without a file, without patches or without a
    valid window are skipped before drawing; a drawn patch that is missing from the file
    or has no words is skipped after drawing (as the original did).

    Args:
        results_dir: folder of the lens's per-layer JSON files.
        images_dir: folder of the images (``00012.jpg`` or ``12.jpg``, or ``.png``).
        lens: the lens's name, recorded in every task (and in the cache keys).
        model: the model's name, likewise.
        encoder: how the model's encoder framed the images.
        layers: query layers, in order; ``None`` = every layer with a file.
        patches_per_layer: patches per layer (fewer if the images run out).
        seed: the sampling seed.
        seeding: ``"per-layer"`` (the paper) or ``"once"`` (the released script).
        convention: the real-patch test, see :func:`sampling.real_patch_mask`.
        input_size: the encoder's input side, likewise.
    """
    files = find_layer_files(results_dir)
    if not files:
        raise FileNotFoundError(
            f"no lens result files (*layerN*.json / *visualN*.json) in {results_dir}"
        )
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")
    rng = make_rng(seed)
    sizes: dict[Path, tuple[int, int]] = {}
    tasks: list[PatchTask] = []
    for layer in files if layers is None else layers:
        if layer not in files:
            log.warning("no result file for layer %d in %s; skipped", layer, results_dir)
            continue
        if seeding == "per-layer":
            rng = make_rng(seed)  # afresh for each layer: every layer draws the same patches
        data = load_lens_layer(files[layer], layer)
        by_idx = {img.image_idx: img for img in data.images}
        paths: dict[int, Path] = {}
        grids = _image_grids(data.images, images_dir, encoder, convention, input_size, sizes, paths)
        count = 0
        for idx, row, col in sample_centres(grids, rng, WINDOW):
            img = by_idx[idx]
            patch = img.patches.get((row, col))
            words = candidate_words(patch, data.method) if patch is not None else []
            if not words:
                continue  # the draw is spent, as in the original
            tasks.append(
                PatchTask(
                    lens=lens,
                    model=model,
                    layer=layer,
                    method=data.method,
                    grid=img.grid,
                    image_idx=idx,
                    patch_row=row,
                    patch_col=col,
                    candidate_words=tuple(words),
                    image_path=str(paths[idx]),
                    encoder=encoder,
                )
            )
            count += 1
            if count >= patches_per_layer:
                break
        if count < patches_per_layer:
            log.warning(
                "layer %d: only %d of %d patches (ran out of images)",
                layer,
                count,
                patches_per_layer,
            )
    return tasks


def _image_grids(
    images: Sequence[LensImage],
    images_dir: str | Path,
    encoder: Encoder,
    convention: Convention,
    input_size: int | None,
    sizes: dict[Path, tuple[int, int]],
    paths: dict[int, Path],
) -> Iterator[ImageGrid]:
    """The images offered to the sampler, lazily; records each one's file in ``paths``."""
    for img in images:
        path = find_image(images_dir, img.image_idx)
        if path is None:
            log.debug("no image file for index %d; skipped", img.image_idx)
            continue
        if path not in sizes:
            sizes[path] = load_rgb(path).size
        w, h = sizes[path]
        try:
            real = real_patch_mask(
                w, h, encoder, img.grid, convention=convention, input_size=input_size
            )
        except ValueError as e:  # too thin for the encoder
            log.warning("image %d skipped: %s", img.image_idx, e)
            continue
        paths[img.image_idx] = path
        yield ImageGrid(img.image_idx, real)
