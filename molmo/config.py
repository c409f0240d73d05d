"""The nine connector VLMs of the LatentLens paper: names, Hub ids and dimensions in one table.

Three LLMs × three vision encoders, each pair joined by a trained SwiGLU connector
(SPEC §5). Every number the rest of `molmo` needs lives here; the real table holds the
released models' values, and tests build tiny variants with `dataclasses.replace`.

========================  =====  ======  =====  ====  ===========  =========  ======  ====
name                      LLM    layers  d      ViT   ViT layers   features   grid    seq
========================  =====  ======  =====  ====  ===========  =========  ======  ====
olmo-vit                  OLMo   32      4096   CLIP  (22, 15)     2048       24×24   602
olmo-dino                 OLMo   32      4096   DINO  (23, 16)     2048       24×24   602
olmo-siglip               OLMo   32      4096   SigL  (26, 19)     2304       27×27   758
llama-vit                 Llama  32      4096   CLIP  (22, 15)     2048       24×24   602
llama-dino                Llama  32      4096   DINO  (23, 16)     2048       24×24   602
llama-siglip              Llama  32      4096   SigL  (26, 19)     2304       27×27   758
qwen-vit                  Qwen2  28      3584   CLIP  (22, 15)     2048       24×24   602
qwen-dino                 Qwen2  28      3584   DINO  (23, 16)     2048       24×24   602
qwen-siglip               Qwen2  28      3584   SigL  (26, 19)     2304       27×27   758
========================  =====  ======  =====  ====  ===========  =========  ======  ====

"seq" is the image block: [<im_start>] + H·(W + 1) + [<im_end>] tokens. Names are the
folder names of the released connectors on the Hub (`McGill-NLP/latentlens-connectors`);
aliases such as "olmo-7b_clip" or "qwen2-7b_dinov2" resolve to them (`resolve_name`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

VisionKind = Literal["clip", "dinov2", "siglip"]
LLMFamily = Literal["olmo", "llama", "qwen2"]

CONNECTOR_REPO = "McGill-NLP/latentlens-connectors"
CONNECTOR_FILE = "connector.pt"
PROMPT = "Describe this image in detail."
N_SPECIAL_EMBEDDINGS = 128  # rows of `new_embedding` in every released checkpoint
SPECIAL_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
"""Special tokens in id order: token i has id `vocab_size + i`."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A frozen vision encoder and how images are prepared for it.

    Attributes:
        kind: "clip" (aspect-preserving resize + black padding), "dinov2" (bicubic
            stretch) or "siglip" (bilinear stretch, pixels in [-1, 1]).
        hub_id: Hugging Face id of the encoder.
        image_size: side of the square crop fed to the encoder, in pixels.
        patch_size: ViT patch side in pixels.
        width: hidden size of the ViT.
        feature_layers: HF `hidden_states` indices concatenated into the features, deeper
            first (index i = output of block i-1).
        has_cls: whether the ViT prepends a class token (dropped from the features).
    """

    kind: VisionKind
    hub_id: str
    image_size: int
    patch_size: int
    width: int
    feature_layers: tuple[int, ...]
    has_cls: bool

    def __post_init__(self) -> None:  # noqa: D105
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not self.feature_layers or min(self.feature_layers) < 0:
            raise ValueError(f"feature_layers must be non-negative indices: {self.feature_layers}")

    @property
    def grid(self) -> int:
        """Patches per side (H = W)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Visual tokens per image, H·W."""
        return self.grid * self.grid

    @property
    def feature_dim(self) -> int:
        """Width of the concatenated ViT features (connector input)."""
        return len(self.feature_layers) * self.width

    @property
    def num_blocks_needed(self) -> int:
        """ViT blocks that must run to reach the deepest feature layer."""
        return max(self.feature_layers)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Normalisation constants (`None` for SigLIP, which maps [0, 1] to [-1, 1])."""
        if self.kind == "clip":
            return CLIP_MEAN, CLIP_STD
        if self.kind == "dinov2":
            return IMAGENET_MEAN, IMAGENET_STD
        return None


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    """A frozen language model and the Molmo vocabulary facts around it.

    Attributes:
        family: "olmo", "llama" or "qwen2".
        hub_id: Hugging Face id of the LLM.
        num_layers: decoder blocks.
        d_model: residual-stream width.
        vocab_size: Molmo's vocabulary size; special ids are `vocab_size + 0..4`.
        embedding_size: rows of the LLM's input embedding matrix (OLMo pads to 100352).
        bos_id: the token put first in every sequence.
        connector_hidden: hidden width of the connector (half the config's mlp_hidden_size).
        rms_norm_eps: RMSNorm epsilon used by every Molmo model (HF Llama-3 ships 1e-5).
        rope_theta: RoPE base (recorded for reference; HF configs carry it).
    """

    family: LLMFamily
    hub_id: str
    num_layers: int
    d_model: int
    vocab_size: int
    embedding_size: int
    bos_id: int
    connector_hidden: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500_000.0


@dataclass(frozen=True, kw_only=True)
class MolmoConfig:
    """One connector VLM: an LLM, a vision encoder and the sequence layout joining them.

    Attributes:
        name: the released model name (folder in the connector repo).
        llm: the language model.
        vision: the vision encoder.
        prompt: text after the image block (tokenised without special tokens).
        connector_repo: Hub repo of the released connector weights.
    """

    name: str
    llm: LLMConfig
    vision: VisionConfig
    prompt: str = PROMPT
    connector_repo: str = CONNECTOR_REPO

    @property
    def special_ids(self) -> dict[str, int]:
        """`{"<im_start>": vocab_size, ..., "<|image|>": vocab_size + 4}`."""
        return {tok: self.llm.vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}

    @property
    def im_start_id(self) -> int:  # noqa: D102
        return self.llm.vocab_size

    @property
    def im_end_id(self) -> int:  # noqa: D102
        return self.llm.vocab_size + 1

    @property
    def im_patch_id(self) -> int:  # noqa: D102
        return self.llm.vocab_size + 2

    @property
    def im_col_id(self) -> int:  # noqa: D102
        return self.llm.vocab_size + 3

    @property
    def image_block_length(self) -> int:
        """Tokens from <im_start> to <im_end> inclusive: 1 + H·(W + 1) + 1."""
        g = self.vision.grid
        return 1 + g * (g + 1) + 1

    def patch_position(self, row: int, col: int) -> int:
        """Sequence position of patch (row, col): 2 + row·(W + 1) + col (after BOS, <im_start>)."""
        g = self.vision.grid
        if not (0 <= row < g and 0 <= col < g):
            raise IndexError(f"patch ({row}, {col}) outside the {g}×{g} grid")
        return 2 + row * (g + 1) + col

    @property
    def connector_filename(self) -> str:
        """Path of the connector inside `connector_repo`."""
        return f"{self.name}/{CONNECTOR_FILE}"


# ── the real table ─────────────────────────────────────────────────────────────────────

LLMS: dict[str, LLMConfig] = {
    "olmo": LLMConfig(
        family="olmo",
        hub_id="allenai/OLMo-7B-1024-preview",
        num_layers=32,
        d_model=4096,
        vocab_size=100278,
        embedding_size=100352,
        bos_id=100257,  # <|endoftext|>, used as BOS
        connector_hidden=11008,
        rope_theta=500_000.0,
    ),
    "llama": LLMConfig(
        family="llama",
        hub_id="meta-llama/Meta-Llama-3-8B",
        num_layers=32,
        d_model=4096,
        vocab_size=128256,
        embedding_size=128256,
        bos_id=128000,  # <|begin_of_text|>
        connector_hidden=14336,
        rope_theta=500_000.0,
    ),
    "qwen": LLMConfig(
        family="qwen2",
        hub_id="Qwen/Qwen2-7B",
        num_layers=28,
        d_model=3584,
        vocab_size=152064,
        embedding_size=152064,
        bos_id=151643,  # <|endoftext|>, used as BOS
        connector_hidden=18944,
        rope_theta=1_000_000.0,
    ),
}

VISION_ENCODERS: dict[str, VisionConfig] = {
    "vit": VisionConfig(
        kind="clip",
        hub_id="openai/clip-vit-large-patch14-336",
        image_size=336,
        patch_size=14,
        width=1024,
        feature_layers=(22, 15),
        has_cls=True,
    ),
    "dino": VisionConfig(
        kind="dinov2",
        hub_id="facebook/dinov2-large",
        image_size=336,
        patch_size=14,
        width=1024,
        feature_layers=(23, 16),
        has_cls=True,
    ),
    "siglip": VisionConfig(
        kind="siglip",
        hub_id="google/siglip-so400m-patch14-384",
        image_size=378,
        patch_size=14,
        width=1152,
        feature_layers=(26, 19),
        has_cls=False,
    ),
}

MODELS: dict[str, MolmoConfig] = {
    f"{llm_key}-{vit_key}": MolmoConfig(name=f"{llm_key}-{vit_key}", llm=llm, vision=vit)
    for llm_key, llm in LLMS.items()
    for vit_key, vit in VISION_ENCODERS.items()
}
"""The nine released models by name ("olmo-vit", ..., "qwen-siglip")."""

_LLM_ALIASES = {
    "olmo": ("olmo", "olmo-7b", "olmo7b", "olmo-7b-1024-preview", "olmo-1024-preview"),
    "llama": ("llama", "llama3", "llama-3", "llama3-8b", "llama-3-8b", "meta-llama-3-8b"),
    "qwen": ("qwen", "qwen2", "qwen-2", "qwen2-7b", "qwen-2-7b"),
}
_VIT_ALIASES = {
    "vit": ("vit", "clip", "openai", "vit-l-14-336", "clip-vit-l-14-336", "clip-l-14-336"),
    "dino": ("dino", "dinov2", "dinov2-large", "dinov2-large-336", "dinov2-l-14"),
    "siglip": ("siglip", "siglip-so400m", "siglip-so400m-14-384", "siglip-so400m-14-378"),
}


def _aliases() -> Iterator[tuple[str, str]]:
    for llm_key, llm_names in _LLM_ALIASES.items():
        for vit_key, vit_names in _VIT_ALIASES.items():
            for a in llm_names:
                for b in vit_names:
                    for sep in ("-", "_", "+", "/"):
                        yield f"{a}{sep}{b}", f"{llm_key}-{vit_key}"


ALIASES: dict[str, str] = dict(_aliases())
"""Accepted spellings ("olmo-7b_clip", "qwen2_dinov2", ...) → the released name."""


def resolve_name(name: str) -> str:
    """The released name of a model given any accepted spelling (case-insensitive).

    Raises:
        KeyError: not one of the nine models (the message lists them).
    """
    key = name.strip().lower()
    if key in MODELS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise KeyError(
        f"unknown molmo model {name!r}; the nine models are {', '.join(MODELS)} "
        "(spellings like 'olmo-7b_clip' or 'qwen2_dinov2' also work)"
    )


def get_config(name: str) -> MolmoConfig:
    """The table entry of a model (any accepted spelling, see `resolve_name`)."""
    return MODELS[resolve_name(name)]


def default_query_layers(num_layers: int) -> list[int]:
    """The paper's query layers: 0, 1, 2, 4, 8, 16, 24 below n, plus n-2 and n-1.

    32 layers → 0, 1, 2, 4, 8, 16, 24, 30, 31; 28 → 0, 1, 2, 4, 8, 16, 24, 26, 27.
    """
    base = {x for x in (0, 1, 2, 4, 8, 16, 24) if x < num_layers}
    base |= {x for x in (num_layers - 2, num_layers - 1) if x >= 0}
    return sorted(base)


def replace(config: MolmoConfig, **changes: object) -> MolmoConfig:
    """`dataclasses.replace` that also accepts `llm=`/`vision=` dicts of field changes."""
    for part in ("llm", "vision"):
        value = changes.get(part)
        if isinstance(value, dict):
            changes[part] = dataclasses.replace(getattr(config, part), **value)
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
