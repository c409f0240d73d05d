"""Visual-token location, the quickstart end to end on tiny VLMs, and the HTML explorer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentlens.explain import explain_image, sample_patches
from latentlens.extract import build_index
from latentlens.models.hooks import get_hidden_states
from latentlens.viz.html import explorer_html
from latentlens.viz.patches import patch_figure
from latentlens.vlm import encode_image_prompt, load_image, locate_visual_tokens, square_crop_resize
from tests.tiny import SENTENCES, tiny_tokenizer, tiny_vlm

ROOT = Path(__file__).resolve().parents[1]
VL_TOKENS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]


pytestmark = pytest.mark.usefixtures("one_thread")


def qwen_vl(kind: str = "qwen2_vl"):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VL_TOKENS})
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**sizes),
    )
    model = tiny_vlm(kind)
    ids = tok.convert_tokens_to_ids(VL_TOKENS)
    model.config.image_token_id, model.config.vision_start_token_id = ids[0], ids[1]
    model.config.vision_end_token_id, model.config.video_token_id = ids[2], ids[3]
    return model, proc


def llava():
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    model = tiny_vlm("llava")
    model.config.image_token_index = tok.convert_tokens_to_ids("<image>")
    return model, proc


def random_image(w: int = 60, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_layer0_at_image_positions_is_the_merged_vision_output(kind):
    model, proc = qwen_vl(kind)
    inputs = encode_image_prompt(proc, square_crop_resize(random_image(), 32), "a red car")
    vt = locate_visual_tokens(model, inputs["input_ids"], inputs["image_grid_thw"])
    assert vt.grid == (4, 4)  # 32 px / patch 4 = 8 patches per side, merged 2×2
    assert int(inputs["input_ids"][0, vt.position(1, 2)]) == model.config.image_token_id
    with torch.inference_mode():
        states = get_hidden_states(model, layers=[0], **inputs)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert torch.allclose(states[0][0, vt.positions], feats.reshape(16, -1), atol=1e-6)
    # the text around the image is untouched: position 0 holds the BOS embedding
    emb = model.get_input_embeddings().weight[inputs["input_ids"][0, 0]]
    assert torch.allclose(states[0][0, 0], emb)


def test_llava_layer0_is_the_projector_output_in_row_major_order():
    model, proc = llava()
    inputs = encode_image_prompt(proc, square_crop_resize(random_image(), 16), "a cat")
    vt = locate_visual_tokens(model, inputs["input_ids"])
    assert vt.grid == (4, 4)
    with torch.inference_mode():
        states = get_hidden_states(model, layers=[0], **inputs)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    assert torch.allclose(states[0][0, vt.positions], feats.reshape(16, -1), atol=1e-6)


def test_locate_errors():
    model, _ = qwen_vl()
    from latentlens.errors import LatentLensError

    with pytest.raises(LatentLensError, match="no image tokens"):
        locate_visual_tokens(model, torch.tensor([[2, 5, 6]]), torch.tensor([[1, 8, 8]]))
    ids = torch.tensor([[2] + [model.config.image_token_id] * 15])
    with pytest.raises(LatentLensError, match="15 image tokens"):
        locate_visual_tokens(model, ids, torch.tensor([[1, 8, 8]]))


def test_image_preparation():
    img = Image.new("RGBA", (100, 60), (255, 0, 0, 0))
    rgb = load_image(img)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 0, 0)  # alpha dropped, not blended
    sq = square_crop_resize(random_image(90, 50), 32)
    assert sq.size == (32, 32)
    assert sample_patches(256, 10) == sorted(__import__("random").Random(10).sample(range(256), 10))
    assert sample_patches(5, 10) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_bank_and_model(tmp_path_factory):
    model, proc = qwen_vl()
    tmp = tmp_path_factory.mktemp("qs")
    index = build_index(
        "tiny-qwen2-vl",
        SENTENCES,
        layers=[1, 2, 3],
        model=model,
        tokenizer=proc.tokenizer,
        show_progress=False,
        output_dir=tmp / "bank",
    )
    return model, proc, index, tmp


def test_explain_image_matches_direct_search(tiny_bank_and_model, tmp_path):
    model, proc, index, _ = tiny_bank_and_model
    ex = explain_image(model, proc, random_image(), index, [1, 3], top_k=3, size=32, num_patches=4)
    assert ex.grid == (4, 4) and ex.layers == [1, 3] and len(ex.patches) == 4
    inputs = encode_image_prompt(
        proc, square_crop_resize(random_image(), 32), "Describe this image in detail."
    )
    vt = locate_visual_tokens(model, inputs["input_ids"], inputs["image_grid_thw"])
    with torch.inference_mode():
        h = get_hidden_states(model, layers=[3], **inputs)[3][0, vt.position(2, 1)]
    assert ex.neighbors[3][2 * 4 + 1] == index.search(h, top_k=3)[0]
    d = ex.to_dict(all_patches=True)
    patch = d["layers"]["3"]["patches"][9]
    assert (patch["patch_idx"], patch["patch_row"], patch["patch_col"]) == (9, 2, 1)
    nb = patch["nearest_contextual_neighbors"][0]
    assert set(nb) == {
        "token_str",
        "similarity",
        "caption",
        "position",
        "token_id",
        "contextual_layer",
        "char_span",  # ours: which occurrence of the token in the caption
    }
    start, end = nb["char_span"]
    assert nb["caption"][start:end] == nb["token_str"].strip()
    assert "layer 1" in ex.table()
    patch_figure(ex).savefig(tmp_path / "fig.png")
    png = np.asarray(Image.open(tmp_path / "fig.png"))
    assert png.shape[0] > 300 and png.std() > 10  # drawn, not blank


def test_quickstart_script_end_to_end(tiny_bank_and_model, tmp_path):
    model, proc, _index, tmp = tiny_bank_and_model
    model.save_pretrained(tmp_path / "vlm")
    proc.save_pretrained(tmp_path / "vlm")
    random_image(80, 64).save(tmp_path / "photo.png")
    cmd = [
        sys.executable,
        str(ROOT / "quickstart.py"),
        "--image",
        str(tmp_path / "photo.png"),
        "--model",
        str(tmp_path / "vlm"),
        "--bank",
        str(tmp / "bank"),
        "--size",
        "32",
        "--layers",
        "1,2",
        "--num-patches",
        "3",
        "--top-k",
        "4",
        "--device",
        "cpu",
        "--json",
        "--html",
        "--lenses",
        "latentlens,logitlens,embeddinglens",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer 2" in out.stdout and "patch" in out.stdout
    png = tmp_path / "photo_latentlens.png"
    assert png.exists() and Image.open(png).size[0] > 600
    data = json.loads((tmp_path / "photo_latentlens.json").read_text())
    assert data["grid"] == [4, 4] and len(data["layers"]["1"]["patches"]) == 16
    assert len(data["layers"]["2"]["patches"][5]["nearest_contextual_neighbors"]) == 4
    # the three-lens view: the baselines' predictions in the original files' field names
    assert [set(p) for p in data["layers"]["2"]["patches"][5]["top_predictions"]] == [
        {"token", "token_id", "logit", "probability"}
    ] * 4
    assert len(data["layers"]["1"]["patches"][0]["nearest_neighbors"]) == 4
    page = (tmp_path / "photo_latentlens.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    # bad input: one clear line, no traceback
    bad = subprocess.run(
        cmd[:2]
        + [
            "--image",
            str(tmp_path / "photo.png"),
            "--model",
            str(tmp_path / "vlm"),
            "--bank",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 1 and "Error:" in bad.stderr and "Traceback" not in bad.stderr
    # the explorer on the quickstart's outputs (its PNG names the JSON beside it)
    from click.testing import CliRunner

    from latentlens.cli import main as cli

    res = CliRunner().invoke(
        cli, ["explore", str(tmp_path / "photo_latentlens.png"), "-o", str(tmp_path / "site")]
    )
    assert res.exit_code == 0, res.output
    (folder,) = [p for p in (tmp_path / "site").iterdir() if (p / "image.html").is_file()]
    text = (folder / "data" / "0" / "L2.js").read_text()
    layer2 = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    want = data["layers"]["2"]["patches"]
    assert [[n[0] for n in cell] for cell in layer2["latentlens"]] == [
        [n["token_str"] for n in p["nearest_contextual_neighbors"]] for p in want
    ]
    assert [[n[0] for n in cell] for cell in layer2["logitlens"]] == [
        [n["token"] for n in p["top_predictions"]] for p in want
    ]


def _chromium() -> str:
    from tests.browser import require_browser

    return require_browser()[0]


def test_html_explorer_renders_in_a_real_browser(tiny_bank_and_model, tmp_path):
    _chromium()
    model, proc, index, _ = tiny_bank_and_model
    ex = explain_image(model, proc, random_image(), index, [1, 2], top_k=2, size=32, num_patches=2)
    ex.neighbors[1][ex.patches[0]][0].caption = "a caption with </script><b>tags</b>"
    page = tmp_path / "x.html"
    page.write_text(explorer_html(ex), encoding="utf-8")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-ready="yes"' in dom  # the script ran to its end
    assert dom.count('class="cell') == 16  # one cell per patch
    assert "layer 1</th>" in dom and "layer 2</th>" in dom  # the first highlighted patch's tables
    assert "&lt;/script&gt;" in dom  # captions are escaped, not injected
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,700", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 10


def test_explain_image_on_a_llava_style_model():
    model, proc = llava()
    index = build_index(
        "tiny-llava",
        SENTENCES,
        layers=[1, 2],
        model=model,
        tokenizer=proc.tokenizer,
        show_progress=False,
    )
    ex = explain_image(model, proc, random_image(), index, [2], top_k=2, size=16, num_patches=3)
    assert ex.grid == (4, 4) and len(ex.neighbors[2]) == 16
    inputs = encode_image_prompt(
        proc, square_crop_resize(random_image(), 16), "Describe this image in detail."
    )
    vt = locate_visual_tokens(model, inputs["input_ids"])
    with torch.inference_mode():
        h = get_hidden_states(model, layers=[2], **inputs)[2][0, vt.position(3, 0)]
    assert ex.neighbors[2][12] == index.search(h, top_k=2)[0]
