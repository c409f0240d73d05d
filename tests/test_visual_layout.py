"""Which hidden state is which patch, per VLM family, checked from the pixels.

(a) Paint over one token's pixel box in the original image: the visual token whose
layer-0 state moves most is the one the address names. (b) Neighbours from a bank equal a
brute force over the model's own state at the reported sequence position. (c) Separators
are located and kept out of the grid. (d) Videos: the frame is checked the same way.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentlens.models.hooks import get_hidden_states
from latentlens.models.visual import VISUAL_FAMILIES
from latentlens.visual_layout import TokenAddress, layout_visual_tokens
from tests.vlm_families import (
    BUILDERS,
    ROOT,
    Subject,
    build,
    encode,
    encode_video,
    layer0,
    markdown,
    most_moved,
    noise,
    paint,
)

FAMILIES = sorted(BUILDERS)


pytestmark = pytest.mark.usefixtures("one_thread")


def check_most_moved(s: Subject, images: list[Image.Image], target: TokenAddress) -> None:
    moved = most_moved(s, images, target)
    assert moved == target, f"{s.family}: painting {target} moved {moved} most"


@pytest.mark.parametrize("family", FAMILIES)
def test_painting_a_tokens_pixels_moves_that_token_most(family: str):
    s = build(family)
    images = [noise(64, 48, 1), noise(40, 56, 2)]
    layout = layout_visual_tokens(
        s.model, encode(s, images), s.processor, image_sizes=[im.size for im in images]
    )
    assert {t.image_index for t in layout.tokens} == {0, 1}
    assert len({t.sequence_position for t in layout.tokens}) == len(layout.tokens)
    for g in layout.grids:  # every grid cell is addressed once
        cells = {(t.row, t.col) for t in layout.select(g.image_index, g.crop)}
        assert cells == {(r, c) for r in range(g.shape[0]) for c in range(g.shape[1])}
    picks = []
    for g in layout.grids:
        h, w = g.shape
        for r, c in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
            picks.append(layout.find(g.image_index, r, c, crop=g.crop))
    for target in picks:
        check_most_moved(s, images, target)


@pytest.mark.parametrize("family", [f for f in FAMILIES if VISUAL_FAMILIES[f].video])
def test_painting_one_frame_moves_the_token_of_its_temporal_group(family: str):
    s = build(family)
    frames = [noise(48, 32, 10 + i) for i in range(6)]
    args = dict(video_sizes=[frames[0].size], video_frames=[len(frames)])
    inputs = encode_video(s, frames)
    layout = layout_visual_tokens(s.model, inputs, s.processor, **args)
    merged = 2 if VISUAL_FAMILIES[family].video_layout == "grid_thw" else 1  # frames per token
    groups = sorted({t.frame for t in layout.tokens})
    assert groups == list(range(0, 6, merged))
    assert {t.frames for t in layout.tokens} == {(f, f + merged - 1) for f in groups}
    before = layer0(s, inputs, layout)
    for f, (r, c) in ((3, (0, 0)), (4, (1, 1)), (0, (1, 0))):
        target = layout.find(0, r, c, frame=f - f % merged)
        changed = list(frames)
        changed[f] = paint(frames[f], target.pixel_box)
        inputs2 = encode_video(s, changed)
        after = layer0(s, inputs2, layout_visual_tokens(s.model, inputs2, s.processor, **args))
        moved = layout.tokens[int((after - before).norm(dim=-1).argmax())]
        assert moved == target, f"{family}: painting frame {f} at {target} moved {moved}"


@pytest.mark.parametrize(
    "family, kinds",
    [
        ("mistral3", {"image_break", "image_end"}),
        ("llava_next", {"image_newline"}),
        ("llava_onevision", {"image_newline"}),
    ],
)
def test_separators_are_located_and_kept_out_of_the_grid(family: str, kinds: set[str]):
    s = build(family)
    images = [noise(64, 48, 1), noise(40, 56, 2)]
    inputs = encode(s, images)
    layout = layout_visual_tokens(
        s.model, inputs, s.processor, image_sizes=[im.size for im in images]
    )
    ids = inputs["input_ids"][0]
    assert {sep.kind for sep in layout.separators} == kinds
    patches = {t.sequence_position for t in layout.tokens}
    assert patches.isdisjoint(sep.sequence_position for sep in layout.separators)
    for i in (0, 1):
        seps = [sep for sep in layout.separators if sep.image_index == i]
        rows = next(g.shape[0] for g in layout.grids if g.image_index == i and g.crop != "global")
        assert len(seps) == rows  # one per row of the grid they separate
        last_of_row = [
            max(
                t.sequence_position
                for t in layout.tokens
                if t.image_index == i and t.row == r and t.crop != "global"
            )
            for r in range(rows)
        ]
        assert [sep.sequence_position for sep in seps] == [p + 1 for p in last_of_row]
    if family == "mistral3":
        tok = s.processor.tokenizer
        break_id, end_id = tok.convert_tokens_to_ids(["[IMG_BREAK]", "[IMG_END]"])
        for sep in layout.separators:
            assert int(ids[sep.sequence_position]) == (
                end_id if sep.kind == "image_end" else break_id
            )
    else:  # the newline is an image-token slot filled with the learned image_newline vector
        with torch.inference_mode():
            h0 = get_hidden_states(s.model, layers=[0], **inputs)[0][0]
        newline = s.model.model.image_newline
        for sep in layout.separators:
            assert torch.allclose(h0[sep.sequence_position], newline, atol=1e-6)


def brute_force(index, state: torch.Tensor, k: int) -> list[tuple[int, str, float]]:
    """Top-k (bank layer, caption, cosine) over every stored row, by hand."""
    hits = []
    q = state.double() / state.double().norm()
    for layer, data in index._layers_data.items():
        emb = data["embeddings"].double()
        sims = emb @ q / emb.norm(dim=1)
        for i in sims.argsort(descending=True)[:k].tolist():
            hits.append((layer, data["metadata"][i]["caption"], float(sims[i])))
    return sorted(hits, key=lambda h: -h[2])[:k]


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_image_neighbours_are_a_brute_force_at_the_reported_positions(family, tmp_path):
    from latentlens.explain import explain_image
    from latentlens.extract import build_index
    from latentlens.vlm import encode_image_prompt
    from tests.tiny import SENTENCES

    s = build(family)
    index = build_index(
        f"tiny-{family}",
        SENTENCES[:12],
        layers=[1, 2],
        model=s.model,
        tokenizer=s.processor.tokenizer,
        show_progress=False,
    )
    image = noise(56, 40, 3)
    ex = explain_image(
        s.model, s.processor, image, index, [0, 1, 2], top_k=3, size=None, num_patches=2
    )
    doc = ex.to_dict(all_patches=True)
    assert doc["family"] == family and doc["grids"]
    inputs = encode_image_prompt(s.processor, image, "Describe this image in detail.")
    with torch.inference_mode():
        states = get_hidden_states(s.model, layers=[0, 1, 2], **inputs)
    ids = inputs["input_ids"][0]
    for layer in ("0", "1", "2"):
        patches = doc["layers"][layer]["patches"]
        assert len(patches) == len(ex.addresses) > 0
        for patch in patches[:: max(1, len(patches) // 5)]:
            pos = patch["sequence_position"]
            assert int(ids[pos]) != s.processor.tokenizer.pad_token_id
            x0, y0, x1, y1 = patch["pixel_box"]
            assert 0 <= x0 < x1 <= 56 and 0 <= y0 < y1 <= 40
            want = brute_force(index, states[int(layer)][0, pos], 3)
            got = patch["nearest_contextual_neighbors"]
            assert [(n["contextual_layer"], n["caption"]) for n in got] == [w[:2] for w in want]
            assert [n["similarity"] for n in got] == pytest.approx([w[2] for w in want], abs=1e-3)


def test_the_compatibility_matrix_is_the_one_this_run_produces():
    """docs/vlm_compatibility.md is generated by these checks; regenerate it with
    `python tests/vlm_families.py --markdown > docs/vlm_compatibility.md`."""
    import re

    def unversioned(text: str) -> str:  # CI may install another transformers release
        return re.sub(r"with transformers \S+;", "with transformers X;", text)

    doc = ROOT / "docs" / "vlm_compatibility.md"
    assert unversioned(doc.read_text(encoding="utf-8")) == unversioned(markdown()), (
        "docs/vlm_compatibility.md is out of date: python tests/vlm_families.py --markdown "
        "> docs/vlm_compatibility.md"
    )


def test_a_family_without_known_geometry_is_refused_by_name():
    from transformers import AutoConfig

    from latentlens.errors import UnsupportedArchitectureError

    config = AutoConfig.for_model("fuyu")  # patches projected straight into the LM
    ids = torch.tensor([[1, 120, 120, 120, 120, 5]])
    with pytest.raises(UnsupportedArchitectureError, match="'fuyu'.*not known"):
        layout_visual_tokens(config, {"input_ids": ids})


def test_inputs_that_do_not_match_the_layout_are_refused():
    from latentlens.errors import LatentLensError

    s = build("qwen2_vl")
    inputs = encode(s, [noise(64, 48, 1)])
    with pytest.raises(LatentLensError, match="image_grid_thw"):
        layout_visual_tokens(s.model, {**inputs, "image_grid_thw": torch.tensor([[1, 4, 4]])})
    with pytest.raises(LatentLensError, match="no input_ids"):
        layout_visual_tokens(s.model, {"pixel_values": inputs["pixel_values"]})
    with pytest.raises(LatentLensError, match="no 'image_grid_thw'"):
        layout_visual_tokens(s.model, {k: v for k, v in inputs.items() if k != "image_grid_thw"})


def test_explain_video_library_and_command(tmp_path):
    import json

    from click.testing import CliRunner

    from latentlens.cli import main as cli
    from latentlens.explain import explain_video
    from latentlens.extract import build_index
    from latentlens.vlm import DEFAULT_VIDEO_PROMPT, load_frames, video_token_states
    from tests.tiny import SENTENCES

    s = build("qwen2_vl")
    bank = tmp_path / "bank"
    index = build_index(
        "tiny-qwen2-vl",
        SENTENCES[:12],
        layers=[1, 2],
        model=s.model,
        tokenizer=s.processor.tokenizer,
        show_progress=False,
        output_dir=bank,
    )
    frames = [noise(48, 32, 20 + i) for i in range(4)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_frames(gif)
    assert len(loaded) == 4 and loaded[0].size == (48, 32)

    ex = explain_video(s.model, s.processor, loaded, index, [1, 2], top_k=3, num_patches=3)
    doc = ex.to_dict()
    assert doc["family"] == "qwen2_vl" and doc["num_frames"] == 4
    assert [g["frame"] for g in doc["grids"]] == [0, 2]
    patches = doc["layers"]["2"]["patches"]
    assert len(patches) == len(ex.addresses) and {p["frame"] for p in patches} == {0, 2}
    seen = video_token_states(s.model, s.processor, loaded, [2], prompt=DEFAULT_VIDEO_PROMPT)
    for p in patches[::7]:
        i = [a.sequence_position for a in seen.addresses].index(p["sequence_position"])
        want = brute_force(index, seen.states[2][i], 3)
        assert [n["caption"] for n in p["nearest_contextual_neighbors"]] == [w[1] for w in want]
    assert "frames 0-1" in ex.table()

    model_dir = tmp_path / "model"
    s.model.save_pretrained(model_dir)
    s.processor.save_pretrained(model_dir)
    out = tmp_path / "strip.png"
    res = CliRunner().invoke(
        cli,
        [
            "explain-video",
            str(gif),
            "--model",
            str(model_dir),
            "--bank",
            str(bank),
            "--layers",
            "1,2",
            "--out",
            str(out),
            "--json",
            "--html",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[0] > 300
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["num_frames"] == 4 and len(data["layers"]["1"]["patches"]) == len(ex.addresses)
    assert out.with_suffix(".html").exists(), res.output
    page = out.with_suffix(".html").read_text()
    assert 'type="range"' in page and 'max="1"' in page  # two temporal groups
    payload = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert [g["frames"] for g in payload["groups"]] == [[0, 1], [2, 3]]
    assert len(payload["images"]) == 2 and len(payload["tokens"]) == len(ex.addresses)
    assert sorted(t for g in payload["groups"] for t in g["tokens"]) == list(
        range(len(ex.addresses))
    )
    # a family without video is told so
    res = CliRunner().invoke(cli, ["explain-video", str(gif), "--model", str(tmp_path / "nope")])
    assert res.exit_code != 0


def test_video_on_a_family_without_video_is_refused():
    from latentlens.errors import LatentLensError
    from latentlens.vlm import video_token_states

    s = build("llava")
    with pytest.raises(LatentLensError, match="takes no video"):
        video_token_states(s.model, s.processor, [noise(16, 16)] * 2, [1])


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_tile_markers_name_each_tile_and_are_reported(family: str):
    s = build(family)
    image = noise(64, 40, 1)  # split into 2 × 3 tiles of 16 px after resizing to 48 × 32
    inputs = encode(s, [image])
    layout = layout_visual_tokens(s.model, inputs, s.processor, image_sizes=[image.size])
    crops = [g.crop for g in layout.grids]
    assert crops == [f"tile {r},{c}" for r in range(2) for c in range(3)] + ["global"]
    tok = s.processor.tokenizer
    kinds = [sep.kind for sep in layout.separators]
    assert kinds.count("<global-img>") == 1 and "<row_2_col_3>" in kinds
    for sep in layout.separators:  # each reported marker is that token
        assert (
            tok.convert_ids_to_tokens(int(inputs["input_ids"][0, sep.sequence_position]))
            == sep.kind
        )
    # a tile covers its sixth of the image; the thumbnail covers it all
    t = layout.find(0, 1, 1, crop="tile 1,2")
    assert t.pixel_box == pytest.approx((64 * 5 / 6, 40 * 3 / 4, 64, 40))
    g = layout.find(0, 0, 0, crop="global")
    assert g.pixel_box == pytest.approx((0, 0, 32, 20))


def test_internvl_tiles_follow_the_canvas_and_end_with_the_thumbnail():
    s = build("internvl")
    wide, small = noise(64, 40, 1), noise(16, 16, 2)  # 3 × 2 tiles + thumbnail; one tile
    inputs = encode(s, [wide, small])
    layout = layout_visual_tokens(s.model, inputs, s.processor, image_sizes=[wide.size, small.size])
    crops = [(g.image_index, g.crop) for g in layout.grids]
    tiles = [(0, f"tile {r},{c}") for r in range(2) for c in range(3)]
    assert crops == tiles + [(0, "global"), (1, None)]
    assert [sep.kind for sep in layout.separators] == ["<img>", "</img>"] * 2
    assert layout.find(0, 0, 0, crop="tile 1,2").pixel_box == pytest.approx(
        (64 * 2 / 3, 20, 64 * 2 / 3 + 64 / 6, 30)
    )


def test_video_states_of_a_pooled_frames_family():
    from latentlens.vlm import video_token_states

    s = build("llava_onevision")
    frames = [noise(40, 30, i) for i in range(3)]
    seen = video_token_states(s.model, s.processor, frames, [0, 1])
    assert [a.frames for a in seen.addresses[:: len(seen.addresses) // 3]] == [
        (0, 0),
        (1, 1),
        (2, 2),
    ]
    assert [sep.kind for sep in seen.layout.separators] == ["image_newline"]
    assert seen.states[1].shape == (len(seen.addresses), 32)


def test_molmo2_low_and_high_res_grids_with_column_tokens():
    s = build("molmo2")
    image = noise(64, 40, 1)
    inputs = encode(s, [image])
    layout = layout_visual_tokens(s.model, inputs, s.processor, image_sizes=[image.size])
    lh, lw, hh, hw = inputs["image_grids"][0].tolist()
    assert [(g.crop, g.shape) for g in layout.grids] == [
        ("global", (lh, lw)),
        ("high-res", (hh, hw)),
    ]
    kinds = [sep.kind for sep in layout.separators]
    assert kinds.count("<im_col>") == lh + hh  # one after each row of both grids
    assert kinds[0] == "<low_res_im_start>" and kinds[-1] == "<im_end>"
    for row in range(hh):  # a column token right after the last patch of each high-res row
        last = layout.find(0, row, hw - 1, crop="high-res").sequence_position
        assert any(
            sep.sequence_position == last + 1 and sep.kind == "<im_col>"
            for sep in layout.separators
        )


@pytest.mark.parametrize(
    "family, crop", [("idefics3", "global"), ("llava_next", "high-res"), ("qwen2_vl", None)]
)
def test_the_picture_uses_a_grid_that_covers_the_whole_image(family: str, crop):
    from latentlens.vlm import visual_token_states

    s = build(family)
    seen = visual_token_states(s.model, s.processor, [noise(64, 40, 1)], [0], size=None)[0]
    h, w = seen.grid
    main = seen.addresses[: h * w]
    assert {a.crop for a in main} == {crop}
    assert [(a.row, a.col) for a in main] == [(r, c) for r in range(h) for c in range(w)]
    x0 = min(a.pixel_box[0] for a in main)
    x1 = max(a.pixel_box[2] for a in main)
    assert x0 == pytest.approx(0, abs=0.5) and x1 == pytest.approx(64, abs=0.5)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "molmo2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_second_sequence_of_a_padded_batch_is_laid_out_like_alone(family: str, side: str):
    s = build(family)
    first, second = [noise(64, 48, 1)], [noise(40, 56, 2), noise(48, 48, 3)]
    tok = s.processor.tokenizer
    tok.padding_side = side
    try:
        batch = dict(
            s.processor(
                text=[s.prompt(1), s.prompt(2)],
                images=first + second,
                return_tensors="pt",
                padding=True,
                **(s.kwargs or {}),
            )
        )
    finally:
        tok.padding_side = "right"
    alone = encode(s, second)
    sizes = [im.size for im in second]
    got = layout_visual_tokens(s.model, batch, s.processor, image_sizes=sizes, batch_index=1)
    want = layout_visual_tokens(s.model, alone, s.processor, image_sizes=sizes)
    pad = int((batch["attention_mask"][1] == 0).sum()) if side == "left" else 0
    assert [t.sequence_position - pad for t in got.tokens] == [
        t.sequence_position for t in want.tokens
    ]
    strip = [(t.image_index, t.crop, t.row, t.col, t.pixel_box) for t in got.tokens]
    assert strip == [(t.image_index, t.crop, t.row, t.col, t.pixel_box) for t in want.tokens]
    assert got.grids == want.grids


def test_three_lens_view_equals_each_lens_on_the_same_state(tmp_path):
    from latentlens.explain import explain_image
    from latentlens.extract import build_index
    from latentlens.lenses import EmbeddingLens, LogitLens
    from latentlens.viz.patches import patch_figure
    from latentlens.vlm import encode_image_prompt
    from tests.tiny import SENTENCES

    s = build("llava_next")
    tok = s.processor.tokenizer
    index = build_index(
        "tiny-llava-next",
        SENTENCES[:12],
        layers=[1, 2],
        model=s.model,
        tokenizer=tok,
        show_progress=False,
    )
    image = noise(56, 40, 3)
    lenses = ["latentlens", "logitlens", "embeddinglens"]
    ex = explain_image(
        s.model, s.processor, image, index, [0, 2], top_k=3, size=None, num_patches=2, lenses=lenses
    )
    inputs = encode_image_prompt(s.processor, image, "Describe this image in detail.")
    with torch.inference_mode():
        states = get_hidden_states(s.model, layers=[0, 2], **inputs)
    logit, emb = LogitLens(s.model, tok, top_k=3), EmbeddingLens(s.model, tok, top_k=3)
    doc = ex.to_dict(all_patches=True)
    for layer in (0, 2):
        for patch in doc["layers"][str(layer)]["patches"][::7]:
            h = states[layer][0, patch["sequence_position"]][None]
            assert [p["token_id"] for p in patch["top_predictions"]] == [
                n.token_id for n in logit.predict(h)[0]
            ]
            assert [p["token_id"] for p in patch["nearest_neighbors"]] == [
                n.token_id for n in emb.predict(h)[0]
            ]
    patch_figure(ex).savefig(tmp_path / "three.png")
    with pytest.raises(ValueError, match="unknown lens"):
        explain_image(s.model, s.processor, image, index, [0], lenses=["nope"])
