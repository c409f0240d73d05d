"""Character spans: each bank row knows which occurrence of its token it is."""

from __future__ import annotations

import json

import pytest
import torch

from latentlens import constants as C
from latentlens.bank import Entries
from latentlens.extract import build_index
from latentlens.index import ContextualIndex
from latentlens.spans import tokenize_with_spans
from tests.tiny import tiny_causal_lm, tiny_tokenizer

CAPTIONS = [
    "the cat saw the dog near the tree",  # "the" three times
    "a dog and a cat",
    "the red car",
]


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(0)
    return build_index(
        "tiny",
        CAPTIONS,
        layers=[1, 2],
        model=tiny_causal_lm("llama"),
        tokenizer=tiny_tokenizer(),
        show_progress=False,
        max_contexts_per_token=None,
    )


def test_every_row_points_at_its_own_occurrence(bank):
    entries = bank.entries
    assert entries.span_source == "stored" and entries.span is not None
    seen = {}
    for i in range(len(entries)):
        rec = entries.record(i)
        start, end = rec["char_span"]
        if rec["token_str"] != "<unk>":  # an unknown word still has its place
            assert rec["caption"][start:end] == rec["token_str"].strip()
        seen.setdefault((rec["caption"], rec["token_str"]), []).append(start)
    # the "the"s of the first caption (the first may be skipped at build) are each its own
    starts = seen[(CAPTIONS[0], "the")]
    assert len(starts) >= 2 and starts == sorted(set(starts)) and set(starts) <= {0, 12, 25}


def test_search_results_carry_the_span_and_the_json_keeps_the_original_fields(bank):
    state = bank._layers[2][0].float()
    nb = bank.search(state, top_k=1, layers=[2])[0][0]
    assert nb.char_span is not None and nb.caption[slice(*nb.char_span)] == nb.token_str.strip()
    assert "char_span" not in nb.to_dict()  # the original release's fields only
    assert nb.to_json()["char_span"] == list(nb.char_span)


def test_spans_survive_save_and_older_banks_get_computed_ones(bank, tmp_path):
    path = bank.save(tmp_path / "new")
    assert json.loads((path / C.CONFIG_FILE).read_text())["format_version"] == "1.1"
    again = ContextualIndex.from_directory(path)
    assert again.entries.span_source == "stored"
    assert torch.equal(again.entries.span, bank.entries.span)

    old = ContextualIndex(
        {k: v for k, v in bank._layers.items()},
        Entries(
            bank.entries.token_id,
            bank.entries.caption_id,
            bank.entries.position,
            bank.entries.captions,
            bank.entries.token_strs,
        ),
    )
    old_path = old.save(tmp_path / "old")  # no spans: as format 1.0 wrote it
    loaded = ContextualIndex.from_directory(old_path)
    assert loaded.entries.span_source == "none" and loaded.entries.span is None
    assert loaded._layers_data[1]["metadata"][0].get("char_span") is None
    loaded.attach_spans(tiny_tokenizer())
    assert loaded.entries.span_source == "computed"
    assert torch.equal(loaded.entries.span, bank.entries.span)


def test_special_tokens_and_spaces_have_no_span():
    sentence = ["  the cat "]
    ids, offsets = tokenize_with_spans(tiny_tokenizer(), sentence, 512)
    assert offsets is not None and len(offsets.flat) == len(ids[0])
    spans = offsets.spans(sentence, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 9]))
    assert spans[0].tolist() == [-1, -1]  # <s>
    assert spans[1].tolist() == [2, 5]  # "the", without the leading spaces
    assert spans[2].tolist() == [-1, -1]  # past the sentence's end


def test_the_explorer_highlights_the_rows_own_occurrence():
    from PIL import Image

    from latentlens.results import ImageExplanation, Neighbor
    from latentlens.viz.html import explorer_html

    caption = "the bank robber sat near the bank"
    second = Neighbor(
        "bank", 0.9, caption, position=7, token_id=5, contextual_layer=1, char_span=(29, 33)
    )
    ex = ImageExplanation(Image.new("RGB", (8, 8)), (1, 1), {1: [[second]]}, [0], top_k=1)
    page = explorer_html(ex)
    payload = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert payload["neighbors"]["1"][0][0][4] == [29, 33]
    assert "mark(D.captions[n[3]], n[4])" in page and "indexOf" not in page


def test_both_explorer_pages_run_in_a_real_browser_and_mark_the_right_occurrence(tmp_path):
    import subprocess

    from tests.browser import require_browser

    chromium, _ = require_browser()
    from PIL import Image

    from latentlens.results import ImageExplanation, Neighbor, VideoExplanation
    from latentlens.visual_layout import TokenAddress
    from latentlens.viz.html import explorer_html, video_explorer_html

    caption = "the bank robber sat near the bank"
    nb = Neighbor("bank", 0.9, caption, 7, 5, 1, char_span=(29, 33))
    image = Image.new("RGB", (8, 8))
    pages = {
        "image": explorer_html(ImageExplanation(image, (1, 1), {1: [[nb]]}, [0], top_k=1)),
        "video": video_explorer_html(
            VideoExplanation(
                [image] * 4,
                [TokenAddress(3, 0, 0, 0, f, (f, f + 1), None, (0, 0, 8, 8)) for f in (0, 2)],
                {1: [[nb], [nb]]},
                [0],
                top_k=1,
            )
        ),
    }
    for name, page in pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--dump-dom",
                path.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert 'data-ready="yes"' in dom, f"the {name} page's script did not finish"
        assert "sat near the <b>bank</b>" in dom and "the <b>bank</b> robber" not in dom


def test_offsets_are_the_same_tokenized_in_chunks(monkeypatch):
    import latentlens.spans as S

    tok = tiny_tokenizer()
    ids, whole = tokenize_with_spans(tok, CAPTIONS, 512)
    monkeypatch.setattr(S, "_CHUNK", 2)
    ids2, parts = tokenize_with_spans(tok, CAPTIONS, 512)
    assert ids2 == ids and torch.equal(parts.flat, whole.flat)
    assert torch.equal(parts.starts, whole.starts)
    assert tokenize_with_spans(tok, CAPTIONS, 512, spans=False) == (ids, None)
