"""Where each reproduce step writes, which models it covers, and how a step knows it is done.

One output folder holds a whole run::

    <out>/downloads.json                    step 1: what was fetched (or the tiny models made)
    <out>/models/                           --tiny only: the generated tiny models and data
    <out>/banks/<llm>/                      step 2: one contextual bank per LLM
    <out>/images/00012.jpg, manifest.json   step 3: the evaluation images, index-named
    <out>/lenses/<lens folder>/<run>/*.json step 3: the SPEC §8 lens files
    <out>/eval/<lens>/<model>/              step 4: evaluation_results.json + judge cache
    <out>/report/                           step 5: scores JSON, figures, summary.md
    <out>/site/                             step 6: the explorer (open site/index.html)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from reproduce.judge.names import CONNECTOR_MODELS, QWEN2VL
from reproduce.lens_files import LENS_DIRS

ModelKind = Literal["molmo", "qwen2vl"]

PAPER_MODELS: tuple[str, ...] = (*CONNECTOR_MODELS, QWEN2VL)
"""The ten models of the paper: the nine connector VLMs and Qwen2-VL-7B-Instruct."""
QWEN2VL_HUB_ID = "Qwen/Qwen2-VL-7B-Instruct"
QWEN2VL_BANK = "McGill-NLP/latentlens-qwen2vl-embeddings"
QWEN2VL_IMAGE_SIZE = 448  # 16×16 visual tokens after the 2×2 merge of 14-px patches
QWEN2VL_LAYERS = 28
LLM_OF_PREFIX = {"olmo": "olmo", "llama": "llama", "qwen": "qwen"}
"""Model-name prefix → key of the LLM (and of its bank) in `molmo.config.LLMS`."""


def model_kind(name: str) -> ModelKind:
    """``"qwen2vl"`` for Qwen2-VL, ``"molmo"`` for the nine connector models.

    Raises:
        ValueError: not a model of the paper.
    """
    if name == QWEN2VL:
        return "qwen2vl"
    if name in CONNECTOR_MODELS:
        return "molmo"
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(PAPER_MODELS)}")


def bank_name(model: str) -> str:
    """The bank a model's LatentLens searches: ``olmo``, ``llama``, ``qwen`` or ``qwen2vl``."""
    if model_kind(model) == "qwen2vl":
        return QWEN2VL
    return LLM_OF_PREFIX[model.split("-")[0]]


def parse_models(value: str | None, default: tuple[str, ...] = PAPER_MODELS) -> list[str]:
    """``"olmo-vit,qwen2vl"`` → names (checked); ``None``/``"all"`` → ``default``."""
    if value is None or value.strip().lower() in ("", "all"):
        return list(default)
    names = [x.strip() for x in value.split(",") if x.strip()]
    for name in names:
        model_kind(name)
    return list(dict.fromkeys(names))


def run_folder(model: str) -> str:
    """Folder of a model's lens files: ``checkpoints_<name>`` as the original pipeline named
    the connector models' runs (SPEC §8), ``qwen2vl`` for Qwen2-VL."""
    return model if model_kind(model) == "qwen2vl" else f"checkpoints_{model}"


@dataclass(frozen=True)
class Layout:
    """The paths of one pipeline run under ``root``."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Layout:
        """The layout under ``root`` (made absolute)."""
        return cls(Path(root).expanduser().resolve())

    @property
    def downloads(self) -> Path:  # noqa: D102
        return self.root / "downloads.json"

    @property
    def models(self) -> Path:  # noqa: D102
        return self.root / "models"

    @property
    def banks(self) -> Path:  # noqa: D102
        return self.root / "banks"

    def bank(self, name: str) -> Path:
        """Folder of one bank (``olmo``, ``llama``, ``qwen`` or ``qwen2vl``)."""
        return self.banks / name

    @property
    def images(self) -> Path:  # noqa: D102
        return self.root / "images"

    @property
    def lenses(self) -> Path:  # noqa: D102
        return self.root / "lenses"

    def lens_dir(self, lens: str, model: str) -> Path:
        """Folder of one lens's per-layer files for one model."""

        return self.lenses / LENS_DIRS[lens] / run_folder(model)  # type: ignore[index]

    @property
    def eval(self) -> Path:  # noqa: D102
        return self.root / "eval"

    def eval_dir(self, lens: str, model: str) -> Path:
        """Folder of one (lens, model) judge run."""
        return self.eval / lens / model

    @property
    def report(self) -> Path:  # noqa: D102
        return self.root / "report"

    @property
    def site(self) -> Path:  # noqa: D102
        return self.root / "site"


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """The parsed file, or ``None`` when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
