"""The trained connector: padding embedding, then a SwiGLU MLP without bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Connector(nn.Module):
    """`y = w2(silu(w1 x) ⊙ w3 x)` applied to ViT features with `pad_embed` added first.

    `pad_embed` `[2, in_dim]`: row 0 is added to patches that are entirely padding
    (real-pixel fraction 0), row 1 to patches that are partly padding (fraction strictly
    between 0 and 1). Only CLIP crops have padding. No norm or scaling follows the MLP.

    Args:
        in_dim: feature width (two ViT layers: 2048 or 2304).
        hidden: MLP hidden width (11008 OLMo, 14336 Llama, 18944 Qwen2).
        out_dim: the LLM's d_model.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:  # noqa: D107
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.pad_embed = nn.Parameter(torch.zeros(2, in_dim))

    @property
    def in_dim(self) -> int:  # noqa: D102
        return self.w1.in_features

    @property
    def hidden(self) -> int:  # noqa: D102
        return self.w1.out_features

    @property
    def out_dim(self) -> int:  # noqa: D102
        return self.w2.out_features

    def add_padding_embed(
        self, features: torch.Tensor, patch_fraction: torch.Tensor
    ) -> torch.Tensor:
        """Add `pad_embed[0]` where the fraction is 0 and `pad_embed[1]` where it is in (0, 1).

        Args:
            features: `[B, N, in_dim]`.
            patch_fraction: `[B, N]` fraction of real pixels per patch.
        """
        frac = patch_fraction.to(features.device)
        all_pad = (frac == 0).to(features.dtype)[..., None]
        partial = ((frac > 0) & (frac < 1)).to(features.dtype)[..., None]
        pad = self.pad_embed.to(features.dtype)
        return features + pad[0] * all_pad + pad[1] * partial

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU MLP alone: `[..., in_dim]` → `[..., out_dim]`."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(
        self, features: torch.Tensor, patch_fraction: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Connector output `[B, N, out_dim]` of ViT features `[B, N, in_dim]`.

        Args:
            features: concatenated ViT features.
            patch_fraction: `[B, N]` real-pixel fraction per patch; `None` = all real.
        """
        x = features.to(self.w1.weight.dtype)
        if patch_fraction is not None:
            x = self.add_padding_embed(x, patch_fraction)
        return self.mlp(x)
