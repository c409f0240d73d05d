"""Tiny offline tokenizers and models built from configs, shared by the test modules."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SENTENCES = [
    "a red car parked next to the old house",
    "two dogs play with a ball in the green park",
    "the cat sleeps on a soft blue chair",
    "a man rides a bike down the busy street",
    "white clouds float over the tall mountain",
    "a woman holds an umbrella in the rain",
    "the kitchen table has a bowl of fruit",
    "children run across the sandy beach",
]
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
VOCAB_SIZE = 128  # model vocab; the tokenizer uses fewer ids, the rest are free for special uses
IMAGE_TOKEN_ID = 120  # placeholder id for the tiny VLMs (inside the model vocab, unused by text)
MAX_PARAMS = 1_000_000

TEXT_MODEL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo",
    "olmo2",
    "gemma",
    "gemma2",
    "cohere",
)
VLM_KINDS = ("qwen2_vl", "qwen2_5_vl", "llava")


@cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok.to_str()


def tiny_tokenizer(padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `SENTENCES` (about 60 ids) that prepends `<s>`."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side=padding_side,
    )
    assert tok.pad_token_id == PAD_ID and tok.bos_token_id == BOS_ID
    assert len(tok) < IMAGE_TOKEN_ID
    return tok


_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}

_PER_TYPE: dict[str, dict[str, Any]] = {
    "gpt2": {
        "vocab_size": VOCAB_SIZE,
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 64,
        "n_inner": 64,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    },
    "gemma": {"head_dim": 8},
    "qwen3": {"head_dim": 8},
    "gemma2": {
        "head_dim": 8,
        "sliding_window": 4,  # smaller than the test sequences so the local layers matter
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "cohere": {"logit_scale": 0.5},
}


def _check_size(model: PreTrainedModel) -> PreTrainedModel:
    n = sum(p.numel() for p in model.parameters())
    assert n < MAX_PARAMS, f"tiny {model.config.model_type} has {n:,} parameters"
    return model.eval()


def tiny_config(model_type: str, vocab_size: int = VOCAB_SIZE, **overrides: Any):
    """A tiny `PretrainedConfig` of a text model type (3 layers, d=32, 4 heads)."""
    kwargs = (
        dict(_PER_TYPE["gpt2"])
        if model_type == "gpt2"
        else {**_COMMON, **_PER_TYPE.get(model_type, {})}
    )
    kwargs["vocab_size"] = vocab_size
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_causal_lm(
    model_type: str, vocab_size: int = VOCAB_SIZE, **overrides: Any
) -> PreTrainedModel:
    """A random `AutoModelForCausalLM` of `model_type`: fp32, eval mode, < 1M params."""
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size, **overrides)
    return _check_size(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def _qwen_vl_config(kind: str, text: dict[str, Any]) -> Any:
    vision: dict[str, Any] = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32,  # output width of the merger = text hidden size
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if kind == "qwen2_vl":
        vision["mlp_ratio"] = 2
    else:
        vision.update(
            intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]
        )
    text = {
        **text,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
        },
    }
    return AutoConfig.for_model(
        kind,
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=IMAGE_TOKEN_ID + 1,
        vision_start_token_id=IMAGE_TOKEN_ID + 2,
        vision_end_token_id=IMAGE_TOKEN_ID + 3,
    )


def _llava_config(text: dict[str, Any]) -> Any:
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 4,
        "projection_dim": 32,
    }
    return AutoConfig.for_model(
        "llava",
        text_config={"model_type": "llama", **text},
        vision_config=vision,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_vlm(kind: Literal["qwen2_vl", "qwen2_5_vl", "llava"]) -> PreTrainedModel:
    """A randomly initialised `AutoModelForImageTextToText` (head_dim 8, < 1M params)."""
    torch.manual_seed(0)
    text = {k: v for k, v in _COMMON.items()}
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        config = _qwen_vl_config(kind, text)
    elif kind == "llava":
        config = _llava_config(text)
    else:
        raise ValueError(f"unknown tiny VLM kind {kind!r}")
    return _check_size(AutoModelForImageTextToText.from_config(config, dtype=torch.float32))


def vlm_inputs(
    model: PreTrainedModel, batch: int = 2, prompt_len: int = 5
) -> dict[str, torch.Tensor]:
    """Random image + prompt inputs for a `tiny_vlm`, the image tokens after a BOS token.

    Row 0 is left-padded by two tokens (attention mask 0) so masks are exercised.
    """
    g = torch.Generator().manual_seed(1)
    config = model.config
    if config.model_type == "llava":
        vc = config.vision_config
        grid = vc.image_size // vc.patch_size
        n_image = grid * grid
        extra: dict[str, torch.Tensor] = {
            "pixel_values": torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
        }
    else:
        vc = config.vision_config
        h = w = 4  # patches per side before merging
        n_image = h * w // vc.spatial_merge_size**2
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        extra = {
            "pixel_values": torch.randn(batch * h * w, patch_dim, generator=g),
            "image_grid_thw": torch.tensor([[1, h, w]] * batch),
        }
    text = torch.randint(4, 40, (batch, prompt_len), generator=g)
    image = torch.full((batch, n_image), IMAGE_TOKEN_ID)
    bos = torch.full((batch, 1), BOS_ID)
    input_ids = torch.cat([bos, image, text], dim=1)
    attention_mask = torch.ones_like(input_ids)
    pad = torch.full((batch, 2), PAD_ID)
    input_ids = torch.cat([pad, input_ids], dim=1)
    attention_mask = torch.cat([torch.zeros_like(pad), attention_mask], dim=1)
    attention_mask[1:, :2] = 1  # only row 0 is padded; the others see the two ids as text
    input_ids[1:, :2] = 5
    out = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if config.model_type != "llava":
        out["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN_ID).int()
    return out
