"""Tiny random stand-ins for the paper's models, corpus and images: the offline ``--tiny`` run.

Nothing is downloaded. The LLMs, ViTs and Qwen2-VL are the real Hugging Face classes
built from small configs (hidden 32, 3 layers) with random weights, the connectors are
random tensors under the released key names (`molmo.testing`), the tokenizer is a
word-level vocabulary of the tiny corpus, and the images are drawn shapes. Everything is
saved under ``<out>/models`` and loaded back through the same code paths as the real
models (``from_pretrained`` on local folders).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from latentlens.atomic import write_json
from molmo.model import MolmoModel
from molmo.testing import synthetic_connector, tiny_config, tiny_vit
from reproduce.judge.names import QWEN2VL
from reproduce.layout import Layout, bank_name, model_kind

logger = logging.getLogger(__name__)

TINY_MODELS: tuple[str, ...] = ("olmo-vit", "qwen-siglip", QWEN2VL)
"""Models of the default tiny run: two of the nine connector VLMs, and Qwen2-VL."""
TINY_MARKER = "tiny.json"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
BOS_ID = 2
HIDDEN, LAYERS, HEADS, VOCAB_ROWS = 32, 3, 4, 128
QWEN2VL_PATCH, QWEN2VL_MERGE, QWEN2VL_GRID = 4, 2, 6  # 48-px images → 6×6 visual tokens
VL_TOKENS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
_HF_TYPE = {"olmo": "olmo2", "llama": "llama", "qwen": "qwen2"}

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
THINGS = ("car", "dog", "cat", "house", "tree", "ball", "chair", "sky", "road", "boat", "bird")
PLACES = ("street", "park", "beach", "field", "kitchen", "garden")
RELATIONS = ("on", "near", "under", "behind", "in")
PROMPT_WORDS = "Describe this image in detail ."


def tiny_corpus(n: int = 240, seed: int = 0) -> list[str]:
    """Short region-phrase-like sentences ("a red car near the park"), deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = ["a", rng.choice(COLOURS), rng.choice(THINGS)]
        if rng.random() < 0.7:
            words += [rng.choice(RELATIONS), "the", rng.choice(THINGS + PLACES)]
        out.append(" ".join(words))
    return out


def tiny_tokenizer(corpus: list[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the corpus and the prompt; prepends ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS])
    tok.train_from_iterator([*corpus, PROMPT_WORDS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    assert fast.bos_token_id == BOS_ID and len(fast) < 96  # OLMo's tiny vocab is 100
    return fast


def _text_config(model_type: str) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_ROWS,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": BOS_ID,
        "eos_token_id": 3,
    }


def tiny_llm(llm: str, seed: int = 0) -> Any:
    """A random causal LM of the family of ``llm`` (``olmo``, ``llama``, ``qwen``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(_HF_TYPE[llm], **_text_config(_HF_TYPE[llm]))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_qwen2vl(corpus: list[str], seed: int = 0) -> tuple[Any, Any]:
    """A random Qwen2-VL (6×6 visual tokens for 48-px images) and its processor."""
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = tiny_tokenizer(corpus)
    tok.add_special_tokens({"additional_special_tokens": VL_TOKENS})
    ids = tok.convert_tokens_to_ids(VL_TOKENS)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=QWEN2VL_PATCH, merge_size=QWEN2VL_MERGE, temporal_patch_size=2
        ),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(
            patch_size=QWEN2VL_PATCH, merge_size=QWEN2VL_MERGE, temporal_patch_size=2
        ),
    )
    text = {
        **_text_config("qwen2_vl"),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
        },
    }
    vision = {
        "depth": 2,
        "embed_dim": HIDDEN,
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "patch_size": QWEN2VL_PATCH,
        "spatial_merge_size": QWEN2VL_MERGE,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "mlp_ratio": 2,
    }
    config = AutoConfig.for_model(
        "qwen2_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=ids[0],
        vision_start_token_id=ids[1],
        vision_end_token_id=ids[2],
        video_token_id=ids[3],
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    return model, processor


def tiny_images(folder: Path, n: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` drawn images (squares, and one wide image every sixth) and their captions.

    Under CLIP's padding a tiny 3×3 grid has a full 3×3 window only for square images, so
    the wide ones are skipped by the judge's sampler there (as thin images are in the paper).
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = (112, 70) if i % 6 == 5 else (84, 84)
        bg, fg = rng.sample(COLOURS[:6], 2)
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        thing = rng.choice(THINGS)
        x0, y0 = rng.randint(4, w // 3), rng.randint(4, h // 3)
        draw.ellipse((x0, y0, x0 + w // 2, y0 + h // 2), fill=fg)
        draw.rectangle((w // 2, h // 2, w - 6, h - 6), fill=rng.choice(COLOURS), outline="black")
        name = f"img{i:02d}.png"
        img.save(folder / name)
        rows.append({"image": f"images/{name}", "caption": f"a {fg} {thing} on a {bg} field"})
    return rows


def _vit_key(model: str) -> str:
    return model.split("-")[1]


def setup_tiny(layout: Layout, models: list[str], *, n_images: int = 6) -> dict[str, Any]:
    """Make (once) the tiny models, corpus and images the ``--tiny`` run needs.

    Writes ``<out>/models/``: ``llm-<llm>/`` (model + tokenizer), ``vit-<encoder>/``,
    ``<model>/connector.safetensors``, ``qwen2vl/`` (model + processor), ``data/corpus.txt``,
    ``data/images/*.png`` and ``data/images.jsonl``; then ``tiny.json`` listing them.
    Parts already on disk are kept.

    Returns:
        The content of ``tiny.json``.
    """
    from safetensors.torch import save_file

    root = layout.models
    data = root / "data"
    corpus_path = data / "corpus.txt"
    corpus = tiny_corpus()
    if not corpus_path.exists():
        data.mkdir(parents=True, exist_ok=True)
        corpus_path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    listing = data / "images.jsonl"
    if not listing.exists():
        rows = [{"index": i, **r} for i, r in enumerate(tiny_images(data / "images", n_images))]
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    tokenizer = tiny_tokenizer(corpus)
    for i, name in enumerate(models):
        if model_kind(name) == "qwen2vl":
            folder = root / QWEN2VL
            if not (folder / "config.json").exists():
                model, processor = tiny_qwen2vl(corpus, seed=i)
                model.save_pretrained(folder)
                processor.save_pretrained(folder)
            continue
        llm = bank_name(name)
        llm_dir = root / f"llm-{llm}"
        if not (llm_dir / "config.json").exists():
            tiny_llm(llm).save_pretrained(llm_dir)
            tokenizer.save_pretrained(llm_dir)
        config = tiny_config(name, bos_id=BOS_ID)
        vit_dir = root / f"vit-{_vit_key(name)}"
        if not (vit_dir / "config.json").exists():
            vit: Any = tiny_vit(config, seed=i)  # an HF vision model (typed as nn.Module)
            vit.save_pretrained(vit_dir)
        connector = root / name / "connector.safetensors"
        if not connector.exists():
            connector.parent.mkdir(parents=True, exist_ok=True)
            save_file(synthetic_connector(config, seed=i), str(connector))
    info = {
        "models": list(models),
        "corpus": "data/corpus.txt",
        "images": "data/images.jsonl",
        "qwen2vl_image_size": QWEN2VL_PATCH * QWEN2VL_MERGE * QWEN2VL_GRID,
    }
    write_json(root / TINY_MARKER, info)
    return read_tiny(layout)


def read_tiny(layout: Layout) -> dict[str, Any]:
    """The ``tiny.json`` of a tiny run, its paths made absolute.

    Raises:
        FileNotFoundError: step 1 has not made the tiny models yet.
    """
    path = layout.models / TINY_MARKER
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run step 1 with --tiny first")
    info = json.loads(path.read_text(encoding="utf-8"))
    for key in ("corpus", "images"):  # stored relative to <out>/models
        info[key] = str(layout.models / info[key])
    return info


def tiny_llm_path(layout: Layout, bank: str) -> Path:
    """Folder of the tiny model a bank is built from (an LLM, or the tiny Qwen2-VL)."""
    return layout.models / (QWEN2VL if bank == QWEN2VL else f"llm-{bank}")


def load_tiny_molmo(layout: Layout, name: str, device: str | torch.device | None = None) -> Any:
    """A tiny connector VLM from ``<out>/models``, loaded like a released one."""

    root = layout.models
    return MolmoModel.from_pretrained(
        tiny_config(name, bos_id=BOS_ID),
        connector=root / name / "connector.safetensors",
        llm_path=root / f"llm-{bank_name(name)}",
        vit_path=root / f"vit-{_vit_key(name)}",
        dtype="float32",
        device=device,
    )
