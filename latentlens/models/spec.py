"""`ArchSpec`: the facts latentlens needs about one architecture (see `registry`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

EmbedScale = Literal["sqrt_hidden_size"]

# Fields a VLM entry takes from its text sub-config's entry.
TEXT_FIELDS = ("layers", "final_norm", "embed_tokens", "last_hidden_is_normed")
TEXT_CONFIG_KEYS = (
    "num_layers_attr",
    "hidden_size_attr",
    "logit_softcapping_attr",
    "logit_scale_attr",
    "logit_divisor_attr",
)


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Where things live in one architecture, and how it treats its hidden states.

    Attributes:
        layers: Path of the `nn.ModuleList` of decoder blocks in the text base model.
        final_norm: Path of the norm applied after the last block ("" when the head reads
            the last block's output directly). For a discovered model this is whatever
            module maps the last block's output to the head's input (a norm, BERT's
            prediction transform, or a comma-joined chain of two applied in order).
        embed_tokens: Path of the token embedding module (for reference; use
            `get_input_embeddings`, which relies on HF's accessor).
        last_hidden_is_normed: Whether HF's `hidden_states[-1]` has the final norm applied.
        text_model_path: Path of the text base model inside the top-level model
            ("" when the entry describes a bare text model).
        inner_model_path: Path of the module a VLM forward should call: it merges the
            vision features into the input embeddings and runs the text model without
            the LM head. `None` for text-only models (the text base model is called).
        lm_head: Path of the unembedding inside the top-level model.
        position_embeddings: Path of learned absolute position embeddings added before
            block 0 (GPT-2's "wpe"), if any.
        embed_scale: How the embedding lookup is scaled. "sqrt_hidden_size" (Gemma):
            `hidden_states[0] = weight[ids] * sqrt(d)`. In transformers 5 the scaling lives in
            the embedding module itself, so `get_input_embeddings()(ids)` is already scaled
            while its `.weight` rows are not.
        logit_softcapping_attr: Config key of the final logit soft-cap (Gemma2):
            `logits = cap * tanh(logits / cap)`.
        logit_scale_attr: Config key of a multiplier applied to the logits (Cohere).
        logit_divisor_attr: Config key of a divisor applied to the logits (Granite).
        logits_verified: Whether `finalize_logits(head(final_norm(h)))` was checked to give
            the model's own logits (registered entries: by the test-suite; discovered ones:
            by the discovery forward). LogitLens refuses an unverified entry.
        discovered: Made by `latentlens.models.discovery` rather than registered.
        num_layers_attr: Config key of the number of blocks.
        hidden_size_attr: Config key of the residual-stream width.
        text_config_attr: Config key of a VLM's text sub-config; its entry supplies the
            text-side facts left as `None` here.
        image_token_id_attr: Config key of the image placeholder token id (VLMs).
        is_vlm: Whether the model takes images.
        visual_grid: How a VLM's visual tokens map to a patch grid. "grid_thw": the
            processor's `image_grid_thw` (t, h, w) divided by `merge_size_attr` (Qwen-VL:
            tokens row-major over the merged grid); "square": a square grid of all the
            image tokens, row-major (LLaVA).
        merge_size_attr: Config key of the spatial merge factor (with "grid_thw").
        notes: Free-text provenance of the facts above.
    """

    layers: str | None = None
    final_norm: str | None = None
    embed_tokens: str | None = None
    last_hidden_is_normed: bool | None = None
    text_model_path: str = "model"
    inner_model_path: str | None = None
    lm_head: str = "lm_head"
    position_embeddings: str | None = None
    embed_scale: EmbedScale | None = None
    logit_softcapping_attr: str | None = None
    logit_scale_attr: str | None = None
    logit_divisor_attr: str | None = None
    logits_verified: bool = True
    discovered: bool = False
    num_layers_attr: str = "num_hidden_layers"
    hidden_size_attr: str = "hidden_size"
    text_config_attr: str | None = None
    image_token_id_attr: str | None = None
    is_vlm: bool = False
    visual_grid: Literal["grid_thw", "square"] | None = None
    merge_size_attr: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:  # noqa: D105
        if self.text_config_attr is None:
            missing = [
                f.name
                for f in dataclasses.fields(self)
                if f.name in TEXT_FIELDS and getattr(self, f.name) is None
            ]
            if missing:
                raise ValueError(f"ArchSpec without text_config_attr must set {', '.join(missing)}")
        if self.is_vlm and (self.inner_model_path is None or self.image_token_id_attr is None):
            raise ValueError("a VLM ArchSpec needs inner_model_path and image_token_id_attr")
