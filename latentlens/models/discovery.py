"""Find the pieces of an unregistered model from its module tree and config.

Registered entries (`registry.ARCHITECTURES`) always win; discovery fills in the rest so
that any causal LM of transformers works without an entry:

1. the text config is `config.get_text_config(decoder=True)`; its layer count `n`;
2. the blocks are the `nn.ModuleList` of length `n` (outside vision / audio towers,
   nearest the input embeddings when there are several);
3. the input embeddings and the head come from HF's accessors
   (`get_input_embeddings()`, `get_output_embeddings()`);
4. the *pre-head transform* (usually the final norm) and the logit post-processing are
   checked, not guessed, by one tiny forward (six tokens): the last block's output `h`
   and the head's input `x` are captured, and the module `f` outside the blocks with
   `f(h) == x` is taken (the identity when `x == h`); then `head(x)` is compared with the
   model's logits under each known post-processing (`final_logit_softcapping`,
   `logit_scale`, `logits_scaling`);
5. whether HF's `hidden_states[-1]` is normed is read off the same forward.

When a piece cannot be decided the error names it and says how to register the model.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from latentlens.errors import UnsupportedArchitectureError
from latentlens.models.spec import ArchSpec

logger = logging.getLogger(__name__)

# Config keys of a layer count / width, in the order they are tried.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "model_dim")
# Known logit post-processing, by config key: (field of ArchSpec, config key).
LOGIT_KEYS = (
    ("logit_softcapping_attr", ("final_logit_softcapping", "logits_soft_cap")),
    ("logit_scale_attr", ("logit_scale",)),
    ("logit_divisor_attr", ("logits_scaling",)),
)
# Module paths that never hold the language model's blocks.
_FOREIGN = ("vision", "visual", "image", "audio", "speech", "encoder", "vit", "mm_projector")

_CACHE: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def text_config_path(config: Any) -> str:
    """Dotted path from `config` to its text (decoder) sub-config ("" for a text model)."""
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else config
    if text is config or text is None:
        return ""
    for key in ("text_config", "language_config", "llm_config", "decoder", "text_model"):
        if getattr(config, key, None) is text:
            return key
    for key, value in vars(config).items():
        if value is text:
            return key
    return ""


def _first_key(config: Any, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key
    return None


def config_keys(config: Any) -> dict[str, str | None]:
    """ArchSpec's config-key fields for an unregistered config, found by probing."""
    prefix = text_config_path(config)
    text = _walk(config, prefix)
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    layers_key = _first_key(text, LAYER_COUNT_KEYS)
    width_key = _first_key(text, WIDTH_KEYS)
    out: dict[str, str | None] = {
        "num_layers_attr": join(layers_key) if layers_key else None,
        "hidden_size_attr": join(width_key) if width_key else None,
    }
    for field, names in LOGIT_KEYS:
        found = [k for k in names if isinstance(getattr(text, k, None), (int, float))]
        out[field] = join(found[0]) if found and getattr(text, found[0]) else None
    return out


def _walk(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    return None


def _common_prefix(*paths: str) -> str:
    split = [p.split(".") if p else [] for p in paths]
    out: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


def _relative(path: str, prefix: str) -> str:
    if not prefix:
        return path
    return path[len(prefix) + 1 :] if path != prefix else ""


def _is_foreign(path: str) -> bool:
    parts = path.lower().split(".")
    return any(any(word in part for word in _FOREIGN) for part in parts)


def find_blocks(model: nn.Module, n_layers: int, embed_path: str | None) -> str:
    """Path of the ModuleList of decoder blocks (length `n_layers`)."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name
    ]
    if not found:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"length {n_layers} (the config's layer count). Register the model with "
            "latentlens.models.register_architecture(model_type, ArchSpec(layers=..., ...))."
        )
    native = [p for p in found if not _is_foreign(p)] or found

    # Nearest the embeddings (longest shared prefix), then the shallowest.
    def rank(p: str) -> tuple[int, int]:
        shared = len(_common_prefix(p, embed_path).split(".")) if embed_path else 0
        return (-shared, p.count("."))

    return sorted(native, key=rank)[0]


def _tiny_ids(model: nn.Module, embeddings: nn.Module) -> torch.Tensor:
    weight = getattr(embeddings, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)
    device = weight.device if weight is not None else next(model.parameters()).device
    ids = torch.tensor([[3, 7, 11, 5, 13, 9]], device=device) % max(vocab, 1)
    return ids


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    # Both sides come from the same modules in the same dtype, so they agree to rounding.
    rel = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= rel * scale + 1e-7


@dataclasses.dataclass
class _Probe:
    last_block: torch.Tensor | None = None
    last_block_calls: int = 0
    head_input: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hf_last: torch.Tensor | None = None


def _probe(
    model: nn.Module, blocks: nn.ModuleList, head: nn.Module | None, ids: torch.Tensor
) -> _Probe:
    """One tiny full forward recording the last block's output, the head's input, logits."""
    probe = _Probe()

    def on_block(module: nn.Module, args: Any, output: Any) -> None:
        probe.last_block_calls += 1
        probe.last_block = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    def on_head(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        probe.head_input = x.detach()

    handles = [blocks[-1].register_forward_hook(on_block)]
    if head is not None:
        handles.append(head.register_forward_pre_hook(on_head, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            try:
                out = model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    use_cache=False,
                    output_hidden_states=True,
                )
            except TypeError:  # a forward without some of these keywords
                out = model(input_ids=ids)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    logits = getattr(out, "logits", None)
    probe.logits = logits.detach() if isinstance(logits, torch.Tensor) else None
    states = getattr(out, "hidden_states", None)
    if isinstance(states, (tuple, list)) and states and isinstance(states[-1], torch.Tensor):
        probe.hf_last = states[-1].detach()
    return probe


def _pre_head_candidates(
    model: nn.Module, exclude: list[nn.Module]
) -> Iterator[tuple[str, nn.Module]]:
    """Modules outside blocks / embeddings / head, norms first, deepest-registered last."""
    skip: set[int] = set()
    for module in exclude:
        skip.update(id(m) for m in module.modules())
    named = [
        (name, m)
        for name, m in model.named_modules()
        if name and id(m) not in skip and not _is_foreign(name)
    ]
    norms = [
        (n, m) for n, m in named if "norm" in type(m).__name__.lower() or "ln" in n.split(".")[-1]
    ]
    rest = [(n, m) for n, m in named if (n, m) not in norms and not isinstance(m, nn.ModuleList)]
    yield from reversed(norms)
    yield from reversed(rest)


def _apply_logit_keys(
    config: Any, keys: dict[str, str | None], logits: torch.Tensor
) -> torch.Tensor:
    out = logits
    if keys.get("logit_scale_attr"):
        out = out * _walk(config, keys["logit_scale_attr"] or "")
    if keys.get("logit_divisor_attr"):
        out = out / _walk(config, keys["logit_divisor_attr"] or "")
    if keys.get("logit_softcapping_attr"):
        cap = _walk(config, keys["logit_softcapping_attr"] or "")
        out = torch.tanh(out / cap) * cap
    return out


def discover(model: nn.Module, base: Any) -> Any:
    """An `ArchSpec` for `model`, from its module tree, config and one tiny forward.

    Args:
        model: the top-level HF model (`...ForCausalLM`, a VLM, or a base model).
        base: an `ArchSpec` whose unset text-side fields are to be filled (a registered
            VLM entry whose text model is unregistered), or None.

    Raises:
        UnsupportedArchitectureError: a piece (layer count, blocks, input embeddings)
            cannot be found; the message names it.
    """
    cached = _CACHE.get(model)
    if cached is not None and cached[0] is base:
        return cached[1]
    spec = _discover(model, base)
    _CACHE[model] = (base, spec)
    return spec


def _discover(model: nn.Module, base: Any) -> Any:
    config = model.config  # type: ignore[attr-defined]
    keys = config_keys(config)
    name = f"{type(model).__name__} (model_type {config.model_type!r})"
    how = (
        "; describe it with latentlens.models.ArchSpec and add it with "
        f"latentlens.models.register_architecture({config.model_type!r}, spec)"
    )
    if keys["num_layers_attr"] is None or keys["hidden_size_attr"] is None:
        missing = "layer count" if keys["num_layers_attr"] is None else "hidden size"
        raise UnsupportedArchitectureError(
            f"cannot find the {missing} in the config of {name}{how}"
        )
    n_layers = int(_walk(config, keys["num_layers_attr"] or ""))
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    if embeddings is None:
        raise UnsupportedArchitectureError(f"cannot find the input embeddings of {name}{how}")
    embed_path = _path_of(model, embeddings)
    blocks_path = find_blocks(model, n_layers, embed_path)
    blocks = model.get_submodule(blocks_path)
    assert isinstance(blocks, nn.ModuleList)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    head_path = _path_of(model, head) if head is not None else None

    pre_head: str | None = None
    normed: bool | None = None
    verified = False
    try:
        probe = _probe(model, blocks, head, _tiny_ids(model, embeddings))
    except Exception as err:  # noqa: BLE001 - any failure only means "not verified"
        logger.warning("discovery forward of %s failed (%s); guessing the final norm", name, err)
        probe = None
    if probe is not None and probe.last_block_calls > 1:
        raise UnsupportedArchitectureError(
            f"the blocks of {name} run {probe.last_block_calls} times per forward (looped / "
            "recurrent depth), so 'the output of i blocks' names no single state; register "
            f"the model with an ArchSpec that says which module to read{how}"
        )
    if probe is not None and probe.last_block is not None:
        with torch.inference_mode():
            pre_head, head_path, normed, keys, verified = _verify(
                model, config, keys, probe, blocks, embeddings, head, head_path
            )
    if pre_head is None:
        pre_head = _guess_norm(model, [blocks, embeddings] + ([head] if head else []))
        if pre_head is None:
            raise UnsupportedArchitectureError(
                f"cannot find the final norm of {name}: no module maps the last block's output "
                f"to the LM head's input{how}"
            )
        logger.warning("final norm of %s guessed by name: %r (unverified)", name, pre_head)
    # The text model: the deepest module holding the blocks, the embeddings and the norm.
    text_path = _common_prefix(*(p for p in (blocks_path, embed_path, *pre_head.split(",")) if p))
    fields: dict[str, Any] = dict(
        layers=_relative(blocks_path, text_path),
        final_norm=",".join(_relative(p, text_path) for p in pre_head.split(","))
        if pre_head
        else "",
        embed_tokens=_relative(embed_path, text_path) if embed_path else "",
        last_hidden_is_normed=bool(normed) if normed is not None else pre_head != "",
        text_model_path=text_path,
        lm_head=head_path or "lm_head",
        num_layers_attr=keys["num_layers_attr"],
        hidden_size_attr=keys["hidden_size_attr"],
        logit_softcapping_attr=keys["logit_softcapping_attr"],
        logit_scale_attr=keys["logit_scale_attr"],
        logit_divisor_attr=keys["logit_divisor_attr"],
        logits_verified=verified,
        discovered=True,
        notes=f"discovered from the module tree of {type(model).__name__}",
    )
    fields.update(_multimodal_fields(model, config, text_path))
    if base is not None:
        spec = dataclasses.replace(base, **fields, text_config_attr=None)
    else:
        spec = ArchSpec(**fields)
    logger.info("discovered %s: %s", name, spec)
    return spec


_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
_AUDIO_TOKEN_KEYS = ("audio_token_id", "audio_token_index")


def _multimodal_fields(model: nn.Module, config: Any, text_path: str) -> dict[str, Any]:
    """For a VLM: the module to run (the deepest one above the text model that merges image
    features into the embeddings, so no LM head runs) and its image-token key; for an
    audio-text model the module that holds the audio tower; else ``{}``."""
    if getattr(config, "vision_config", None) is None:
        return _audio_fields(model, config, text_path)
    token_key = next(
        (k for k in _IMAGE_TOKEN_KEYS if isinstance(getattr(config, k, None), int)), None
    )
    parts = text_path.split(".") if text_path else []
    for depth in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:depth])
        module = model.get_submodule(path) if path else model
        if callable(getattr(module, "get_image_features", None)) and token_key is not None:
            return {"inner_model_path": path, "is_vlm": True, "image_token_id_attr": token_key}
    return {}


def _audio_fields(model: nn.Module, config: Any, text_path: str) -> dict[str, Any]:
    """The deepest module above the text model that owns the audio tower (it merges the
    audio features into the embeddings), for models with an ``audio_config``."""
    if getattr(config, "audio_config", None) is None:
        return {}
    if not any(isinstance(getattr(config, k, None), int) for k in _AUDIO_TOKEN_KEYS):
        return {}
    parts = text_path.split(".") if text_path else []
    for depth in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:depth])
        module = model.get_submodule(path) if path else model
        if isinstance(getattr(module, "audio_tower", None), nn.Module):
            return {"inner_model_path": path}
    return {}


def _verify(
    model: nn.Module,
    config: Any,
    keys: dict[str, str | None],
    probe: _Probe,
    blocks: nn.ModuleList,
    embeddings: nn.Module,
    head: nn.Module | None,
    head_path: str | None,
) -> tuple[str | None, str | None, bool | None, dict[str, str | None], bool]:
    """Pre-head transform, head path, normed flag, logit keys and verified flag."""
    h = probe.last_block
    assert h is not None
    pre_head: str | None = None
    normed: bool | None = None
    verified = False
    exclude = [blocks, embeddings] + ([head] if head is not None else [])
    candidates = list(_pre_head_candidates(model, exclude))
    if probe.head_input is not None:
        pre_head = _find_pre_head(h, probe.head_input, candidates)
    if probe.hf_last is not None:
        normed = not _close(probe.hf_last, h)
    if probe.logits is not None and head is not None and head_path is not None:
        logits = probe.logits.float()
        if pre_head is not None:
            keys, verified = _match_logits(config, keys, head(probe.head_input).float(), logits)
        if not verified:
            # A head with more inside than the output embedding (RoBERTa's lm_head:
            # dense, act, norm, decoder): the smallest ancestor mapping h to the logits.
            # Before it, nothing or one module (a final norm outside the blocks).
            befores = [("", h)] + [
                (p, y) for p, m in candidates[:12] if (y := _try(m, h)) is not None
            ]
            for anc_path in _ancestors(head_path):
                anc = model.get_submodule(anc_path)
                if any(anc is m for m in (model, blocks, embeddings)) or _contains(anc, blocks):
                    continue
                for before, y in befores:
                    try:
                        raw = anc(y)
                    except Exception:  # noqa: BLE001 - not an h -> logits module
                        break
                    raw = getattr(raw, "logits", raw)
                    if not isinstance(raw, torch.Tensor):
                        break
                    keys, verified = _match_logits(config, keys, raw.float(), logits)
                    if verified:
                        pre_head, head_path = before, anc_path
                        break
                if verified:
                    break
    return pre_head, head_path, normed, keys, verified


def _find_pre_head(
    h: torch.Tensor, x: torch.Tensor, candidates: list[tuple[str, nn.Module]]
) -> str | None:
    """The module (or chain of two, comma-joined) `f` with `f(h) == x`; "" for identity."""
    if _close(h, x):
        return ""
    outputs: list[tuple[str, torch.Tensor]] = []
    for path, module in candidates:
        y = _try(module, h)
        if y is None:
            continue
        if _close(y, x):
            return path
        outputs.append((path, y))
    for first, y in outputs[:12]:  # e.g. a final norm, then a prediction transform
        for path, module in candidates[:24]:
            if path == first or path.startswith(first + ".") or first.startswith(path + "."):
                continue
            z = _try(module, y)
            if z is not None and _close(z, x):
                return f"{first},{path}"
    return None


def _try(module: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.inference_mode():
            y = module(h)
    except Exception:  # noqa: BLE001 - not a d -> d module
        return None
    # The width may change (ELECTRA's generator projects to its embedding size).
    return y if isinstance(y, torch.Tensor) and y.shape[:-1] == h.shape[:-1] else None


def _match_logits(
    config: Any, keys: dict[str, str | None], raw: torch.Tensor, logits: torch.Tensor
) -> tuple[dict[str, str | None], bool]:
    """The logit post-processing (subset of the config's known keys) that gives `logits`."""
    if _close(_apply_logit_keys(config, keys, raw), logits):
        return keys, True
    for field, _ in LOGIT_KEYS:  # a key present in the config but unused by the model
        if keys.get(field):
            trial = {**keys, field: None}
            if _close(_apply_logit_keys(config, trial, raw), logits):
                return trial, True
    return keys, False


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _guess_norm(model: nn.Module, exclude: list[nn.Module]) -> str | None:
    for path, module in _pre_head_candidates(model, exclude):
        if "norm" in type(module).__name__.lower():
            return path
    return None
