"""Tests for latentlens.interpretation: one forward, all lenses, and the result object."""

from __future__ import annotations

import json

import pytest
import torch

from latentlens import ContextualIndex, InterpretResult, interpret
from latentlens.extract import build_index
from latentlens.lenses import EmbeddingLens, LatentLens, LogitLens
from latentlens.models import get_hidden_states, num_layers
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer, tiny_vlm, vlm_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def bank(llama) -> ContextualIndex:
    model, tok = llama
    return build_index(
        "tiny-llama",
        SENTENCES,
        layers=[1, 3],
        model=model,
        tokenizer=tok,
        max_contexts_per_token=3,
        show_progress=False,
    )


def test_default_run_shapes(llama) -> None:
    model, tok = llama
    text = SENTENCES[2]
    result = interpret(model, tok, text)
    ids = tok(text)["input_ids"]
    assert result.layers == list(range(num_layers(model) + 1))
    assert result.positions == list(range(len(ids)))
    assert result.token_ids == ids and result.tokens[1] == tok.decode([ids[1]])
    assert result.lenses == ["logit", "embedding"] and result.text == text
    assert result.score_names == {"logit": "logit", "embedding": "cosine"}
    for name in result.lenses:
        preds = result.predictions[name]
        assert len(preds) == len(result.layers)
        assert all(len(row) == len(ids) and all(len(c) == 5 for c in row) for row in preds)
    assert result.top_scores("logit").shape == (len(result.layers), len(ids))
    assert len(result.top_tokens("embedding")[0]) == len(ids)


def test_lenses_through_interpret_equal_the_lenses_on_the_same_vectors(llama, bank) -> None:
    model, tok = llama
    text = "a cat sleeps on the green chair"
    lenses = [LatentLens(bank, top_k=4), LogitLens(model, tok, 3), EmbeddingLens(model, tok, 2)]
    result = interpret(model, tok, text, layers=[1, 3], lenses=lenses, positions=[2, -1, 0])
    assert result.positions == [2, 7, 0]
    assert result.lens_info["latent"] == {"bank_layers": [1, 3]}
    states = get_hidden_states(model, layers=[1, 3], **tok(text, return_tensors="pt"))
    for li, layer in enumerate([1, 3]):
        vectors = states[layer][0, [2, 7, 0]]
        for pi, neighbors in enumerate(bank.search(vectors, top_k=4)):
            got = result.get("latent", layer, result.positions[pi])
            assert got == result.predictions["latent"][li][pi]
            assert [
                (p.token_str, p.caption, p.position, p.contextual_layer, p.score) for p in got
            ] == [
                (n.token_str, n.caption, n.position, n.contextual_layer, n.similarity)
                for n in neighbors
            ]
        logit = result.predictions["logit"][li]
        emb = result.predictions["embedding"][li]
        logit_s, logit_i = lenses[1].topk(vectors)
        assert [[p.token_id for p in c] for c in logit] == logit_i.tolist()
        emb_s, emb_i = lenses[2].topk(vectors)
        assert [[p.token_id for p in c] for c in emb] == emb_i.tolist()
        got_s = torch.tensor([[p.score for p in c] for c in emb])
        torch.testing.assert_close(got_s, emb_s)
        assert logit_s.shape == (3, 3)


def test_logit_lens_at_the_last_layer_predicts_the_models_next_tokens(llama) -> None:
    model, tok = llama
    batch = tok(SENTENCES[4], return_tensors="pt")
    n = num_layers(model)
    result = interpret(model, tok, dict(batch), layers=[n], lenses=["logit"], top_k=3)
    with torch.inference_mode():
        own = model(**batch).logits[0]
    assert [[p.token_id for p in c] for c in result.predictions["logit"][0]] == (
        own.topk(3, dim=-1).indices.tolist()
    )


def test_inputs_padding_and_errors(llama) -> None:
    model, tok = llama
    left = tiny_tokenizer("left")
    batch = left(["a red car", SENTENCES[0]], return_tensors="pt", padding=True)
    one = {k: v[:1] for k, v in batch.items()}  # left-padded row
    result = interpret(model, tok, one, layers=[0, 2], lenses=["logit"])
    assert result.positions == one["attention_mask"][0].nonzero().flatten().tolist()
    assert result.positions[0] > 0 and result.tokens == ["<s>", "a", "red", "car"]
    ids = tok("the cat")["input_ids"]
    assert interpret(model, tok, ids, layers=1).token_ids == ids
    assert interpret(model, tok, torch.tensor([ids]), layers=1, positions=-1).positions == [2]
    assert interpret(model, tok, "the cat", layers=1, lenses="embedding").lenses == ["embedding"]
    with pytest.raises(ValueError, match="one sequence"):
        interpret(model, tok, batch)
    with pytest.raises(ValueError, match="out of range"):
        interpret(model, tok, "the cat", positions=[5])
    with pytest.raises(ValueError, match="invalid layer"):
        interpret(model, tok, "the cat", layers=[9])
    with pytest.raises(ValueError, match="needs a contextual bank"):
        interpret(model, tok, "the cat", lenses=["latent"])
    with pytest.raises(ValueError, match="unknown lens"):
        interpret(model, tok, "the cat", lenses=["tuned"])
    with pytest.raises(ValueError, match="once"):
        interpret(model, tok, "the cat", lenses=["logit", LogitLens(model, tok)])


def test_result_table_and_json_round_trip(llama, bank, tmp_path) -> None:
    model, tok = llama
    result = interpret(
        model,
        tok,
        "the cat sleeps",
        layers=[1, 3],
        lenses=["latent", "logit", "embedding"],
        index=bank,
        top_k=2,
    )
    table = result.table()
    assert "== latent lens (score: cosine)" in table and "== logit lens (score: logit)" in table
    assert "layer 3" in table and "'sleeps'" in table
    top = result.get("latent", 3, 3)[0]
    assert f"L{top.contextual_layer}" in table and top.caption in table
    assert str(result) == table
    text = result.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(text)
    assert data["lenses"]["latent"]["predictions"][1][3][0]["caption"] == top.caption
    assert data["lenses"]["logit"]["predictions"][0][0][0]["contextual_layer"] == -1
    again = InterpretResult.from_dict(data)
    assert again == result


def test_interpret_a_vlm_with_image_inputs() -> None:
    model = tiny_vlm("qwen2_vl")
    inputs = vlm_inputs(model, batch=1)
    tok = tiny_tokenizer()
    result = interpret(model, tok, inputs, layers=[0, 3], lenses=["logit", "embedding"])
    assert result.positions == list(range(2, inputs["input_ids"].shape[1]))  # two pads skipped
    assert len(result.predictions["logit"][1]) == len(result.positions)
