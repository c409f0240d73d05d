"""The frozen ViT: two hidden layers concatenated (deeper first), class token dropped.

Wraps a Hugging Face `CLIPVisionModel`, `Dinov2Model` or `SiglipVisionModel`:

- blocks beyond the deepest feature layer are removed (the paper's CLIP had 23 of 24);
- features are HF `hidden_states[i]` (i = output of block i-1) for the configured
  indices, taken by forward hooks; the forward stops after the deepest one, so no final
  layer norm or pooling head ever runs;
- DINOv2's 37×37 position embeddings are resized once to the crop's grid with
  `F.interpolate(scale_factor=(g + 0.1) / 37, mode="bicubic", align_corners=False)` in
  float32 and written over HF's (577 rows for 24×24), so HF's own interpolation (which
  targets `size=g` and differs by ~3%) never runs;
- attention is computed in float32 when the ViT runs in half precision (as the paper's
  ViTs did), through an attention function registered with transformers;
- a crop whose pixels are all exactly −1 (pure black under SigLIP) gets zero features.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentlens.models.registry import get_submodule
from molmo.config import VisionConfig, VisionKind

logger = logging.getLogger(__name__)

FP32_ATTENTION = "molmo_fp32_sdpa"
"""Name of the float32 SDPA attention function registered with transformers."""

_MODEL_TYPES: dict[VisionKind, tuple[str, ...]] = {
    "clip": ("clip_vision_model", "clip"),
    "dinov2": ("dinov2",),
    "siglip": ("siglip_vision_model", "siglip"),
}
_BLOCK_PATHS = ("encoder.layers", "encoder.layer", "vision_model.encoder.layers")
_HF_CLASSES: dict[VisionKind, str] = {
    "clip": "CLIPVisionModel",
    "dinov2": "Dinov2Model",
    "siglip": "SiglipVisionModel",
}


class _StopViT(Exception):
    """Raised by the hook of the deepest feature layer to end the ViT forward."""


def _fp32_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """HF's SDPA attention computed in float32; the output keeps the input dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), mask, **kwargs
    )
    return out.to(dtype), weights


def _register_fp32_attention() -> None:
    from transformers import AttentionInterface

    if FP32_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(FP32_ATTENTION, _fp32_sdpa)


def vit_blocks(vit: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF ViT (`encoder.layers` or DINOv2's `encoder.layer`)."""
    for path in _BLOCK_PATHS:
        try:
            blocks = get_submodule(vit, path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"cannot find the transformer blocks of {type(vit).__name__}")


def _set_num_blocks(vit: nn.Module, n: int) -> None:
    """Keep only the first `n` blocks (and say so in the config)."""
    for path in _BLOCK_PATHS:
        if _has(vit, path):
            parent_path, _, name = path.rpartition(".")
            parent = get_submodule(vit, parent_path)
            setattr(parent, name, nn.ModuleList(list(getattr(parent, name))[:n]))
            vit.config.num_hidden_layers = n
            return


def _has(module: nn.Module, path: str) -> bool:
    try:
        get_submodule(module, path)
    except AttributeError:
        return False
    return True


def dinov2_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize DINOv2 position embeddings `[1, 1 + s², d]` to `[1, 1 + grid², d]`.

    Uses `scale_factor=(grid + 0.1) / s` (bicubic, `align_corners=False`, no antialias,
    float32), as the paper's conversion did; returns `pos` unchanged when `s == grid`.
    The result has `pos.dtype`.
    """
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"DINOv2 position embeddings hold {n} patch rows, not a square grid")
    if side == grid:
        return pos
    d = pos.shape[-1]
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    x = patch_pos.reshape(1, side, side, d).permute(0, 3, 1, 2).to(torch.float32)
    factor = float((grid + 0.1) / side)
    x = F.interpolate(x, scale_factor=(factor, factor), mode="bicubic", align_corners=False)
    if tuple(x.shape[-2:]) != (grid, grid):
        raise ValueError(f"resizing {side}×{side} position embeddings gave {tuple(x.shape[-2:])}")
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)
    return torch.cat([cls_pos, x], dim=1)


class VisionEncoder(nn.Module):
    """A frozen HF ViT that returns the concatenated patch features Molmo feeds its connector.

    Build it with `from_model` (an already loaded HF vision model, e.g. a tiny test model)
    or `from_pretrained` (the Hub encoder of a `VisionConfig`).

    Attributes:
        vit: the HF vision model (truncated to the blocks needed).
        config: the encoder's facts.
    """

    def __init__(
        self, vit: nn.Module, config: VisionConfig, *, fp32_attention: bool = True
    ) -> None:
        """Adapt `vit` in place: truncate blocks, resize DINOv2 positions, set attention.

        Raises:
            ValueError: `vit` does not match `config` (kind, width, patch size, depth).
        """
        super().__init__()
        hf = vit.config
        if hf.model_type not in _MODEL_TYPES[config.kind]:
            raise ValueError(
                f"a {config.kind} encoder needs a {_HF_CLASSES[config.kind]}, "
                f"got model_type {hf.model_type!r}"
            )
        if hf.hidden_size != config.width or hf.patch_size != config.patch_size:
            raise ValueError(
                f"ViT has width {hf.hidden_size} and patch {hf.patch_size}; the config says "
                f"{config.width} and {config.patch_size}"
            )
        blocks = vit_blocks(vit)
        if len(blocks) < config.num_blocks_needed:
            raise ValueError(
                f"feature layers {config.feature_layers} need {config.num_blocks_needed} "
                f"blocks; the ViT has {len(blocks)}"
            )
        if len(blocks) > config.num_blocks_needed:
            _set_num_blocks(vit, config.num_blocks_needed)
        if config.kind == "dinov2":
            emb = vit.embeddings
            resized = dinov2_position_embeddings(emb.position_embeddings.data, config.grid)
            emb.position_embeddings = nn.Parameter(resized, requires_grad=False)
            hf.image_size = config.image_size
        if fp32_attention:
            _register_fp32_attention()
            vit.set_attn_implementation(FP32_ATTENTION)
        vit.eval().requires_grad_(False)
        self.vit = vit
        self.config = config

    @classmethod
    def from_model(cls, vit: nn.Module, config: VisionConfig, **kwargs: Any) -> VisionEncoder:
        """Wrap an already loaded HF vision model (modified in place)."""
        return cls(vit, config, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        config: VisionConfig,
        *,
        path: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **hub_kwargs: Any,
    ) -> VisionEncoder:
        """Load the encoder from the Hub (or `path`), adapt it in float32, then cast.

        Args:
            config: which encoder.
            path: local directory or Hub id overriding `config.hub_id`.
            dtype: compute dtype after the float32 position-embedding resize.
            device: where to put it.
            **hub_kwargs: passed to `from_pretrained` (`revision`, `cache_dir`, `token`, ...).
        """
        import transformers

        hf_cls = getattr(transformers, _HF_CLASSES[config.kind])
        vit = hf_cls.from_pretrained(path or config.hub_id, dtype=torch.float32, **hub_kwargs)
        enc = cls(vit, config)
        return enc.to(device=device, dtype=dtype) if device is not None else enc.to(dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the ViT weights."""
        return next(self.vit.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the ViT weights."""
        return next(self.vit.parameters()).device

    def hidden_states(
        self, pixel_values: torch.Tensor, layers: tuple[int, ...]
    ) -> dict[int, torch.Tensor]:
        """HF `hidden_states[i]` for each i in `layers`, stopping after the deepest block.

        Args:
            pixel_values: `[B, 3, S, S]`.
            layers: indices in `[0, number of blocks]`.

        Returns:
            `{i: [B, T, width]}` (T includes the class token where there is one).
        """
        blocks = vit_blocks(self.vit)
        deepest = max(layers)
        if min(layers) < 0 or deepest > len(blocks):
            raise ValueError(f"ViT layers {layers} outside 0..{len(blocks)}")
        store: dict[int, torch.Tensor] = {}

        def record(i: int, h: torch.Tensor) -> None:
            store[i] = h
            if i == deepest:
                raise _StopViT

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record(0, args[0] if args else kwargs["hidden_states"])

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                record(i, output[0] if isinstance(output, (tuple, list)) else output)

            return hook

        handles = []
        try:
            for i in sorted(set(layers)):
                if i == 0:
                    handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:
                    handles.append(blocks[i - 1].register_forward_hook(make_hook(i)))
            try:
                self.vit(pixel_values=pixel_values)
            except _StopViT:
                pass
        finally:
            for h in handles:
                h.remove()
        return store

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch of crops.

        Args:
            pixel_values: `[B, 3, S, S]` float32 crops from `ImageProcessor`.

        Returns:
            `[B, H·W, feature_dim]` in the ViT's dtype: the configured hidden states
            concatenated deeper first, class token dropped; zero for all-(−1) crops.
        """
        black = (pixel_values == -1).flatten(1).all(dim=1)  # checked before any cast
        px = pixel_values.to(self.device, self.dtype)
        states = self.hidden_states(px, self.config.feature_layers)
        feats = torch.cat([states[i] for i in self.config.feature_layers], dim=-1)
        if self.config.has_cls:
            feats = feats[:, 1:]
        if feats.shape[1] != self.config.num_patches:
            raise ValueError(
                f"ViT returned {feats.shape[1]} patches, expected {self.config.num_patches} "
                f"for a {self.config.image_size}-pixel crop"
            )
        if bool(black.any()):
            feats = feats * (~black).to(feats.device, feats.dtype)[:, None, None]
        return feats
