"""Tiny random VLMs of the real classes, each with a real processor built offline.

`build(family)` returns a :class:`Subject`: the model, its processor and how to write a
prompt with N images (or a video) in it. Sizes are tiny (hidden 32, 2 layers, patch 4)
but the geometry is the family's own: the processors resize, crop, tile and expand the
placeholder tokens exactly as they do for the released checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers
from transformers import AutoConfig, AutoModelForImageTextToText

from latentlens.models.hooks import get_hidden_states
from latentlens.models.visual import VISUAL_FAMILIES
from latentlens.visual_layout import TokenAddress, VisualLayout, layout_visual_tokens
from tests.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

_TEXT = dict(
    vocab_size=160,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    projection_dim=32,
)
# One layer: random attention spreads a local change over every patch; the geometry under
# test (resize, crop, pooling, order) is the same with one layer as with 27.
_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
)


@dataclass
class Subject:
    """A tiny VLM with its processor.

    Attributes:
        model: the VLM (eval mode, fp32).
        processor: its processor.
        prompt: ``n_images → text`` with the placeholders the processor expands.
        video_prompt: ``text`` with one video placeholder, or ``None`` (no video).
        kwargs: extra processor arguments.
    """

    family: str
    model: Any
    processor: Any
    prompt: Callable[[int], str]
    video_prompt: str | None = None
    kwargs: dict[str, Any] | None = None


def _tokenizer(tokens: list[str]) -> Any:
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": tokens})
    return tok


def _model(model_type: str, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # some projections start at zero (Gemma 3's): make them random too
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.2)
    return model


def _ids(tok: Any, tokens: list[str]) -> list[int]:
    return [int(i) for i in tok.convert_tokens_to_ids(tokens)]


_QWEN_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def _qwen(family: str) -> Subject:
    from transformers import AutoProcessor  # noqa: F401  (the classes below are its own)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    tok = _tokenizer(_QWEN_TOKENS)
    image, video, start, end = _ids(tok, _QWEN_TOKENS)
    vision: dict[str, Any] = dict(
        depth=2,
        hidden_size=32,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    text = {
        **_TEXT,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
    }
    if family == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Proc
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor as Video,
        )

        vision.update(embed_dim=32, mlp_ratio=2)
        ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Proc
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor as Video,
        )

        vision.update(
            intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]
        )
        ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    else:  # qwen3_vl, qwen3_vl_moe, qwen3_5: Qwen3-VL's processor
        from transformers import Qwen3VLProcessor as Proc
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor as Video,
        )

        vision.update(
            intermediate_size=64,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        text["rope_parameters"]["mrope_section"] = [2, 1, 1]
        ip = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = Proc(image_processor=ip, tokenizer=tok, video_processor=Video(**sizes))
    if family in ("qwen3_vl_moe", "qwen3_5_moe"):
        text.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
        )
    model = _model(
        family,
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    one = "<|vision_start|><|image_pad|><|vision_end|>"
    return Subject(
        family,
        model,
        proc,
        lambda n: "".join(f"{one} picture {i}. " for i in range(n)) + "Describe.",
        "<|vision_start|><|video_pad|><|vision_end|>Describe the video.",
        {"videos_kwargs": {"do_sample_frames": False}},
    )


_LLAVA_PROCESSOR = dict(
    patch_size=4,
    vision_feature_select_strategy="default",
    image_token="<image>",
    num_additional_image_tokens=1,
)


def _llava_model(model_type: str, tok: Any, **extra: Any) -> Any:
    """A tiny LLaVA-family model: Llama text, CLIP vision, the penultimate layer's patches."""
    return _model(
        model_type,
        text_config={"model_type": "llama", **_TEXT},
        vision_config=_CLIP,
        image_token_index=_ids(tok, ["<image>"])[0],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra,
    )


def _llava() -> Subject:
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = _tokenizer(["<image>"])
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, **_LLAVA_PROCESSOR)
    model = _llava_model("llava", tok)
    return Subject("llava", model, proc, lambda n: "<image> " * n + "Describe.")


BUILDERS: dict[str, Callable[[], Subject]] = {
    "qwen2_vl": lambda: _qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen("qwen3_vl"),
    "llava": _llava,
}


def build(family: str) -> Subject:
    """The tiny subject of one family."""
    return BUILDERS[family]()


def _paligemma() -> Subject:
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    tok = _tokenizer(["<image>"])
    ip = SiglipImageProcessor(size={"height": 16, "width": 16})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    model = _model(
        "paligemma",
        text_config={"model_type": "gemma", **_TEXT, "vocab_size": len(tok)},
        vision_config={**_SIGLIP, "projection_dim": 32},
        image_token_index=_ids(tok, ["<image>"])[0],
        projection_dim=32,
    )
    return Subject("paligemma", model, proc, lambda n: "<image>" * n + "Describe.")


def _gemma3() -> Subject:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokens = ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
    tok = _tokenizer(tokens)
    boi, image, eoi = _ids(tok, tokens)
    tok.boi_token, tok.image_token, tok.eoi_token = tokens
    tok.boi_token_id, tok.image_token_id, tok.eoi_token_id = boi, image, eoi
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4)
    model = _model(
        "gemma3",
        text_config={"model_type": "gemma3_text", **_TEXT},
        vision_config={**_SIGLIP, "image_size": 32},
        image_token_index=image,
        boi_token_index=boi,
        eoi_token_index=eoi,
        mm_tokens_per_image=4,
    )
    return Subject("gemma3", model, proc, lambda n: "<start_of_image> " * n + "Describe.")


def _mistral3() -> Subject:
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokens = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _tokenizer(tokens)
    ip = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=4)
    proc = PixtralProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        spatial_merge_size=2,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )
    model = _model(
        "mistral3",
        text_config={"model_type": "mistral", **_TEXT},
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=4,
            head_dim=8,
        ),
        image_token_index=_ids(tok, ["[IMG]"])[0],
        spatial_merge_size=2,
    )
    return Subject("mistral3", model, proc, lambda n: "[IMG]" * n + "Describe.")


_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _llava_next() -> Subject:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tok = _tokenizer(["<image>"])
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=_PINPOINTS,
    )
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, **_LLAVA_PROCESSOR)
    model = _llava_model("llava_next", tok, image_grid_pinpoints=_PINPOINTS)
    return Subject("llava_next", model, proc, lambda n: "<image> " * n + "Describe.")


def _llava_onevision() -> Subject:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    tok = _tokenizer(["<image>", "<video>"])
    size = {"height": 16, "width": 16}
    ip = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_PINPOINTS)
    proc = LlavaOnevisionProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="<video>",
    )
    image, video = _ids(tok, ["<image>", "<video>"])
    model = _model(
        "llava_onevision",
        text_config={"model_type": "qwen2", **_TEXT},
        vision_config=_SIGLIP,
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return Subject(
        "llava_onevision",
        model,
        proc,
        lambda n: "<image> " * n + "Describe.",
        "<video>Describe the video.",
        {"videos_kwargs": {"do_sample_frames": False}},
    )


def _llava_next_video() -> Subject:
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor
    from transformers.models.llava_next_video.video_processing_llava_next_video import (
        LlavaNextVideoVideoProcessor,
    )

    tok = _tokenizer(["<image>", "<video>"])
    size = {"shortest_edge": 16}
    crop = {"height": 16, "width": 16}
    ip = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=_PINPOINTS)
    proc = LlavaNextVideoProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=LlavaNextVideoVideoProcessor(size=size, crop_size=crop),
        video_token="<video>",
        **_LLAVA_PROCESSOR,
    )
    model = _llava_model(
        "llava_next_video",
        tok,
        video_token_index=_ids(tok, ["<video>"])[0],
        image_grid_pinpoints=_PINPOINTS,
        spatial_pool_stride=2,
    )
    return Subject(
        "llava_next_video",
        model,
        proc,
        lambda n: "<image> " * n + "Describe.",
        "<video>Describe the video.",
        {"videos_kwargs": {"do_sample_frames": False}},
    )


def _vipllava() -> Subject:
    s = _llava()
    model = _model(
        "vipllava",
        text_config={"model_type": "llama", **_TEXT},
        vision_config=_CLIP,
        image_token_index=s.model.config.image_token_index,
        vision_feature_layers=[-2, -1],
    )
    return Subject("vipllava", model, s.processor, s.prompt)


_MARKERS = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def _idefics3(family: str) -> Subject:
    if family == "idefics3":
        from transformers import Idefics3ImageProcessor as Images
        from transformers import Idefics3Processor as Proc
    else:
        from transformers import SmolVLMImageProcessor as Images
        from transformers import SmolVLMProcessor as Proc
    tok = _tokenizer(_MARKERS)
    ip = Images(
        size={"longest_edge": 48}, max_image_size={"longest_edge": 16}, do_image_splitting=True
    )
    kwargs: dict[str, Any] = {}
    if family == "smolvlm":
        from transformers import SmolVLMVideoProcessor

        kwargs["video_processor"] = SmolVLMVideoProcessor()
    proc = Proc(image_processor=ip, tokenizer=tok, image_seq_len=4, **kwargs)
    model = _model(
        family,
        text_config={"model_type": "llama", **_TEXT, "vocab_size": len(tok)},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
        },
        image_token_id=_ids(tok, ["<image>"])[0],
        scale_factor=2,
    )
    return Subject(family, model, proc, lambda n: "<image>" * n + "Describe.")


def _internvl() -> Subject:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    names = ["<IMG_CONTEXT>", "<img>", "</img>", "<video>"]
    tok = _tokenizer(names)
    ctx, start, end, video = _ids(tok, names)
    tok.context_image_token, tok.start_image_token, tok.end_image_token = names[:3]
    tok.video_token = names[3]
    tok.context_image_token_id, tok.start_image_token_id, tok.end_image_token_id = ctx, start, end
    tok.video_token_id = video
    size = {"height": 16, "width": 16}
    ip = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=6)
    proc = InternVLProcessor(
        image_processor=ip,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=4,
    )
    model = _model(
        "internvl",
        text_config={"model_type": "qwen2", **_TEXT},
        vision_config=dict(
            model_type="internvl_vision",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=[16, 16],
            patch_size=[4, 4],
        ),
        image_token_id=ctx,
        downsample_ratio=0.5,
    )
    return Subject("internvl", model, proc, lambda n: "<IMG_CONTEXT> " * n + "Describe.")


_LLAMA4_TOKENS = [
    "<|image|>",
    "<|patch|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]


def _llama4() -> Subject:
    from transformers import Llama4ImageProcessorFast, Llama4Processor

    tok = _tokenizer(_LLAMA4_TOKENS)
    ip = Llama4ImageProcessorFast(size={"height": 16, "width": 16}, max_patches=6)
    proc = Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=4, pixel_shuffle_ratio=0.5)
    model = _model(
        "llama4",
        text_config=dict(
            vocab_size=160,
            hidden_size=32,
            intermediate_size=64,
            intermediate_size_mlp=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,  # the pixel-shuffle MLP's input: 32 channels / 0.5²
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
            pixel_shuffle_ratio=0.5,
        ),
        image_token_index=_ids(tok, ["<|patch|>"])[0],
    )
    return Subject("llama4", model, proc, lambda n: "<|image|> " * n + "Describe.")


def _aya_vision() -> Subject:
    from transformers import AyaVisionProcessor, GotOcr2ImageProcessor

    names = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|IMG_PATCH|>"]
    tok = _tokenizer(names + [f"TILE_{i}" for i in range(1, 13)] + ["TILE_GLOBAL"])
    ip = GotOcr2ImageProcessor(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=6
    )
    proc = AyaVisionProcessor(
        image_processor=ip, tokenizer=tok, patch_size=4, img_size=16, downsample_factor=2
    )
    model = _model(
        "aya_vision",
        text_config={"model_type": "cohere2", **_TEXT, "vocab_size": len(tok)},
        vision_config=_SIGLIP,
        image_token_index=_ids(tok, ["<|IMG_PATCH|>"])[0],
        downsample_factor=2,
    )
    return Subject("aya_vision", model, proc, lambda n: "<image> " * n + "Describe.")


_MOLMO2_TOKENS = [
    "<|image|>",
    "<|video|>",
    "<im_patch>",
    "<im_col>",
    "<im_start>",
    "<low_res_im_start>",
    "<im_end>",
    "<frame_start>",
    "<frame_end>",
]


def _molmo2() -> Subject:
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    tok = _tokenizer(_MOLMO2_TOKENS)
    tok.image_token, tok.video_token = "<|image|>", "<|video|>"
    ids = dict(zip(_MOLMO2_TOKENS, _ids(tok, _MOLMO2_TOKENS), strict=True))
    pooling = dict(size={"height": 16, "width": 16}, patch_size=4, pooling_size=[2, 2])
    proc = Molmo2Processor(
        image_processor=Molmo2ImageProcessor(**pooling, max_crops=4, overlap_margins=[1, 1]),
        video_processor=Molmo2VideoProcessor(**pooling),
        tokenizer=tok,
    )
    head = dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    model = _model(
        "molmo2",
        text_config=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tok),
            additional_vocab_size=16,
            num_hidden_layers=2,
            intermediate_size=64,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            patch_size=4,
            num_position_embeddings=16,
            **head,
        ),
        adapter_config=dict(
            hidden_size=32,
            intermediate_size=64,
            text_hidden_size=32,
            vision_feature_layer=[-1],
            **head,
        ),
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
    )
    with torch.no_grad():  # its initializer (std 0.02) leaves the image features nearly constant
        for n, param in model.named_parameters():
            if param.ndim >= 2 and ("vision" in n or "multi_modal_projector" in n):
                param.normal_(0.0, 0.1)
    return Subject("molmo2", model, proc, lambda n: "<|image|> " * n + "Describe.")


BUILDERS.update(
    molmo2=_molmo2,
    llava_next_video=_llava_next_video,
    aya_vision=_aya_vision,
    llama4=_llama4,
    internvl=_internvl,
    idefics3=lambda: _idefics3("idefics3"),
    smolvlm=lambda: _idefics3("smolvlm"),
    vipllava=_vipllava,
    qwen3_vl_moe=lambda: _qwen("qwen3_vl_moe"),
    qwen3_5=lambda: _qwen("qwen3_5"),
    qwen3_5_moe=lambda: _qwen("qwen3_5_moe"),
    paligemma=_paligemma,
    gemma3=_gemma3,
    mistral3=_mistral3,
    llava_next=_llava_next,
    llava_onevision=_llava_onevision,
)


# ── the checks, shared by the tests and the compatibility matrix ──────────────────────


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def paint(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The image with the middle half of ``box`` painted a flat colour."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
    arr = np.array(image)
    arr[round(y0 + dy) : round(y1 - dy), round(x0 + dx) : round(x1 - dx)] = (255, 0, 255)
    return Image.fromarray(arr)


def encode(s: Subject, images: list[Image.Image]) -> dict:
    """The processor's inputs for ``images`` in the subject's prompt."""
    return dict(
        s.processor(
            text=[s.prompt(len(images))], images=images, return_tensors="pt", **(s.kwargs or {})
        )
    )


def encode_video(s: Subject, frames: list[Image.Image]) -> dict:
    """The processor's inputs for one video of ``frames``."""
    return dict(
        s.processor(text=[s.video_prompt], videos=[frames], return_tensors="pt", **(s.kwargs or {}))
    )


def layer0(s: Subject, inputs: dict, layout: VisualLayout) -> torch.Tensor:
    """``[N, d]`` layer-0 states of the visual tokens, in layout order."""
    with torch.inference_mode():
        return get_hidden_states(s.model, layers=[0], **inputs)[0][0, layout.positions]


def most_moved(s: Subject, images: list[Image.Image], target: TokenAddress) -> TokenAddress:
    """The token of ``target``'s grid whose layer-0 state moves most when ``target``'s
    pixel box is painted over (a region is seen by every crop that covers it)."""
    sizes = [im.size for im in images]
    inputs = encode(s, images)
    layout = layout_visual_tokens(s.model, inputs, s.processor, image_sizes=sizes)
    before = layer0(s, inputs, layout)
    changed = list(images)
    changed[target.image_index] = paint(images[target.image_index], target.pixel_box)
    inputs2 = encode(s, changed)
    after = layer0(
        s, inputs2, layout_visual_tokens(s.model, inputs2, s.processor, image_sizes=sizes)
    )
    same = [
        i
        for i, t in enumerate(layout.tokens)
        if (t.image_index, t.crop, t.frame) == (target.image_index, target.crop, target.frame)
    ]
    return layout.tokens[same[int((after - before)[same].norm(dim=-1).argmax())]]


def _picks(layout: VisualLayout) -> list[TokenAddress]:
    out = []
    for g in layout.grids:
        h, w = g.shape
        for r, c in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
            out.append(layout.find(g.image_index, r, c, crop=g.crop, frame=g.frame))
    return out


def _video_ok(s: Subject) -> bool:
    frames = [noise(48, 32, 10 + i) for i in range(4)]
    args = dict(video_sizes=[frames[0].size], video_frames=[len(frames)])
    inputs = encode_video(s, frames)
    layout = layout_visual_tokens(s.model, inputs, s.processor, **args)
    before = layer0(s, inputs, layout)
    merged = 2 if VISUAL_FAMILIES[s.family].video_layout == "grid_thw" else 1
    for f in (1, 2):
        target = layout.find(0, 1, 1, frame=f - f % merged)
        changed = list(frames)
        changed[f] = paint(frames[f], target.pixel_box)
        inputs2 = encode_video(s, changed)
        after = layer0(s, inputs2, layout_visual_tokens(s.model, inputs2, s.processor, **args))
        if layout.tokens[int((after - before).norm(dim=-1).argmax())] != target:
            return False
    return True


def _kind(name: str) -> str:
    """A crop or separator name with its numbers generalised (``tile 0,1`` → ``tile i,j``)."""
    import re

    name = re.sub(r"tile \d+,\d+", "tile i,j", name)
    name = re.sub(r"TILE_\d+", "TILE_k", name)
    return re.sub(r"<row_\d+_col_\d+>", "<row_i_col_j>", name)


def probe(family: str) -> dict[str, str]:
    """What works for one family: each cell checked from the pixels as the tests do."""
    s = build(family)
    one, two = [noise(64, 48, 1)], [noise(64, 48, 1), noise(40, 56, 2)]
    cells: dict[str, str] = {"class": type(s.model).__name__}
    for name, images in (("image", one), ("multi-image", two)):
        layout = layout_visual_tokens(
            s.model, encode(s, images), s.processor, image_sizes=[im.size for im in images]
        )
        ok = all(most_moved(s, images, t) == t for t in _picks(layout))
        cells[name] = "✓" if ok else "✗"
        if name == "image":
            crops = sorted({_kind(g.crop) for g in layout.grids if g.crop})
            cells["crops"] = ", ".join(crops) if crops else "one grid"
            kinds = sorted({_kind(sep.kind) for sep in layout.separators})
            # a "|" inside a table cell must be escaped, even in code
            cells["separators"] = ", ".join(f"`{k}`".replace("|", "\\|") for k in kinds) or "—"
    cells["video"] = ("✓" if _video_ok(s) else "✗") if s.video_prompt else "—"
    return cells


def markdown() -> str:
    """The compatibility matrix (docs/vlm_compatibility.md)."""
    lines = [
        "# VLM families: visual tokens addressed",
        "",
        f"Generated by `python tests/vlm_families.py --markdown` with transformers "
        f"{transformers.__version__}; `tests/test_visual_layout.py` fails when this file and",
        "the checks disagree. Every ✓ is checked on a tiny random model of the real class with a",
        "real processor: painting a token's pixel box moves that token's layer-0 state most (three",
        "tokens per grid; for video, one frame of a temporal group).",
        "",
        "| family | class | image | multi-image | video | crops | separators |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family in sorted(BUILDERS):
        c = probe(family)
        lines.append(
            f"| `{family}` | `{c['class']}` | {c['image']} | {c['multi-image']} | {c['video']} "
            f"| {c['crops']} | {c['separators']} |"
        )
    untested = sorted(set(VISUAL_FAMILIES) - set(BUILDERS))
    if untested:
        lines += [
            "",
            "Registered without a tiny test model: " + ", ".join(f"`{f}`" for f in untested) + ".",
        ]
    lines += [
        "",
        "Not addressed yet (a clear error names the family): "
        + ", ".join(f"`{f}`" for f in NOT_YET)
        + ".",
    ]
    return "\n".join(lines) + "\n"


NOT_YET = ("glm4v",)


def main() -> None:
    """Print the compatibility matrix (``--markdown``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print docs/vlm_compatibility.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.markdown:
        sys.stdout.write(markdown())


if __name__ == "__main__":
    main()
