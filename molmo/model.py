"""Assembly of a connector VLM: ViT → connector → LLM input embeddings → hidden states.

The token sequence of every image is (SPEC §5)::

    [BOS] <im_start> (<im_patch> × W  <im_col>) × H <im_end> "Describe this image in detail."

Special ids are `vocab_size + 0..4`; their embeddings come from
`cat(base embedding matrix, new_embedding)`. For Llama-3 and Qwen2 (vocab = embedding
rows) that means `new_embedding[0..4]`; for OLMo (vocab 100278 < 100352 rows) the ids land
on OLMo's own padding rows and `new_embedding` is never read. The connector output is
ADDED to the <im_patch> embedding; patch (r, c) sits at position `2 + r·(W + 1) + c`.
Hidden states come from `latentlens.models.get_hidden_states` (forward hooks, stopping
after the deepest requested block).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from latentlens.models import (
    get_hidden_states,
    get_input_embeddings,
    hidden_size,
    load_config,
    load_model,
    num_layers,
)
from latentlens.models.hooks import validate_layers
from latentlens.vlm import ImageStates, VisualTokens
from molmo.checkpoint import (
    CheckpointError,
    download_connector,
    map_state_dict,
    read_checkpoint,
    resolve_connector_path,
)
from molmo.config import N_SPECIAL_EMBEDDINGS, MolmoConfig, get_config
from molmo.connector import Connector
from molmo.processing import ImageInput, ImageProcessor, ProcessedImages, load_image
from molmo.vision import VisionEncoder

logger = logging.getLogger(__name__)

Layer0 = Literal["connector", "hidden"]
DType = Literal["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None) -> torch.dtype:
    """`"auto"` → float16 on CUDA (the paper's lens runs), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        is_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.float16 if is_cuda else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16"
        ) from None


def set_rms_norm_eps(llm: nn.Module, eps: float) -> int:
    """Set the epsilon of every RMSNorm of `llm` (and its config); returns how many changed."""
    changed = 0
    for module in llm.modules():
        if "RMSNorm" in type(module).__name__ and hasattr(module, "variance_epsilon"):
            if module.variance_epsilon != eps:
                module.variance_epsilon = eps
                changed += 1
    if hasattr(llm.config, "rms_norm_eps"):
        llm.config.rms_norm_eps = eps
    return changed


@dataclass
class VisualStates:
    """What one forward pass yields for a batch of images.

    Attributes:
        connector: `[B, N, d]` connector output (layer 0 for LatentLens / EmbeddingLens).
        hidden: `{layer: [B, N, d]}` LLM hidden states at the N patch positions; layer 0
            is `hidden_states[0]` = connector output + <im_patch> embedding.
        grid: patches per side (N = grid²), row-major.
    """

    connector: torch.Tensor
    hidden: dict[int, torch.Tensor]
    grid: int

    def layer(self, layer: int, layer0: Layer0 = "connector") -> torch.Tensor:
        """`[B, N, d]` states of one layer; `layer0` chooses what layer 0 means."""
        if layer == 0 and layer0 == "connector":
            return self.connector
        return self.hidden[layer]

    def as_grid(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, d]` → `[B, H, W, d]`."""
        return x.reshape(x.shape[0], self.grid, self.grid, x.shape[-1])


class MolmoModel(nn.Module):
    """A Molmo-style connector VLM for analysis (no training code).

    Build it with `from_pretrained("olmo-vit")` (the released connector plus the Hub LLM
    and ViT) or `from_components(...)` (already loaded parts, e.g. tiny test models).

    Attributes:
        config: the table entry (`molmo.config.MolmoConfig`).
        llm: the HF causal LM (`...ForCausalLM`, with its LM head).
        tokenizer: the LLM's tokenizer.
        vision: the ViT wrapper.
        connector: the SwiGLU connector with `pad_embed`.
        new_embedding: `[128, d]` extra embedding rows (ids `embedding rows + i`).
        processor: the image preprocessor of the encoder.
        checkpoint_path: where the connector weights came from (if loaded from a file).
    """

    def __init__(
        self,
        config: MolmoConfig,
        llm: nn.Module,
        tokenizer: Any,
        vision: VisionEncoder,
        connector: Connector | None = None,
    ) -> None:
        """Check the parts against `config` and set RMSNorm eps; weights are not loaded here.

        Raises:
            ValueError: a part does not match the table (layers, widths, embedding rows).
        """
        super().__init__()
        n, d = num_layers(llm), hidden_size(llm)
        if (n, d) != (config.llm.num_layers, config.llm.d_model):
            raise ValueError(
                f"{config.name}: LLM has {n} layers of width {d}; the table says "
                f"{config.llm.num_layers} × {config.llm.d_model}"
            )
        rows = int(get_input_embeddings(llm).weight.shape[0])
        if rows != config.llm.embedding_size:
            raise ValueError(
                f"{config.name}: LLM has {rows} embedding rows; the table says "
                f"{config.llm.embedding_size}"
            )
        if config.llm.vocab_size + 5 > rows + N_SPECIAL_EMBEDDINGS:
            raise ValueError(f"{config.name}: special ids fall outside the embedding table")
        if vision.config != config.vision:
            raise ValueError(f"{config.name}: the vision encoder was built for another config")
        changed = set_rms_norm_eps(llm, config.llm.rms_norm_eps)
        if changed:
            logger.info("set RMSNorm eps to %g in %d norms", config.llm.rms_norm_eps, changed)
        llm.eval().requires_grad_(False)
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.vision = vision
        if connector is None:
            connector = Connector(config.vision.feature_dim, config.llm.connector_hidden, d)
        self.connector = connector
        self.new_embedding = nn.Parameter(torch.zeros(N_SPECIAL_EMBEDDINGS, d))
        self.processor = ImageProcessor(config.vision)
        self.checkpoint_path: Path | None = None
        prompt = tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids: list[int] = [int(t) for t in prompt]
        self.requires_grad_(False)
        self.eval()

    # ── construction ──────────────────────────────────────────────────────────────────

    @classmethod
    def from_components(
        cls,
        config: MolmoConfig,
        llm: nn.Module,
        tokenizer: Any,
        vit: nn.Module | VisionEncoder,
        connector_state: dict[str, torch.Tensor] | str | os.PathLike[str] | None = None,
    ) -> MolmoModel:
        """Assemble from loaded parts.

        Args:
            config: the model's table entry (tiny variants allowed).
            llm: HF causal LM matching `config.llm`.
            tokenizer: its tokenizer.
            vit: HF vision model (adapted in place) or a `VisionEncoder`.
            connector_state: a released state dict (released key names) or a path to a
                `connector.pt` / `.safetensors`; `None` leaves the connector at zero.
        """
        vision = vit if isinstance(vit, VisionEncoder) else VisionEncoder(vit, config.vision)
        model = cls(config, llm, tokenizer, vision)
        model.place_extras()
        if connector_state is not None:
            if isinstance(connector_state, (str, os.PathLike)):
                model.checkpoint_path = Path(connector_state)
                connector_state = read_checkpoint(connector_state)
            model.load_connector(connector_state)
        return model

    @classmethod
    def from_pretrained(
        cls,
        name: str | MolmoConfig,
        *,
        connector: str | os.PathLike[str] | None = None,
        dtype: DType | torch.dtype = "auto",
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        llm_path: str | os.PathLike[str] | None = None,
        vit_path: str | os.PathLike[str] | None = None,
    ) -> MolmoModel:
        """Load one of the nine models: released connector + Hub LLM + Hub ViT.

        Args:
            name: "olmo-vit", ..., "qwen-siglip" (aliases such as "olmo-7b_clip" work), or
                a `MolmoConfig` (e.g. a variant of a table entry).
            connector: local `connector.pt` / `.safetensors` or a directory holding it;
                default: `<name>/connector.pt` from `McGill-NLP/latentlens-connectors`.
            dtype: "auto" (fp16 on CUDA, fp32 otherwise), "float32", "float16" or
                "bfloat16" (fp16 overflowed for Llama+DINOv2 in the paper's runs). RMSNorm
                and ViT attention compute in float32 either way.
            device: where to put the model.
            revision: revision of the connector repo.
            cache_dir: Hugging Face cache for all downloads.
            token: Hub token (Llama-3 is gated).
            llm_path: local directory / Hub id overriding the LLM's Hub id.
            vit_path: local directory / Hub id overriding the ViT's Hub id.

        Raises:
            KeyError: unknown model name.
            CheckpointError: the connector file is missing, unsafe or does not match.
        """

        config = name if isinstance(name, MolmoConfig) else get_config(name)
        torch_dtype = resolve_dtype(dtype, device)
        if connector is not None:
            ckpt = resolve_connector_path(connector, config.name)
        else:
            ckpt = download_connector(config, revision=revision, cache_dir=cache_dir, token=token)
        state = map_state_dict(read_checkpoint(ckpt), config)  # fail before the big loads

        hub: dict[str, Any] = {k: v for k, v in (("cache_dir", cache_dir), ("token", token)) if v}
        llm_source = str(llm_path or config.llm.hub_id)
        hf_config = load_config(llm_source, **hub)
        hf_config.rms_norm_eps = config.llm.rms_norm_eps
        llm, tokenizer = load_model(
            llm_source, device=device, dtype=torch_dtype, config=hf_config, **hub
        )
        vision = VisionEncoder.from_pretrained(
            config.vision,
            path=str(vit_path) if vit_path else None,
            dtype=torch_dtype,
            device=device,
            **hub,
        )
        model = cls(config, llm, tokenizer, vision)
        model.place_extras()
        model.load_connector(state, mapped=True)
        model.checkpoint_path = ckpt
        return model

    def place_extras(self) -> None:
        """Put the connector and `new_embedding` on the LLM embeddings' device and dtype."""
        weight = get_input_embeddings(self.llm).weight
        self.connector.to(device=weight.device, dtype=weight.dtype)
        self.new_embedding.data = self.new_embedding.data.to(weight.device, weight.dtype)

    def load_connector(self, state: dict[str, torch.Tensor], *, mapped: bool = False) -> None:
        """Copy connector weights in (cast to the model's dtype and device).

        Args:
            state: released keys → tensors (or mapped names, see `mapped`).
            mapped: `state` already uses this model's parameter names (`KEY_MAP` values).

        Raises:
            CheckpointError: keys or shapes do not match the model.
        """
        named = state if mapped else map_state_dict(state, self.config)
        params = dict(self.named_parameters())
        for key, tensor in named.items():
            if key not in params:
                raise CheckpointError(f"model has no parameter {key!r}")
            with torch.no_grad():
                params[key].copy_(tensor.to(params[key].dtype))

    # ── sequence layout ───────────────────────────────────────────────────────────────

    @property
    def device(self) -> torch.device:
        """Device of the connector weights (the model is on one device)."""
        return self.new_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the connector weights."""
        return self.new_embedding.dtype

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.config.vision.grid

    def token_ids(self) -> list[int]:
        """The full input sequence of one image (all images share it), length T."""
        c = self.config
        row = [c.im_patch_id] * self.grid + [c.im_col_id]
        return [c.llm.bos_id, c.im_start_id, *(row * self.grid), c.im_end_id, *self.prompt_ids]

    def input_ids(self, batch_size: int = 1) -> torch.Tensor:
        """`[batch_size, T]` int64 ids on the model's device."""
        ids = torch.tensor(self.token_ids(), dtype=torch.long, device=self.device)
        return ids.expand(batch_size, -1)

    def patch_positions(self) -> torch.Tensor:
        """`[H·W]` sequence positions of the patches, row-major: 2 + r·(W + 1) + c."""
        g = self.grid
        r = torch.arange(g).repeat_interleave(g)
        c = torch.arange(g).repeat(g)
        return (2 + r * (g + 1) + c).to(self.device)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings from `cat(base embedding matrix, new_embedding)`: `[B, T]` → `[B, T, d]`."""
        base = get_input_embeddings(self.llm)
        rows = base.weight.shape[0]
        is_new = input_ids >= rows
        out = base(input_ids.clamp(max=rows - 1))
        if bool(is_new.any()):
            extra = self.new_embedding[(input_ids - rows).clamp(min=0)].to(out.dtype)
            out = torch.where(is_new[..., None], extra, out)
        return out

    # ── forward ───────────────────────────────────────────────────────────────────────

    def preprocess(
        self, images: ImageInput | Sequence[ImageInput] | ProcessedImages
    ) -> ProcessedImages:
        """Crops and padding fractions of `images` (passed through if already processed)."""
        return images if isinstance(images, ProcessedImages) else self.processor(images)

    @torch.inference_mode()
    def encode_images(
        self, images: ImageInput | Sequence[ImageInput] | ProcessedImages
    ) -> torch.Tensor:
        """Connector output `[B, N, d]` (ViT features + pad_embed → SwiGLU)."""
        batch = self.preprocess(images)
        feats = self.vision(batch.pixel_values.to(self.device))
        return self.connector(feats, batch.patch_fraction.to(self.device))

    def inputs_embeds(self, connector_out: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings `[B, T, d]`: token embeddings, connector output added at patches."""
        b = connector_out.shape[0]
        emb = self.embed_tokens(self.input_ids(b)).clone()
        pos = self.patch_positions()
        emb[:, pos] = emb[:, pos] + connector_out.to(emb.dtype)
        return emb

    @torch.inference_mode()
    def encode(
        self,
        images: ImageInput | Sequence[ImageInput] | ProcessedImages,
        layers: int | Iterable[int],
    ) -> VisualStates:
        """One forward pass: connector output and the patch hidden states at `layers`.

        Args:
            images: images (paths, PIL, uint8 arrays) or a `ProcessedImages` batch.
            layers: LLM hidden-state indices in `[0, num_layers]` (0 = input embeddings,
                i = output of block i-1; `num_layers` is taken before the final norm).
                The LLM forward stops after the deepest one; layer 0 alone needs none.

        Returns:
            `VisualStates` with `[B, N, d]` tensors on the model's device.
        """
        wanted = validate_layers(layers, self.config.llm.num_layers)
        connector_out = self.encode_images(images)
        embeds = self.inputs_embeds(connector_out)
        pos = self.patch_positions()
        hidden: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            hidden[0] = embeds[:, pos]
        deeper = [x for x in wanted if x > 0]
        if deeper:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            states = get_hidden_states(
                self.llm, layers=deeper, inputs_embeds=embeds, attention_mask=mask
            )
            hidden.update({x: states[x][:, pos] for x in deeper})
        return VisualStates(connector=connector_out, hidden=hidden, grid=self.grid)

    def image_states(
        self, images: ImageInput | Sequence[ImageInput], layers: int | Iterable[int]
    ) -> list[ImageStates]:
        """The library's visual-token route for this model (`latentlens.vlm.ImageStates`).

        Per image ``{layer: [N, d]}`` in patch order (row-major) with its sequence
        positions and ``(G, G)`` grid, as `latentlens.vlm.visual_token_states` returns
        for Hugging Face VLMs. Layer 0 is the connector output, as LatentLens and
        EmbeddingLens read it (SPEC §4).
        """
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        wanted = validate_layers(layers, self.config.llm.num_layers)
        out = self.encode(items, wanted)
        tokens = VisualTokens(positions=self.patch_positions().cpu(), grid=(self.grid, self.grid))
        return [
            ImageStates(
                {x: out.layer(x)[b] for x in wanted},
                tokens,
                Image.fromarray(load_image(item)),
            )
            for b, item in enumerate(items)
        ]

    def visual_hidden_states(
        self,
        images: ImageInput | Sequence[ImageInput] | ProcessedImages,
        layers: int | Iterable[int],
        *,
        layer0: Layer0 = "connector",
    ) -> dict[int, torch.Tensor]:
        """Visual-token hidden states as patch grids.

        Args:
            images: one image, a list, or a `ProcessedImages` batch.
            layers: LLM layers (see `encode`).
            layer0: what layer 0 returns: "connector" (connector output, the LatentLens /
                EmbeddingLens convention) or "hidden" (`hidden_states[0]` = connector
                output + <im_patch> embedding, the LogitLens convention).

        Returns:
            `{layer: [B, H, W, d]}` on the model's device, in the model's dtype.
        """
        states = self.encode(images, layers)
        return {x: states.as_grid(states.layer(x, layer0)) for x in states.hidden}

    @torch.inference_mode()
    def generate(
        self,
        images: ImageInput | Sequence[ImageInput] | ProcessedImages,
        max_new_tokens: int = 64,
        **kwargs: Any,
    ) -> list[str]:
        """Greedy captions for a sanity check (`llm.generate` on the image embeddings).

        Args:
            images: images or a processed batch.
            max_new_tokens: generation length limit.
            **kwargs: passed to `generate` (e.g. `do_sample=True`).

        Returns:
            One decoded string per image (special tokens skipped).
        """
        embeds = self.inputs_embeds(self.encode_images(images))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **kwargs,
        )
        return [str(s) for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def extra_repr(self) -> str:  # noqa: D102
        c = self.config
        return (
            f"name={c.name!r}, llm={c.llm.hub_id!r}, vit={c.vision.hub_id!r}, "
            f"grid={c.vision.grid}x{c.vision.grid}, dtype={self.dtype}"
        )


def load(name: str | MolmoConfig, **kwargs: Any) -> MolmoModel:
    """Load one of the nine models: `MolmoModel.from_pretrained(name, **kwargs)`.

    Example: `molmo.load("olmo-vit", device="cuda")`.
    """
    return MolmoModel.from_pretrained(name, **kwargs)
