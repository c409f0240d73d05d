"""LogitLens: a hidden state through the model's own final norm and unembedding."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from latentlens.errors import UnsupportedArchitectureError
from latentlens.lenses.base import Lens, TokenDecoder
from latentlens.models.registry import (
    finalize_logits,
    get_arch,
    get_final_norm,
    get_output_embeddings,
    hidden_size,
)
from latentlens.results import Neighbor

# Working-set budget for one block of logits or of head rows converted to fp32 (bytes).
DEFAULT_CHUNK_BYTES = 64 * 2**20


def _plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` whose forward is Linear's own (not a subclass adding a scale)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class LogitLens(Lens):
    """Top tokens of ``finalize_logits(lm_head(final_norm(h)))`` for a hidden state ``h``.

    The final norm and the LM head come from the model registry, so the same lens serves
    every layer (no special case for the last one: layer ``n``, the last block's output
    before the final norm, gives back the model's own logits). Tied and untied heads are
    the same to it, and the architecture's logit scale / soft-cap are applied.

    The norm and the head are computed in float32 whatever the model's dtype: an fp16 or
    bf16 model's weights are converted block by block (never the whole head at once), so
    half-precision models get slightly more precise logits than their own forward.
    Work is split into blocks of at most ``chunk_bytes`` of logits, so ``[N, vocab]`` is
    never materialised for large ``N``.

    Args:
        model: the HF model with its LM head (``...ForCausalLM`` / a VLM).
        tokenizer: its tokenizer (or processor), to decode ids.
        top_k: tokens per hidden state.
        chunk_bytes: memory budget of one block of fp32 logits / head rows.
    """

    name: ClassVar[str] = "logit"
    score_name: ClassVar[str] = "logit"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        top_k: int = 5,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """Take the final norm and head from the registry (nothing is copied)."""
        spec = get_arch(model)
        if not spec.logits_verified:
            raise UnsupportedArchitectureError(
                f"cannot verify the logit path of {type(model).__name__}: discovery found no "
                "final norm / head whose output equals the model's own logits (an unknown "
                "logit post-processing?). Register the model with "
                "latentlens.models.register_architecture(model_type, ArchSpec(final_norm=..., "
                "logit_scale_attr=..., ...)) to use LogitLens on it."
            )
        self.model = model
        self.norm = get_final_norm(model)
        self.head = get_output_embeddings(model)
        self.decode = TokenDecoder(tokenizer)
        self.top_k = self._k(top_k)
        self.chunk_bytes = int(chunk_bytes)
        self._d = hidden_size(model)
        self._vocab: int | None = None
        # fp32 copies of the norm's tensors (d values each) when the model is not fp32.
        self._norm_state: dict[str, torch.Tensor] | None = None
        state = {**dict(self.norm.named_parameters()), **dict(self.norm.named_buffers())}
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in state.values()):
            self._norm_state = {
                k: v.detach().float() if v.is_floating_point() else v.detach()
                for k, v in state.items()
            }

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the residual stream."""
        return self._d

    @property
    def vocab_size(self) -> int:
        """Number of logits (rows of the unembedding)."""
        if self._vocab is None:
            w = getattr(self.head, "weight", None)
            if _plain_linear(self.head) and w is not None:
                self._vocab = int(w.shape[0])
            else:  # a composite head (e.g. RoBERTa's): ask it
                with torch.inference_mode():
                    probe = torch.zeros(1, self._d, device=self._device())
                    dtype = next(self.head.parameters()).dtype
                    self._vocab = int(self.head(probe.to(dtype)).shape[-1])
        return self._vocab

    def _device(self) -> torch.device:
        w = getattr(self.head, "weight", None)
        if isinstance(w, torch.Tensor):
            return w.device
        return next(self.head.parameters(), next(self.model.parameters())).device

    @torch.inference_mode()
    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``final_norm(hidden)`` in float32, ``[..., d]`` on the head's device."""
        h = hidden.to(self._device(), torch.float32)
        if self._norm_state is None:
            return self.norm(h).float()
        return functional_call(self.norm, self._norm_state, (h,)).float()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full float32 logits ``[..., vocab]`` (memory ``N × vocab × 4`` bytes: small N only)."""
        h = self.normed(hidden)
        blocks = [self._block_logits(h, s, e) for s, e in self._vocab_blocks()]
        return torch.cat(blocks, dim=-1)

    def _vocab_blocks(self) -> list[tuple[int, int]]:
        v = self.vocab_size
        w = getattr(self.head, "weight", None)
        if not _plain_linear(self.head) or w is None or w.dtype == torch.float32:
            return [(0, v)]  # fp32 weights are used in place; one block matches the model
        rows = max(16, self.chunk_bytes // (4 * self._d))
        return [(s, min(v, s + rows)) for s in range(0, v, rows)]

    def _block_logits(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Final logits of vocabulary ids ``start..end-1`` for fp32 normed states ``h``."""
        if _plain_linear(self.head):
            assert isinstance(self.head, nn.Linear)
            w = self.head.weight[start:end].float()
            b = self.head.bias[start:end].float() if self.head.bias is not None else None
            out = F.linear(h, w, b)
        else:  # an unusual head: run it in its own dtype
            dtype = next(self.head.parameters()).dtype
            out = self.head(h.to(dtype)).float()[..., start:end]
        return finalize_logits(self.model, out)

    @torch.inference_mode()
    def topk(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logits and token ids of each row of ``hidden`` ``[N, d]``.

        Returns:
            ``logits [N, k]`` float32 and ``token_ids [N, k]`` int64 on the CPU, best first.
        """
        logits, _, ids = self._top(hidden, top_k, probabilities=False)
        return logits, ids

    @torch.inference_mode()
    def top_predictions(
        self, hidden: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k logits, their softmax probabilities and token ids of each row of ``hidden``.

        The probability is over the whole vocabulary: a running log-sum-exp over the same
        vocabulary blocks the top-k walks, so ``[N, vocab]`` is never held at once.

        Returns:
            ``logits [N, k]``, ``probs [N, k]`` float32 and ``token_ids [N, k]`` int64 on
            the CPU, best first.
        """
        logits, probs, ids = self._top(hidden, top_k, probabilities=True)
        assert probs is not None
        return logits, probs, ids

    def _top(
        self, hidden: torch.Tensor, top_k: int | None, *, probabilities: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        # the log-sum-exp (an exp over every logit) only when probabilities are wanted
        flat = self._flatten(hidden)
        k = min(self._k(top_k), self.vocab_size)
        blocks = self._vocab_blocks()
        widest = max(e - s for s, e in blocks)
        rows = max(1, self.chunk_bytes // (4 * widest))
        out_s, out_p, out_i = [], [], []
        for q in range(0, flat.shape[0], rows):
            h = self.normed(flat[q : q + rows])
            best_s: torch.Tensor | None = None
            best_i: torch.Tensor | None = None
            lse: torch.Tensor | None = None
            for s, e in blocks:
                block = self._block_logits(h, s, e)
                v, i = torch.topk(block, min(k, e - s), dim=-1)
                i = i + s
                if probabilities:  # log-sum-exp in place: the block is not needed after top-k
                    top = v[:, :1]
                    m = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                    block_lse = m[:, 0] + block.sub_(m).exp_().sum(dim=-1).log()
                    lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
                if best_s is not None and best_i is not None:
                    v, i = torch.cat([best_s, v], 1), torch.cat([best_i, i], 1)
                    v, pos = torch.topk(v, min(k, v.shape[1]), dim=-1)
                    i = i.gather(1, pos)
                best_s, best_i = v, i
            assert best_s is not None and best_i is not None
            out_s.append(best_s.cpu())
            if lse is not None:
                out_p.append(torch.exp(best_s - lse[:, None]).cpu())
            out_i.append(best_i.cpu())
        probs = torch.cat(out_p) if probabilities else None
        return torch.cat(out_s), probs, torch.cat(out_i)

    def predict(self, hidden: torch.Tensor, top_k: int | None = None) -> list[list[Neighbor]]:
        """:class:`Neighbor` lists (score = logit, with its softmax probability) of each row
        of ``hidden`` ``[N, d]``."""
        scores, probs, ids = self.top_predictions(hidden, top_k)
        return [
            [
                Neighbor(token_str=self.decode(t), similarity=s, token_id=t, probability=p)
                for s, p, t in zip(row_s, row_p, row_i, strict=True)
            ]
            for row_s, row_p, row_i in zip(
                scores.tolist(), probs.tolist(), ids.tolist(), strict=True
            )
        ]
