"""Tests for latentlens.lenses: each lens against the model's own output or brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentlens import ContextualIndex
from latentlens.errors import DimensionMismatchError, InvalidQueryError, LayerNotFoundError
from latentlens.lenses import (
    EmbeddingLens,
    LatentLens,
    LogitLens,
    Neighbor,
    Prediction,
    special_token_ids,
    untrained_rows,
)
from latentlens.models import (
    finalize_logits,
    get_final_norm,
    get_hidden_states,
    get_input_embeddings,
    get_output_embeddings,
    num_layers,
)
from latentlens.results import neighbor_line
from tests.tiny import PAD_ID, SENTENCES, tiny_causal_lm, tiny_tokenizer

N_SPECIAL = 4  # <pad> <unk> <s> </s> are ids 0..3 of the tiny tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch() -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer("right")
    return dict(tok([SENTENCES[0], "the cat sleeps"], return_tensors="pt", padding=True))


def _norm_by_hand(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The final norm written out in float64 (LayerNorm for GPT-2, RMSNorm otherwise)."""
    norm = get_final_norm(model)
    h = h.double()
    if model.config.model_type == "gpt2":
        return F.layer_norm(h, h.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()


def _logits_by_hand(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    head = get_output_embeddings(model)
    logits = _norm_by_hand(model, h) @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    return finalize_logits(model, logits)


# --- LogitLens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "tied"),
    [
        ("gpt2", True),
        ("gpt2", False),
        ("llama", False),
        ("llama", True),
        ("qwen2", False),
        ("qwen2", True),
        ("gemma2", True),
        ("cohere", True),
    ],
)
def test_logit_lens_on_last_layer_is_the_models_own_logits(model_type: str, tied: bool) -> None:
    model = tiny_causal_lm(model_type, tie_word_embeddings=tied)
    head, emb = get_output_embeddings(model), get_input_embeddings(model)
    assert (head.weight.data_ptr() == emb.weight.data_ptr()) == tied
    batch = _batch()
    with torch.inference_mode():
        own = model(**batch, use_cache=False).logits  # [B, T, V]
    n = num_layers(model)
    hidden = get_hidden_states(model, layers=n, **batch)[n]
    lens = LogitLens(model, tiny_tokenizer(), top_k=7)
    scores, ids = lens.topk(hidden.reshape(-1, hidden.shape[-1]))
    want_s, want_i = own.reshape(-1, own.shape[-1]).topk(7, dim=-1)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(scores, want_s, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lens.logits(hidden), own, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_logit_lens_on_a_middle_layer_is_norm_and_head_by_hand(model_type: str) -> None:
    model = tiny_causal_lm(model_type)
    hidden = get_hidden_states(model, layers=1, **_batch())[1].reshape(-1, 32)
    want_s, want_i = _logits_by_hand(model, hidden).topk(5, dim=-1)
    scores, ids = LogitLens(model, tiny_tokenizer()).topk(hidden)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(scores.double(), want_s, atol=1e-4, rtol=1e-5)


def test_logit_lens_blocks_and_half_precision_weights() -> None:
    """bf16 weights: norm and head in fp32, head converted block by block, same answer."""
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    hidden = torch.randn(37, 32)
    want_s, want_i = _logits_by_hand(model, hidden).topk(6, dim=-1)
    for chunk in (64 * 2**20, 4 * 32 * 20):  # one block; blocks of 20 vocab rows and queries
        lens = LogitLens(model, tiny_tokenizer(), top_k=6, chunk_bytes=chunk)
        scores, ids = lens.topk(hidden)
        assert scores.dtype == torch.float32
        assert torch.equal(ids, want_i), chunk
        torch.testing.assert_close(scores.double(), want_s, atol=1e-4, rtol=1e-5)
    assert len(LogitLens(model, tiny_tokenizer(), chunk_bytes=4 * 32 * 20)._vocab_blocks()) > 1


def test_logit_lens_probabilities_are_the_softmax_over_the_whole_vocab() -> None:
    """The running log-sum-exp over vocabulary blocks equals one softmax over all logits."""
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    hidden = torch.randn(23, 32)
    with torch.no_grad():
        full = torch.softmax(_logits_by_hand(model, hidden), dim=-1)
    for chunk in (64 * 2**20, 4 * 32 * 20):  # one block; many blocks
        lens = LogitLens(model, tiny_tokenizer(), top_k=5, chunk_bytes=chunk)
        logits, probs, ids = lens.top_predictions(hidden)
        torch.testing.assert_close(probs.double(), full.gather(1, ids), atol=1e-5, rtol=1e-4)
        assert torch.all(probs[:, :-1] >= probs[:, 1:])
        preds = lens.predict(hidden)
        assert [p.probability for p in preds[3]] == pytest.approx(probs[3].tolist())
        assert "probability" in preds[3][0].to_json() and "probability" not in preds[3][0].to_dict()


def test_logit_lens_chunked_queries_equal_one_batch() -> None:
    model = tiny_causal_lm("qwen2")
    hidden = torch.randn(50, 32)
    big = LogitLens(model, tiny_tokenizer()).topk(hidden)
    small = LogitLens(model, tiny_tokenizer(), chunk_bytes=1).topk(hidden)  # one query a block
    assert torch.equal(big[1], small[1])
    torch.testing.assert_close(big[0], small[0])


def test_lens_call_nests_like_the_input_and_decodes() -> None:
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    lens = LogitLens(model, tok, top_k=3)
    hidden = torch.randn(2, 4, 32)
    out = lens(hidden)
    assert len(out) == 2 and all(len(row) == 4 for row in out)
    assert all(len(cell) == 3 and isinstance(cell[0], Prediction) for row in out for cell in row)
    scores, ids = lens.topk(hidden.reshape(8, 32))
    assert [p.token_id for p in out[1][2]] == ids[6].tolist()
    assert [p.score for p in out[1][2]] == pytest.approx(scores[6].tolist())
    assert out[0][0][0].token_str == tok.decode([out[0][0][0].token_id])
    single = lens(hidden[0, 0])
    assert isinstance(single, list) and isinstance(single[0], Prediction)
    assert len(lens(hidden[0, 0], top_k=1)) == 1
    assert len(lens(torch.randn(1, 32), top_k=500)[0]) == 128  # capped at the vocabulary
    with pytest.raises(DimensionMismatchError):
        lens(torch.randn(3, 16))
    with pytest.raises(InvalidQueryError):
        lens(torch.randn(0, 32))
    with pytest.raises(ValueError, match="top_k"):
        lens(hidden, top_k=0)


def test_one_result_type_for_every_lens() -> None:
    assert Prediction is Neighbor  # one type; the old name is an alias
    p = Neighbor(token_str="cat", similarity=0.5, token_id=7)
    assert p.to_dict() == {
        "token_str": "cat",
        "similarity": 0.5,
        "caption": "",
        "position": -1,
        "token_id": 7,
        "contextual_layer": -1,
    }
    assert p.score == 0.5 and not p.is_contextual
    q = Neighbor("cat", 0.5, caption="a cat", position=2, token_id=7, contextual_layer=3)
    assert q.is_contextual
    assert Neighbor.from_dict(p.to_dict()) == p and Neighbor.from_dict(q.to_dict()) == q
    old = {"token_str": "cat", "token_id": 7, "score": 0.5}  # files written before
    assert Neighbor.from_dict(old) == p
    assert neighbor_line(q) == " 0.500  L3   'cat'          a cat"
    assert neighbor_line(p) == " 0.500  'cat'"


def _brute_embedding(weight: torch.Tensor, allowed: torch.Tensor, q: torch.Tensor, k: int):
    w = weight.double()
    cos = F.normalize(q.double(), dim=-1) @ F.normalize(w, dim=-1).T
    cos[:, ~allowed] = -torch.inf
    return cos.topk(k, dim=-1)


def test_embedding_lens_never_returns_special_or_pad_ids() -> None:
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    weight = get_input_embeddings(model).weight
    specials = sorted(special_token_ids(tok))
    assert specials == [0, 1, 2, 3] and PAD_ID in specials
    assert bool((weight[PAD_ID] == 0).all())  # padding_idx row: no cosine to read
    # Queries that ARE the special rows (cosine 1 with themselves) plus random ones.
    queries = torch.cat([weight[1:4].detach(), torch.randn(20, 32)])
    lens = EmbeddingLens(model, tok, top_k=10)
    _, ids = lens.topk(queries)
    assert not set(ids.flatten().tolist()) & set(specials)
    assert ids.max() < len(tok)  # rows past the tokenizer's vocabulary are never trained
    assert set(lens.excluded_ids) == set(specials) | set(range(len(tok), 128))
    # The original behaviour returns them: each special row is its own nearest neighbour.
    original = EmbeddingLens(model, tok, top_k=1, original=True)
    assert original.excluded_ids == []
    assert original.topk(weight[1:4].detach())[1].flatten().tolist() == [1, 2, 3]


def test_embedding_lens_matches_brute_force_with_holes_inside() -> None:
    model, tok = tiny_causal_lm("qwen2"), tiny_tokenizer()
    emb = get_input_embeddings(model)
    with torch.no_grad():
        emb.weight[10] = 0.0  # never-trained rows: a zero row and two identical rows
        emb.weight[20] = emb.weight[30] = 0.01
    lens = EmbeddingLens(model, tok, top_k=6, exclude_ids=[7, 40])
    allowed = torch.ones(128, dtype=torch.bool)
    allowed[[0, 1, 2, 3, 7, 10, 20, 30, 40]] = False
    allowed[len(tok) :] = False
    assert sorted(lens.excluded_ids) == sorted((~allowed).nonzero().flatten().tolist())
    assert lens._n_inner == 5  # 7, 10, 20, 30, 40 lie inside the searched view
    # Queries near excluded rows push them to the top of an unfiltered search.
    w = emb.weight.detach()
    queries = torch.cat([w[[7, 20, 40]] + 0.01 * torch.randn(3, 32), torch.randn(40, 32)])
    scores, ids = lens.topk(queries)
    want_s, want_i = _brute_embedding(w, allowed, queries, 6)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(scores.double(), want_s, atol=1e-6, rtol=0)
    # And with untrained rows kept, they come back.
    kept = EmbeddingLens(model, tok, top_k=1, exclude_untrained=False)
    assert kept.topk(w[[20]] * 3)[1].item() in (20, 30)


def test_embedding_lens_reads_gemmas_scaled_layer_zero() -> None:
    """hidden_states[0] = weight[id]·sqrt(d); cosine ignores the scale: top-1 is the input id."""
    model, tok = tiny_causal_lm("gemma"), tiny_tokenizer()
    batch = tok([SENTENCES[1]], return_tensors="pt")
    hidden = get_hidden_states(model, layers=0, **batch)[0][0]
    scores, ids = EmbeddingLens(model, tok).topk(hidden)
    words = batch["input_ids"][0, 1:]  # position 0 is <s>, a special token
    assert torch.equal(ids[1:, 0], words)
    torch.testing.assert_close(scores[1:, 0], torch.ones(len(words)), atol=1e-5, rtol=0)
    assert ids[0, 0] != batch["input_ids"][0, 0]


def test_a_processor_is_read_through_its_tokenizer() -> None:
    class Processor:  # what a multimodal processor looks like to the lenses
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    lens = EmbeddingLens(model, Processor(tok), top_k=2)
    assert lens.excluded_ids == EmbeddingLens(model, tok).excluded_ids
    pred = LogitLens(model, Processor(tok))(torch.randn(32))[0]
    assert pred.token_str == tok.decode([pred.token_id])


def test_special_ids_include_added_special_tokens() -> None:
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_tokens(["plainword"])
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = special_token_ids(tok)
    assert image_id in ids and tok.convert_tokens_to_ids("plainword") not in ids


def test_untrained_rows_finds_zero_and_duplicate_rows_only() -> None:
    w = torch.randn(300, 24)
    w[5] = 0
    w[[17, 250, 299]] = w[100].clone()  # three copies of row 100: all four are suspicious
    w[60, 0] = w[61, 0]  # equal in one coordinate only: not duplicates
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        mask = untrained_rows(w.to(dtype), chunk_elements=24 * 7)
        assert mask.nonzero().flatten().tolist() == [5, 17, 100, 250, 299], dtype


def test_embedding_lens_refuses_excluding_everything() -> None:
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="every embedding row"):
        EmbeddingLens(model, tiny_tokenizer(), exclude_ids=range(128))


# --- LatentLens -----------------------------------------------------------------------------


def _index() -> ContextualIndex:
    meta = [
        {"token_str": f"w{i}", "token_id": i, "caption": f"sentence {i}", "position": i % 5}
        for i in range(60)
    ]
    layers = {1: torch.randn(60, 32), 3: torch.randn(60, 32)}
    return ContextualIndex.from_tensors(layers, meta, model_name="tiny")


def test_latent_lens_equals_index_search() -> None:
    index = _index()
    queries = torch.randn(2, 5, 32)
    lens = LatentLens(index, top_k=4)
    out = lens(queries)
    want = index.search(queries.reshape(10, 32), top_k=4)
    for q in range(10):
        got = out[q // 5][q % 5]
        assert [
            (p.token_str, p.token_id, p.caption, p.position, p.contextual_layer) for p in got
        ] == [(n.token_str, n.token_id, n.caption, n.position, n.contextual_layer) for n in want[q]]
        assert [p.score for p in got] == [n.similarity for n in want[q]]
    scores, ids = lens.topk(queries.reshape(10, 32))
    assert ids[3].tolist() == [n.token_id for n in want[3]]
    assert scores[3].tolist() == pytest.approx([n.similarity for n in want[3]])


def test_latent_lens_restricted_layers() -> None:
    index = _index()
    lens = LatentLens(index, top_k=5, layers=[3])
    assert all(p.contextual_layer == 3 for p in lens(torch.randn(32)))
    with pytest.raises(LayerNotFoundError):
        LatentLens(index, layers=[2])
    with pytest.raises(DimensionMismatchError):
        lens(torch.randn(4, 16))
