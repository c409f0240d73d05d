"""Standardised LatentLens: per-layer statistics of the rows, and search in z-scored space that
equals a brute force, on a tiny model whose hidden states carry injected outlier dimensions."""

from __future__ import annotations

import pytest
import torch

from latentlens import ContextualIndex
from latentlens.extract import build_index
from latentlens.models.hooks import get_hidden_states
from latentlens.search.standardize import RunningStats, layer_stats
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = SENTENCES + [
    "a small brown dog sleeps near the warm fire",
    "the old man reads a long book in the park",
    "three birds sit on the high wall of the house",
    "the blue car waits at the red light on the street",
]
OUTLIERS = {3: 400.0, 17: -250.0}  # dimension → value added after every block


def outlier_model() -> torch.nn.Module:
    """A tiny Llama whose every block output gains a few huge constant dimensions, like the
    massive activations of real LLMs."""
    model = tiny_causal_lm("llama")
    shift = torch.zeros(model.config.hidden_size)
    for dim, value in OUTLIERS.items():
        shift[dim] = value

    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (output[0] + shift, *output[1:])
        return output + shift

    for block in model.model.layers:
        block.register_forward_hook(hook)
    return model


def z_brute_force(
    rows: torch.Tensor, q: torch.Tensor, k: int, unit: bool = True
) -> tuple[list[float], list[int]]:
    """Top-k cosine after z-scoring with the rows' own mean / std, fp64, ties by row
    (``unit``: the query is L2-normalised first, like the rows of a normalised bank)."""
    q = q.to(torch.float64)
    q = q / q.norm() if unit else q
    x = rows.to(torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
    zq = (q.to(torch.float64) - mean) / std
    s = z @ (zq / zq.norm())
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))[:k]
    return [float(s[i]) for i in order], order


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    model, tok = outlier_model(), tiny_tokenizer()
    out = tmp_path_factory.mktemp("std") / "bank"
    index = build_index(
        "tiny-outliers", CORPUS, layers=[1, 2], model=model, tokenizer=tok,
        show_progress=False, output_dir=out,
    )  # fmt: skip
    enc = tok(["the dog plays with a red ball", "white birds fly over the house"],
              return_tensors="pt", padding=True)  # fmt: skip
    with torch.inference_mode():
        states = get_hidden_states(model, layers=[2], **enc)[2]
    mask = enc["attention_mask"].bool()
    queries = states[mask][2:]  # skip the first tokens
    return out, index, queries


def test_running_stats_equal_one_pass_and_ignore_chunking():
    x = torch.randn(1000, 7, dtype=torch.float64) * torch.arange(1, 8) + 50
    st = layer_stats(x.to(torch.float16), chunk_rows=33)
    ref = x.to(torch.float16).to(torch.float64)
    torch.testing.assert_close(st.mean, ref.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(st.std, ref.std(0, unbiased=False), rtol=1e-12, atol=1e-12)
    acc = RunningStats(7)
    for part in ref.split([1, 500, 0, 499]):
        acc.update(part)
    assert acc.result().count == 1000
    torch.testing.assert_close(acc.result().std, st.std, rtol=1e-12, atol=0)
    flat = layer_stats(torch.ones(5, 3))
    assert torch.equal(flat.std, torch.ones(3))  # no spread: only centred


def test_the_bank_stores_its_statistics_and_older_banks_compute_them(bank, tmp_path):
    out, index, _ = bank
    assert (out / "stats.safetensors").is_file()
    loaded = ContextualIndex.from_directory(out)
    for layer in (1, 2):
        rows = loaded.embeddings(layer)
        want = layer_stats(rows)
        got = loaded._stats[layer]  # read from the bank, not computed
        torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.std, want.std, rtol=1e-9, atol=1e-9)
        assert got.count == rows.shape[0]
    (out / "stats.safetensors").unlink()  # an older bank: computed on first use, then kept
    old = ContextualIndex.from_directory(out)
    assert old._stats == {}
    st = old.layer_stats(2)
    assert old.layer_stats(2) is st
    torch.testing.assert_close(st.mean, layer_stats(old.embeddings(2)).mean)
    old.save(tmp_path / "again")  # save writes them again
    assert ContextualIndex.from_directory(tmp_path / "again")._stats.keys() == {1, 2}


def test_outliers_saturate_raw_search_and_standardising_recovers_the_query(bank):
    _, index, queries = bank
    raw = index.search(queries, top_k=3, layers=[2])
    std = index.search(queries, top_k=3, layers=[2], standardize=True)
    # raw: every cosine near 1 and a handful of rows answer every query
    assert min(nbs[0].similarity for nbs in raw) > 0.98
    raw_top = {(n[0].caption, n[0].position) for n in raw}
    std_top = {(n[0].caption, n[0].position) for n in std}
    assert len(std_top) > len(raw_top)
    assert max(nbs[0].similarity for nbs in std) < 0.98
    # standardised: the fp64 brute force over the z-scored stored rows, ties by row
    rows = index.embeddings(2)
    scores, layer, entry = index.search_tensors(queries, 4, layers=[2], standardize=True)
    for i, q in enumerate(queries):
        want_s, want_r = z_brute_force(rows, q, 4)
        assert entry[i].tolist() == want_r
        torch.testing.assert_close(
            scores[i].double(), torch.tensor(want_s, dtype=torch.float64), rtol=0, atol=1e-6
        )
        assert set(layer[i].tolist()) == {2}


def test_standardised_search_across_layers_merges_exactly(bank):
    _, index, queries = bank
    scores, layer, entry = index.search_tensors(queries, 5, standardize=True)
    for i, q in enumerate(queries):
        cand = []
        for lay in (1, 2):
            s, r = z_brute_force(index.embeddings(lay), q, 5)
            cand += [(-x, lay, row) for x, row in zip(s, r)]
        want = sorted(cand)[:5]
        assert list(zip(layer[i].tolist(), entry[i].tolist())) == [(w[1], w[2]) for w in want]


def test_standardised_search_is_certified_on_fp16_and_fp8_rows():
    """Rounded z-scored copies (fp16; fp8 banks z-scored into fp16) still give the exact
    fp64 answer over the stored rows: the slack makes the candidate set grow when needed."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, 24, generator=g)
    base[:, 5] += 300  # an outlier dimension
    base[::50] = base[1::50]  # exact duplicates: ties must go to the lower row
    queries = torch.randn(40, 24, generator=g)
    queries[:, 5] += 300
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        rows = (base / 4).to(dtype)
        meta = [
            {"token_str": "t", "token_id": 1, "caption": f"c{i}", "position": 0}
            for i in range(3000)
        ]
        index = ContextualIndex.from_tensors({0: rows}, meta, dtype=None, normalize=False)
        s, _, e = index.search_tensors(queries, 6, standardize=True)
        for i in range(queries.shape[0]):
            want_s, want_r = z_brute_force(rows, queries[i], 6, unit=False)
            assert e[i].tolist() == want_r, dtype
            torch.testing.assert_close(
                s[i].double(), torch.tensor(want_s, dtype=torch.float64), rtol=0, atol=1e-6
            )


def test_a_query_at_the_mean_or_zero_has_no_direction():
    rows = torch.randn(50, 6, dtype=torch.float64) + 3
    meta = [{"token_str": "t", "token_id": 1, "caption": f"c{i}", "position": 0} for i in range(50)]
    index = ContextualIndex.from_tensors({0: rows}, meta, dtype=None, normalize=False)
    mean = index.layer_stats(0).mean
    out = index.search(torch.stack([mean, torch.zeros(6), rows[7]]), top_k=2, standardize=True)
    assert out[0] == [] and out[1] == [] and out[2][0].caption == "c7"
    assert out[2][0].similarity == pytest.approx(1.0)


def test_many_equal_rows_make_the_candidate_set_grow_until_certified(monkeypatch):
    import latentlens.search.standardize as S

    calls = []
    real = S.search_layer

    def spy(q, rows, norms, k, **kw):
        calls.append(k)
        return real(q, rows, norms, k, **kw)

    monkeypatch.setattr(S, "search_layer", spy)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3000, 16, generator=g)
    rows[:, 2] *= 80
    rows[::30] = rows[0]  # 100 equal rows: the top-6 is decided by the row order alone
    meta = [
        {"token_str": "t", "token_id": 1, "caption": f"c{i}", "position": 0} for i in range(3000)
    ]
    index = ContextualIndex.from_tensors({0: rows.half()}, meta, dtype=None, normalize=False)
    scores, _, entry = index.search_tensors(rows[0], 6, standardize=True)
    assert entry[0].tolist() == [0, 30, 60, 90, 120, 150]
    assert len(calls) > 1 and calls == sorted(calls)  # it had to look further, and did
    want_s, want_r = z_brute_force(rows.half(), rows[0], 6, unit=False)
    assert entry[0].tolist() == want_r


def test_search_command_standardize_flag_equals_the_library(tmp_path):
    import json

    from click.testing import CliRunner

    from latentlens.cli import main
    from latentlens.interpretation import interpret
    from latentlens.lenses import LatentLens

    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    index = build_index(str(tmp_path / "model"), CORPUS, layers=[1, 2], output_dir=tmp_path / "b",
                        device="cpu", show_progress=False)  # fmt: skip
    args = ["search", str(tmp_path / "b"), "--text", "the dog sleeps", "--layers", "2",
            "--top-k", "3", "--json", str(tmp_path / "s.json"), "--standardize"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "s.json").read_text())["lenses"]["latent"]["predictions"][0]
    want = interpret(model, tok, "the dog sleeps", [2], [LatentLens(index, 3, standardize=True)])
    assert [[n["caption"] for n in cell] for cell in got] == [
        [n.caption for n in cell] for cell in want.predictions["latent"][0]
    ]
    raw = interpret(model, tok, "the dog sleeps", [2], [LatentLens(index, 3)])
    assert [[n.similarity for n in c] for c in raw.predictions["latent"][0]] != [
        [n["similarity"] for n in cell] for cell in got
    ]
