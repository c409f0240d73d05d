"""Names of the paper's models and lenses, their aliases, and each model's vision encoder."""

from __future__ import annotations

from reproduce.judge.render import Encoder

LLMS = ("olmo", "llama", "qwen")
ENCODER_SHORT = ("vit", "dino", "siglip")  # CLIP ViT-L/14-336, DINOv2-L/14, SigLIP so400m
CONNECTOR_MODELS = tuple(f"{llm}-{enc}" for llm in LLMS for enc in ENCODER_SHORT)
QWEN2VL = "qwen2vl"
MODEL_LABELS = {
    **{
        f"{llm}-{enc}": f"{l_name}+{e_name}"
        for llm, l_name in zip(LLMS, ("OLMo", "Llama", "Qwen2"), strict=True)
        for enc, e_name in zip(ENCODER_SHORT, ("CLIP", "DINOv2", "SigLIP"), strict=True)
    },
    QWEN2VL: "Qwen2-VL-7B",
}

LENSES = ("latentlens", "logitlens", "embeddinglens")
LENS_LABELS = {
    "latentlens": "LatentLens",
    "logitlens": "LogitLens",
    "embeddinglens": "EmbeddingLens",
}
_LENS_ALIASES = {
    "latentlens": "latentlens",
    "latent_lens": "latentlens",
    "latent": "latentlens",
    "contextual": "latentlens",
    "logitlens": "logitlens",
    "logit_lens": "logitlens",
    "logit": "logitlens",
    "embeddinglens": "embeddinglens",
    "embedding_lens": "embeddinglens",
    "embedding": "embeddinglens",
    "nn": "embeddinglens",
}


def canonical_lens(name: str) -> str:
    """``latentlens`` / ``logitlens`` / ``embeddinglens`` for a known alias, else ``name``."""
    return _LENS_ALIASES.get(name.lower().replace("-", "_"), name)


def canonical_model(name: str) -> str | None:
    """The paper's short name (``olmo-vit``, …, ``qwen2vl``) that a model name points to.

    Works on short names, the long ``olmo-7b+vit-l-14-336`` style and checkpoint folder
    names; ``None`` when the name names no paper model.
    """
    low = name.lower()
    if any(s in low for s in ("qwen2vl", "qwen2-vl", "qwen2_vl")):
        return QWEN2VL
    llm = next((m for m in LLMS if m in low), None)
    if "siglip" in low:
        enc = "siglip"
    elif "dino" in low:
        enc = "dino"
    elif "vit" in low or "clip" in low:
        enc = "vit"
    else:
        enc = None
    return f"{llm}-{enc}" if llm and enc else None


def encoder_for_model(name: str) -> Encoder:
    """How a model's vision encoder framed its images (for drawing what it saw).

    Raises:
        ValueError: the name does not tell (pass the encoder explicitly).
    """
    canon = canonical_model(name)
    if canon == QWEN2VL:
        return "qwen2vl"
    low = name.lower()
    for key, enc in (("siglip", "siglip"), ("dino", "dinov2"), ("clip", "clip"), ("vit", "clip")):
        if key in low:
            return enc  # type: ignore[return-value]
    raise ValueError(
        f"cannot tell the vision encoder of {name!r}; pass it explicitly "
        "(clip, siglip, dinov2 or qwen2vl)"
    )


def default_convention(model: str | None) -> str:
    """The real-patch rule the judge uses by default for a model: the released
    evaluator's ("original", which reproduces its patch choice) for the paper's models,
    the encoder's own input for any other VLM."""
    return "original" if model in (*CONNECTOR_MODELS, QWEN2VL) else "encoder"
