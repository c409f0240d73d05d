"""The nine connector VLMs: table arithmetic, preprocessing, ViT, connector, assembly, loading."""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import molmo
from molmo import MODELS, CheckpointError, MolmoModel
from molmo.checkpoint import (
    KEY_MAP,
    convert_to_safetensors,
    expected_shapes,
    map_state_dict,
    read_checkpoint,
)
from molmo.config import (
    CLIP_MEAN,
    CLIP_STD,
    default_query_layers,
    get_config,
    resolve_name,
)
from molmo.connector import Connector
from molmo.processing import (
    ImageProcessor,
    clip_scaled_size,
    load_image,
    patch_fractions,
    preprocess_clip,
    preprocess_dinov2,
    preprocess_siglip,
)
from molmo.testing import synthetic_connector, tiny_config, tiny_vit
from molmo.vision import FP32_ATTENTION, VisionEncoder, dinov2_position_embeddings
from tests.tiny import tiny_causal_lm, tiny_tokenizer

NAMES = list(MODELS)
FAMILY_TYPE = {"olmo": "olmo2", "llama": "llama", "qwen2": "qwen2"}


def tiny_llm(config, **overrides):
    return tiny_causal_lm(FAMILY_TYPE[config.llm.family], **overrides)


def build(name: str, seed: int = 0) -> MolmoModel:
    cfg = tiny_config(name)
    return MolmoModel.from_components(
        cfg, tiny_llm(cfg), tiny_tokenizer(), tiny_vit(cfg, seed), synthetic_connector(cfg, seed)
    )


@functools.cache
def shared(name: str) -> MolmoModel:
    """One tiny model per name for the read-only tests."""
    return build(name)


def rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


# ── the real table ──────────────────────────────────────────────────────────────────


def test_real_table_arithmetic():
    assert len(MODELS) == 9
    for name, cfg in MODELS.items():
        v, llm = cfg.vision, cfg.llm
        if v.kind == "siglip":
            assert (v.image_size // v.patch_size, v.num_patches, v.feature_dim) == (27, 729, 2304)
            assert 2 * 1152 == v.feature_dim and cfg.image_block_length == 1 + 27 * 28 + 1 == 758
            assert not v.has_cls and v.feature_layers == (26, 19)
        else:
            assert (336 // 14, v.num_patches, v.feature_dim) == (24, 576, 2048)
            assert 2 * 1024 == v.feature_dim and cfg.image_block_length == 1 + 24 * 25 + 1 == 602
            assert v.has_cls
            assert v.feature_layers == {"clip": (22, 15), "dinov2": (23, 16)}[v.kind]
        mlp_hidden = {"olmo": 22016, "llama": 28672, "qwen2": 37888}[llm.family]
        assert llm.connector_hidden == mlp_hidden // 2
        assert (llm.num_layers, llm.d_model) == {
            "olmo": (32, 4096),
            "llama": (32, 4096),
            "qwen2": (28, 3584),
        }[llm.family]
        assert llm.bos_id == {"olmo": 100257, "llama": 128000, "qwen2": 151643}[llm.family]
        assert llm.rms_norm_eps == 1e-6
        assert cfg.special_ids["<im_start>"] == llm.vocab_size
        assert cfg.im_patch_id == llm.vocab_size + 2 and cfg.im_col_id == llm.vocab_size + 3
        g = v.grid
        assert cfg.patch_position(0, 0) == 2
        assert cfg.patch_position(g - 1, g - 1) == cfg.image_block_length - 2  # then <im_col>
        assert cfg.connector_filename == f"{name}/connector.pt"
        assert expected_shapes(cfg)["transformer.wte.new_embedding"] == (128, llm.d_model)
    olmo = MODELS["olmo-vit"].llm
    assert olmo.vocab_size + 4 < olmo.embedding_size  # OLMo's special ids hit base rows
    for key in ("llama", "qwen"):
        llm = MODELS[f"{key}-vit"].llm
        assert llm.vocab_size == llm.embedding_size  # → new_embedding[0..4]
    assert {c.llm.hub_id for c in MODELS.values()} == {
        "allenai/OLMo-7B-1024-preview",
        "meta-llama/Meta-Llama-3-8B",
        "Qwen/Qwen2-7B",
    }
    assert {c.vision.hub_id for c in MODELS.values()} == {
        "openai/clip-vit-large-patch14-336",
        "facebook/dinov2-large",
        "google/siglip-so400m-patch14-384",
    }


def test_names_and_aliases():
    assert resolve_name("olmo-7b_clip") == "olmo-vit"
    assert resolve_name("Qwen2-7B_DINOv2") == "qwen-dino"
    assert resolve_name("llama3-8b-siglip") == "llama-siglip"
    assert get_config("llama-vit") is MODELS["llama-vit"]
    with pytest.raises(KeyError, match="nine models"):
        resolve_name("mistral-clip")


def test_default_query_layers():
    assert default_query_layers(32) == [0, 1, 2, 4, 8, 16, 24, 30, 31]
    assert default_query_layers(28) == [0, 1, 2, 4, 8, 16, 24, 26, 27]
    assert default_query_layers(3) == [0, 1, 2]


# ── preprocessing ───────────────────────────────────────────────────────────────────


def test_clip_scaled_size_truncates_in_float32():
    assert clip_scaled_size(480, 640, 336) == (251, 336)
    assert clip_scaled_size(336, 336, 336) == (336, 336)
    with pytest.raises(ValueError, match="too thin"):
        clip_scaled_size(1, 1000, 336)


def test_clip_padding_mask_on_non_square_image():
    # 6×42 in a 42 crop: no resize, rows 18..23 real → patch rows 0 / 6/14 / 0.
    pixels, mask = preprocess_clip(rand_image(6, 42), 42)
    frac = patch_fractions(mask, 14).reshape(3, 3)
    assert torch.equal(frac[0], torch.zeros(3)) and torch.equal(frac[2], torch.zeros(3))
    assert torch.allclose(frac[1], torch.full((3,), 6 / 14))
    pad_value = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 0, 0], pad_value) and torch.allclose(
        pixels[:, 41, 41], pad_value
    )
    # odd extra row goes to the bottom: 7 rows in 42 → top 17, bottom 18
    _, mask = preprocess_clip(rand_image(7, 42), 42)
    rows = mask[:, 0].nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (17, 23)
    # 20×42: a full patch row between two partial ones
    frac = ImageProcessor(tiny_config("olmo-vit").vision)(rand_image(20, 42)).patch_fraction[0]
    assert frac.reshape(3, 3)[:, 0].tolist() == pytest.approx([3 / 14, 1.0, 3 / 14])


def test_preprocessing_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import convert_image_dtype

    img = rand_image(37, 53, seed=3)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    # CLIP: float image, bilinear antialias to the truncated size, clipped
    new_h, new_w = clip_scaled_size(37, 53, 42)
    ref = tv.Resize([new_h, new_w], InterpolationMode.BILINEAR, antialias=True)(
        convert_image_dtype(chw)
    )
    ref = ref.clamp(0, 1)
    pixels, mask = preprocess_clip(img, 42)
    top = (42 - new_h) // 2
    got = pixels[:, top : top + new_h, :new_w] * torch.tensor(CLIP_STD)[:, None, None]
    got = got + torch.tensor(CLIP_MEAN)[:, None, None]
    assert torch.allclose(got, ref, atol=1e-6)
    # DINOv2: uint8 bicubic antialias; SigLIP: uint8 bilinear without antialias
    for fn, mode, aa in (
        (preprocess_dinov2, InterpolationMode.BICUBIC, True),
        (preprocess_siglip, InterpolationMode.BILINEAR, False),
    ):
        ref8 = tv.Resize([42, 42], mode, antialias=aa)(chw)
        ref8 = ref8.clamp(0, 255).to(torch.float32) / 255.0
        if fn is preprocess_siglip:
            assert torch.equal(fn(img, 42), -1.0 + ref8 * 2.0)
        else:
            mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            assert torch.equal(fn(img, 42), (ref8 - mean) / std)


def test_siglip_pixels_and_rounding():
    px = preprocess_siglip(np.zeros((5, 9, 3), np.uint8), 42)
    assert torch.equal(px, torch.full_like(px, -1.0))
    px = preprocess_siglip(np.full((42, 42, 3), 255, np.uint8), 42)
    assert torch.equal(px, torch.ones_like(px))
    # values are uint8 levels: (x + 1) / 2 * 255 is integral
    levels = (preprocess_siglip(rand_image(20, 30), 42) + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_load_image_converts_then_exif_transposes(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 0))  # fully transparent: alpha dropped
    assert load_image(rgba)[0, 0].tolist() == [10, 20, 30]
    assert load_image(Image.new("L", (3, 3), 7)).shape == (3, 3, 3)
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.putpixel((0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.png"  # lossless, keeps EXIF
    img.save(path, exif=exif)
    arr = load_image(path)
    assert arr.shape == (4, 2, 3)  # width and height swapped
    assert arr[0, 1].tolist() == [0, 0, 255]  # top-left pixel now top-right
    rgba_rot = Image.open(path).convert("RGBA")  # EXIF survives convert("RGB") inside
    rgba_rot.info["exif"] = exif.tobytes()
    assert load_image(rgba_rot).shape == (4, 2, 3)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((2, 2, 3), np.float32))


# ── vision encoder ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", ["olmo-vit", "olmo-dino", "olmo-siglip"])
def test_vit_features_are_two_hidden_states_deeper_first(name):
    cfg = tiny_config(name)
    v = cfg.vision
    reference = tiny_vit(cfg, seed=1)
    enc = VisionEncoder(tiny_vit(cfg, seed=1), v)
    assert len(enc.vit.encoder.layer if v.kind == "dinov2" else enc.vit.encoder.layers) == max(
        v.feature_layers
    )
    assert enc.vit.config._attn_implementation == FP32_ATTENTION
    px = ImageProcessor(v)([rand_image(30, 50), rand_image(42, 42, 1)]).pixel_values
    if v.kind == "dinov2":  # compare against HF with our resized positions, no HF interpolation
        reference.embeddings.position_embeddings = enc.vit.embeddings.position_embeddings
        reference.config.image_size = v.image_size
    with torch.no_grad():
        hs = reference(pixel_values=px, output_hidden_states=True).hidden_states
        feats = enc(px)
    expected = torch.cat([hs[i] for i in v.feature_layers], dim=-1)
    if v.has_cls:
        expected = expected[:, 1:]
    assert feats.shape == (2, v.num_patches, v.feature_dim)
    torch.testing.assert_close(feats, expected)


def test_dinov2_position_embeddings_resized_once_like_the_paper():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = dinov2_position_embeddings(pos, 24)
    assert out.shape == (1, 577, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=24.1 / 37, mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 576, 8))
    hf_way = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False)
    assert not torch.allclose(ref, hf_way, atol=1e-3)  # transformers' own resize differs
    assert dinov2_position_embeddings(out, 24) is out  # already the right grid: unchanged
    # in a model: 5×5 → 3×3, and HF then uses the stored rows as they are
    cfg = tiny_config("olmo-dino")
    enc = VisionEncoder(tiny_vit(cfg), cfg.vision)
    emb = enc.vit.embeddings
    assert emb.position_embeddings.shape == (1, 10, cfg.vision.width)
    x = torch.zeros(1, 10, cfg.vision.width)
    assert emb.interpolate_pos_encoding(x, 42, 42) is emb.position_embeddings


def test_siglip_black_crop_gets_zero_features():
    model = shared("llama-siglip")
    black = np.zeros((20, 30, 3), np.uint8)
    batch = model.preprocess([black, rand_image(20, 30)])
    feats = model.vision(batch.pixel_values)
    assert torch.equal(feats[0], torch.zeros_like(feats[0])) and feats[1].abs().sum() > 0
    out = model.encode_images(batch)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no bias anywhere in the connector


# ── connector ───────────────────────────────────────────────────────────────────────


def test_connector_is_swiglu_without_bias_with_pad_embed():
    torch.manual_seed(0)
    c = Connector(6, 10, 4)
    for p in (c.w1, c.w2, c.w3):
        assert p.bias is None
    with torch.no_grad():
        for p in c.parameters():
            p.normal_()
    x = torch.randn(1, 3, 6)
    frac = torch.tensor([[0.0, 0.5, 1.0]])
    y = c(x, frac)
    xp = x.clone()
    xp[0, 0] += c.pad_embed[0]
    xp[0, 1] += c.pad_embed[1]
    ref = (F.silu(xp @ c.w1.weight.T) * (xp @ c.w3.weight.T)) @ c.w2.weight.T
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(c(x), c.mlp(x))


# ── assembled models ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", NAMES)
def test_shapes_sequence_and_patch_positions(name):
    model = shared(name)
    cfg = model.config
    g = cfg.vision.grid
    ids = model.token_ids()
    assert ids[0] == cfg.llm.bos_id and ids[1] == cfg.im_start_id
    assert ids[cfg.image_block_length] == cfg.im_end_id
    assert ids[cfg.image_block_length + 1 :] == model.prompt_ids
    assert model.prompt_ids == tiny_tokenizer()(cfg.prompt, add_special_tokens=False)["input_ids"]
    for r in range(g):
        for c in range(g):
            assert ids[2 + r * (g + 1) + c] == cfg.im_patch_id
        assert ids[2 + r * (g + 1) + g] == cfg.im_col_id
    pos = model.patch_positions().tolist()
    assert pos == [cfg.patch_position(r, c) for r in range(g) for c in range(g)]
    states = model.visual_hidden_states([rand_image(30, 50), rand_image(42, 42, 1)], [0, 1, 3])
    assert {k: tuple(v.shape) for k, v in states.items()} == {
        k: (2, g, g, cfg.llm.d_model) for k in (0, 1, 3)
    }


def test_image_states_adapter_speaks_the_library_route():
    model = shared("olmo-vit")
    g, d = model.grid, model.config.llm.d_model
    imgs = [rand_image(30, 50), rand_image(42, 42, 1)]
    got = model.image_states(imgs, [0, 2])
    enc = model.encode(imgs, [0, 2])
    assert len(got) == 2 and all(one.grid == (g, g) for one in got)
    for b, one in enumerate(got):
        assert set(one.states) == {0, 2} and one.states[2].shape == (g * g, d)
        assert torch.equal(one.states[0], enc.connector[b])  # layer 0 = connector output
        assert torch.equal(one.states[2], enc.hidden[2][b])
        assert one.tokens.position(1, 2) == model.config.patch_position(1, 2)
        assert one.image.size == (imgs[b].shape[1], imgs[b].shape[0])


@pytest.mark.parametrize("name", NAMES)
def test_hidden_states_match_the_full_hf_forward(name):
    model = shared(name)
    batch = model.preprocess([rand_image(30, 50), rand_image(42, 42, 1)])
    n = model.config.llm.num_layers
    states = model.encode(batch, range(n + 1))
    connector = states.connector
    embeds = model.inputs_embeds(connector)
    with torch.no_grad():
        hs = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    pos = model.patch_positions()
    for layer in range(n):  # HF's last entry is normed; ours is the block output
        torch.testing.assert_close(states.hidden[layer], hs[layer][:, pos])
    # layer 0: connector output + <im_patch> embedding; "connector" convention = output alone
    patch_emb = model.embed_tokens(torch.tensor([model.config.im_patch_id]))[0]
    torch.testing.assert_close(states.hidden[0], connector + patch_emb)
    grids = model.visual_hidden_states(batch, [0])
    torch.testing.assert_close(grids[0], connector.reshape(2, 3, 3, -1))
    hidden0 = model.visual_hidden_states(batch, [0], layer0="hidden")[0]
    torch.testing.assert_close(hidden0, (connector + patch_emb).reshape(2, 3, 3, -1))


@pytest.mark.parametrize("name", ["olmo-vit", "llama-vit", "qwen-vit"])
def test_special_token_embeddings(name):
    model = build(name)
    cfg = model.config
    special = torch.tensor(list(cfg.special_ids.values()))
    base = model.llm.get_input_embeddings().weight
    got = model.embed_tokens(special)
    if cfg.llm.family == "olmo":
        assert torch.equal(got, base[special])  # OLMo: own (padding) rows
        with torch.no_grad():
            model.new_embedding.fill_(float("nan"))  # never read
        assert torch.isfinite(model.visual_hidden_states(rand_image(9, 9), [0, 2])[2]).all()
    else:
        assert torch.equal(got, model.new_embedding[:5])
        assert not torch.equal(got, base[special.clamp(max=base.shape[0] - 1)])


def test_padding_embed_reaches_the_llm_only_where_clip_pads():
    model = build("qwen-vit")
    batch = model.preprocess(rand_image(6, 42))  # patch rows: pad / partial / pad
    feats = model.vision(batch.pixel_values)
    frac = batch.patch_fraction
    assert frac.reshape(3, 3)[1].tolist() == pytest.approx([6 / 14] * 3)
    c = model.connector
    expected = c.mlp(feats + torch.where(frac[..., None] == 0, c.pad_embed[0], c.pad_embed[1]))
    torch.testing.assert_close(model.encode_images(batch), expected)
    # DINOv2 / SigLIP: masks all real, no pad_embed
    for name in ("qwen-dino", "qwen-siglip"):
        assert torch.equal(
            shared(name).preprocess(rand_image(6, 42)).patch_fraction, torch.ones(1, 9)
        )


def test_llama_rms_norm_eps_is_overridden():
    cfg = tiny_config("llama-vit")
    llm = tiny_llm(cfg, rms_norm_eps=1e-5)
    model = MolmoModel.from_components(cfg, llm, tiny_tokenizer(), tiny_vit(cfg))
    eps = {m.variance_epsilon for m in model.llm.modules() if hasattr(m, "variance_epsilon")}
    assert eps == {1e-6} and model.llm.config.rms_norm_eps == 1e-6


def test_bf16_model_runs_with_fp32_vit_attention():
    cfg = tiny_config("olmo-siglip")
    llm = tiny_llm(cfg).to(torch.bfloat16)
    model = MolmoModel.from_components(
        cfg,
        llm,
        tiny_tokenizer(),
        VisionEncoder(tiny_vit(cfg), cfg.vision).to(torch.bfloat16),
        synthetic_connector(cfg),
    )
    assert model.dtype == torch.bfloat16
    out = model.visual_hidden_states(rand_image(20, 20), [0, 2])
    assert out[2].dtype == torch.bfloat16 and torch.isfinite(out[2].float()).all()


def test_generate_returns_one_caption_per_image():
    captions = shared("llama-dino").generate(
        [rand_image(20, 20), rand_image(9, 30)], max_new_tokens=3
    )
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_mismatched_parts_are_rejected():
    cfg = tiny_config("olmo-vit")
    with pytest.raises(ValueError, match="layers"):
        MolmoModel.from_components(
            cfg, tiny_llm(cfg, num_hidden_layers=2), tiny_tokenizer(), tiny_vit(cfg)
        )
    other = tiny_config("olmo-siglip")
    with pytest.raises(ValueError, match="clip encoder"):
        VisionEncoder(tiny_vit(other), cfg.vision)


# ── checkpoints ─────────────────────────────────────────────────────────────────────


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_loading_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "connector.pt"
    state = synthetic_connector(tiny_config("olmo-vit"))
    torch.save({**state, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        read_checkpoint(path)
    assert not marker.exists()


def test_key_map_asserts(tmp_path):
    cfg = tiny_config("llama-dino")
    state = synthetic_connector(cfg)
    mapped = map_state_dict(state, cfg)
    assert set(mapped) == set(KEY_MAP.values())
    with pytest.raises(CheckpointError, match="missing"):
        map_state_dict({k: v for k, v in state.items() if "w3" not in k}, cfg)
    with pytest.raises(CheckpointError, match="unexpected"):
        map_state_dict({**state, "transformer.blocks.0.attn.weight": torch.zeros(1)}, cfg)
    bad = dict(state)
    bad["vision_backbone.pad_embed"] = torch.zeros(2, 7)
    with pytest.raises(CheckpointError, match="shape"):
        map_state_dict(bad, cfg)
    extra = {**state, "vision_backbone.image_pooling_2d.wq.weight": torch.zeros(2, 2)}
    assert set(map_state_dict(extra, cfg)) == set(KEY_MAP.values())
    with pytest.raises(CheckpointError, match="shape"):
        map_state_dict(state, MODELS["llama-dino"])  # tiny weights for the real model


def test_convert_to_safetensors_round_trip(tmp_path):
    cfg = tiny_config("qwen-siglip")
    state = synthetic_connector(cfg, seed=5)
    pt = tmp_path / "qwen-siglip" / "connector.pt"
    pt.parent.mkdir()
    torch.save(state, pt)
    st = convert_to_safetensors(pt)
    assert st == pt.with_suffix(".safetensors") and st.read_bytes()[:8] != b"PK\x03\x04"[:8]
    back = read_checkpoint(st)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    a = MolmoModel.from_components(cfg, tiny_llm(cfg), tiny_tokenizer(), tiny_vit(cfg), pt)
    b = MolmoModel.from_components(cfg, tiny_llm(cfg), tiny_tokenizer(), tiny_vit(cfg), st)
    img = rand_image(20, 30)
    torch.testing.assert_close(a.encode_images(img), b.encode_images(img))
    assert torch.equal(a.connector.w2.weight, state["vision_backbone.image_projector.w2.weight"])


# ── loading from a (fake, offline) Hugging Face cache ───────────────────────────────

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, repo_id: str) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


@pytest.mark.parametrize("name", ["olmo-vit", "llama-dino", "qwen-siglip"])
def test_from_pretrained_offline_from_the_hub_cache(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    cfg = tiny_config(name)
    llm = tiny_llm(cfg, rms_norm_eps=1e-5)
    llm_dir = _snapshot(cache, cfg.llm.hub_id)
    llm.save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    if cfg.llm.family == "olmo":  # the real config still says olmo_1124
        text = (llm_dir / "config.json").read_text().replace('"olmo2"', '"olmo_1124"')
        (llm_dir / "config.json").write_text(text)
    tiny_vit(cfg, seed=2).save_pretrained(_snapshot(cache, cfg.vision.hub_id))
    state = synthetic_connector(cfg, seed=3)
    buf = io.BytesIO()
    torch.save(state, buf)
    conn = _snapshot(cache, "McGill-NLP/latentlens-connectors") / name / "connector.pt"
    conn.parent.mkdir(parents=True)
    conn.write_bytes(buf.getvalue())

    model = molmo.load(cfg, cache_dir=cache, dtype="float32")
    assert model.checkpoint_path == conn or model.checkpoint_path.resolve() == conn.resolve()
    assert model.llm.config.rms_norm_eps == 1e-6
    ref = MolmoModel.from_components(
        cfg, tiny_llm(cfg), tiny_tokenizer(), tiny_vit(cfg, seed=2), state
    )
    img = rand_image(25, 40)
    got, want = model.visual_hidden_states(img, [0, 3]), ref.visual_hidden_states(img, [0, 3])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[3], want[3])
    with pytest.raises(Exception, match="offline|LocalEntryNotFound|cannot find|connector"):
        molmo.load(cfg.__class__(name="llama-vit", llm=cfg.llm, vision=cfg.vision), cache_dir=cache)


def test_local_connector_directory_is_found(tmp_path):
    from molmo.checkpoint import resolve_connector_path

    (tmp_path / "olmo-vit").mkdir()
    torch.save({}, tmp_path / "olmo-vit" / "connector.pt")
    assert resolve_connector_path(tmp_path, "olmo-vit") == tmp_path / "olmo-vit" / "connector.pt"
    with pytest.raises(CheckpointError, match="no connector"):
        resolve_connector_path(tmp_path, "qwen-vit")
    assert os.fspath(resolve_connector_path(tmp_path / "olmo-vit", "x")).endswith("connector.pt")
