"""The released connector checkpoints: key map, safe loading, Hub download, safetensors export.

A released `connector.pt` (Hub repo `McGill-NLP/latentlens-connectors`, file
`<model-name>/connector.pt`) is a plain dict of tensors under the original training
code's names. `KEY_MAP` is the whole correspondence with this package's modules; shapes
are checked against the model table. Files are read with weights-only unpickling, so a
file that would run code is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentlens.atomic import atomic_path
from latentlens.bank import safe_torch_load
from latentlens.errors import BankFormatError, LatentLensError
from molmo.config import N_SPECIAL_EMBEDDINGS, MolmoConfig, get_config

logger = logging.getLogger(__name__)

KEY_MAP: dict[str, str] = {
    "vision_backbone.image_projector.w1.weight": "connector.w1.weight",
    "vision_backbone.image_projector.w2.weight": "connector.w2.weight",
    "vision_backbone.image_projector.w3.weight": "connector.w3.weight",
    "vision_backbone.pad_embed": "connector.pad_embed",
    "transformer.wte.new_embedding": "new_embedding",
}
"""Released key → parameter name in `MolmoModel`."""

# Keys some training checkpoints carry for modules the released models do not use.
_IGNORED_PREFIXES = ("vision_backbone.image_pooling_2d.", "vision_backbone.cls_projector.")


class CheckpointError(LatentLensError, ValueError):
    """A connector checkpoint is missing, unsafe, or does not match the model."""


def expected_shapes(config: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the released tensors for a model, by released key."""
    f, h, d = config.vision.feature_dim, config.llm.connector_hidden, config.llm.d_model
    return {
        "vision_backbone.image_projector.w1.weight": (h, f),
        "vision_backbone.image_projector.w2.weight": (d, h),
        "vision_backbone.image_projector.w3.weight": (h, f),
        "vision_backbone.pad_embed": (2, f),
        "transformer.wte.new_embedding": (N_SPECIAL_EMBEDDINGS, d),
    }


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a connector file (`.pt` weights-only, or `.safetensors`) as released keys → tensors.

    Raises:
        CheckpointError: the file is missing, unreadable, holds pickled code or non-tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"connector checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        try:
            obj: Any = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p} is not a readable safetensors file: {e}") from e
    else:
        try:
            obj = safe_torch_load(p)
        except BankFormatError as e:
            raise CheckpointError(str(e)) from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # a trainer-style wrapper around the state dict
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{p} must hold a dict of tensors (a state dict)")
    return dict(obj)


def map_state_dict(
    released: Mapping[str, torch.Tensor], config: MolmoConfig
) -> dict[str, torch.Tensor]:
    """Check a released state dict against the model table and rename it with `KEY_MAP`.

    Keys of unused training-time modules are dropped with a log message; any other
    unknown key, a missing key or a wrong shape is an error.

    Returns:
        `{MolmoModel parameter name: tensor}`.

    Raises:
        CheckpointError: missing or unexpected keys, or shapes that do not fit `config`.
    """
    shapes = expected_shapes(config)
    assert set(shapes) == set(KEY_MAP)
    missing = sorted(set(KEY_MAP) - set(released))
    unknown = sorted(
        k for k in released if k not in KEY_MAP and not k.startswith(_IGNORED_PREFIXES)
    )
    if missing or unknown:
        raise CheckpointError(
            f"connector checkpoint for {config.name!r} does not match the released layout: "
            f"missing {missing}, unexpected {unknown}"
        )
    ignored = [k for k in released if k.startswith(_IGNORED_PREFIXES)]
    if ignored:
        logger.info("ignoring %d tensors of unused modules: %s", len(ignored), ignored)
    out = {}
    for key, name in KEY_MAP.items():
        t = released[key]
        if tuple(t.shape) != shapes[key]:
            raise CheckpointError(
                f"{key} has shape {tuple(t.shape)}; {config.name!r} needs {shapes[key]}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{key} must be a floating-point tensor, got {t.dtype}")
        out[name] = t
    return out


def download_connector(
    name: str | MolmoConfig,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """Fetch `<name>/connector.pt` from the connector repo (or find it in the local cache).

    Works offline (`HF_HUB_OFFLINE=1`) when the file is cached.

    Args:
        name: released model name ("olmo-vit", ...) or its `MolmoConfig`.
        repo_id: Hub repo (default `McGill-NLP/latentlens-connectors`).
        revision: branch, tag or commit.
        cache_dir: Hugging Face cache directory.
        token: Hub token.

    Returns:
        Local path of the file.
    """
    from huggingface_hub import hf_hub_download

    config = name if isinstance(name, MolmoConfig) else get_config(name)
    path = hf_hub_download(
        repo_id=repo_id or config.connector_repo,
        filename=config.connector_filename,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
    )
    return Path(path)


def resolve_connector_path(source: str | os.PathLike[str], name: str) -> Path:
    """A connector file given a file path, or a directory holding it (or `<name>/` in it)."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (
            p / "connector.safetensors",
            p / "connector.pt",
            p / name / "connector.safetensors",
            p / name / "connector.pt",
            p / "model.pt",  # the original scripts' copy of connector.pt
        ):
            if candidate.is_file():
                return candidate
    raise CheckpointError(f"no connector checkpoint for {name!r} at {p}")


def convert_to_safetensors(
    src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None
) -> Path:
    """Rewrite a released `connector.pt` as safetensors (same keys and dtypes, no pickle).

    Args:
        src: the `.pt` file (read weights-only).
        dst: output path (default: `src` with the suffix `.safetensors`).

    Returns:
        The written path (written atomically).
    """
    state = read_checkpoint(src)
    out = Path(dst) if dst is not None else Path(src).with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "source": Path(src).name})
    return out


def to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `KEY_MAP`: `MolmoModel` parameter names → released keys."""
    inverse = {v: k for k, v in KEY_MAP.items()}
    return {inverse[k]: v for k, v in state.items() if k in inverse}
