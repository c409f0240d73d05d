"""Search and bank faults outside the tested cases, each pinned by a test that failed before.

NaN thresholds, non-finite rows and bad entry maps in every entry point, zero queries,
interrupted saves and rebuilds, resume fingerprints, temporary files, inflating legacy
files, corpus line breaks, negative ids, the offline Hub layer error, TF32.
"""

from __future__ import annotations

import zipfile

import pytest
import torch
import torch.nn.functional as F

from latentlens import ContextualIndex, EmbeddingLens, build_index
from latentlens import bank as B
from latentlens import constants as C
from latentlens.corpus import load_corpus
from latentlens.errors import BankFormatError, LayerNotFoundError
from latentlens.extract import _Builder
from latentlens.search import RowNorms, brute_force, search_banks
from latentlens.search.precision import FastBound
from latentlens.sharded import DistributedIndex, MultiDeviceIndex
from tests.test_index import fake_hub_repo
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer


def _meta(n: int) -> list[dict]:
    return [
        {"token_str": f"t{i}", "token_id": i, "caption": f"c{i}", "position": 2} for i in range(n)
    ]


# ── the threshold with beta = 0 ──────────────────────────────────────────────────────


def test_empty_running_topk_gives_minus_inf_not_nan_for_any_beta():
    for beta in (0.0, 1e-7):
        bound = FastBound(alpha=torch.tensor([1e-6], dtype=torch.float64), beta=beta, scaled=False)
        ninf = torch.tensor([float("-inf")], dtype=torch.float64)
        assert bound.lower(ninf).item() == float("-inf")
        assert bound.threshold(ninf).item() == float("-inf")
        assert bound.lower(torch.tensor([0.5], dtype=torch.float64)).item() < 0.5


@pytest.mark.parametrize("precision", ["exact", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unit_bank_large_top_k_equals_brute_force(precision, dtype):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(600, 256), dim=-1)
    index = ContextualIndex.from_tensors({1: emb}, _meta(600), dtype=dtype)
    q = torch.randn(40, 256)
    for k in (1, 300, 600):  # up to the layer's row count
        scores, _, entry = index.search_tensors(q, top_k=k, precision=precision)
        ref = brute_force(q, [index.embeddings(1)], k)
        assert torch.isfinite(scores).all()
        assert torch.equal(entry, ref.row)
        assert len(index.search(q[:2], top_k=k, precision=precision)[0]) == k


# ── non-finite rows and entry maps ───────────────────────────────────────────────────


def test_non_finite_rows_are_refused_by_every_entry_point(tmp_path):
    emb = F.normalize(torch.randn(20, 8), dim=-1)
    for bad in (float("nan"), float("inf")):
        rows = emb.clone()
        rows[7, 3] = bad
        with pytest.raises(BankFormatError, match="row 7"):
            ContextualIndex({1: rows}, B.Entries.from_records(_meta(20)))
        with pytest.raises(BankFormatError, match="row 7"):
            search_banks(torch.randn(2, 8), [rows], [RowNorms.of(rows)], 3)
    # a bank directory with a NaN row written behind the index's back
    ContextualIndex.from_tensors({1: emb}, _meta(20), dtype=torch.float32).save(tmp_path)
    rows, entry = B.read_layer(tmp_path, 1)
    rows[7, 3] = float("nan")
    B.write_layer(tmp_path, 1, rows, entry, B.read_manifest(tmp_path)["bank_id"])
    for load in (
        lambda: ContextualIndex.from_directory(tmp_path),
        lambda: DistributedIndex(tmp_path),
        lambda: MultiDeviceIndex(tmp_path, devices=["cpu", "cpu"]),
    ):
        with pytest.raises(BankFormatError, match="NaN or inf"):
            load()


def test_entry_maps_outside_the_table_are_refused_everywhere(tmp_path):
    emb = F.normalize(torch.randn(6, 8), dim=-1)
    entries = B.Entries.from_records(_meta(6))
    for bad in (torch.tensor([0, 1, 2, 3, 4, -1]), torch.tensor([0, 1, 2, 3, 4, 6])):
        with pytest.raises(BankFormatError, match="outside the entry table"):
            ContextualIndex({1: emb}, entries, entry_index={1: bad})
    ContextualIndex({1: emb}, entries).save(tmp_path)
    B.write_layer(
        tmp_path, 1, emb, torch.tensor([0, 1, 2, 3, 4, -1]), B.read_manifest(tmp_path)["bank_id"]
    )
    for load in (lambda: DistributedIndex(tmp_path), lambda: MultiDeviceIndex(tmp_path, ["cpu"])):
        with pytest.raises(BankFormatError, match="outside the entry table"):
            load()


def test_embedding_lens_skips_non_finite_rows():
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[10] = float("nan")
        w[11] = float("inf")
        h = w[12].clone()
    lens = EmbeddingLens(model, tok, top_k=3, original=True)
    _, ids = lens.topk(h[None])
    assert ids[0, 0].item() == 12 and not {10, 11} & set(ids[0].tolist())


# ── zero queries ─────────────────────────────────────────────────────────────────────


def test_zero_query_gets_an_empty_result_and_the_batch_is_unharmed(tmp_path):
    emb = F.normalize(torch.randn(50, 8), dim=-1)
    index = ContextualIndex.from_tensors({1: emb, 2: emb.flip(0)}, _meta(50))
    q = torch.randn(4, 8)
    q[2] = 0
    got = index.search(q, top_k=3)
    assert got[2] == [] and [len(r) for r in got] == [3, 3, 0, 3]
    alone = index.search(q[[0, 1, 3]], top_k=3)
    assert [got[i] for i in (0, 1, 3)] == alone
    scores, layer, entry = index.search_tensors(q, top_k=3)
    assert torch.isnan(scores[2]).all() and (layer[2] == -1).all() and (entry[2] == -1).all()
    index.save(tmp_path)
    for sharded in (DistributedIndex(tmp_path), MultiDeviceIndex(tmp_path, ["cpu", "cpu"])):
        res = sharded.search(q, top_k=3)
        assert res[2] == [] and [res[i] for i in (0, 1, 3)] == [got[i] for i in (0, 1, 3)]
    lens = EmbeddingLens(tiny_causal_lm("llama"), tiny_tokenizer(), top_k=3)
    preds = lens.predict(torch.cat([torch.zeros(1, 32), torch.randn(1, 32)]))
    assert preds[0] == [] and len(preds[1]) == 3


# ── interrupted writes ───────────────────────────────────────────────────────────────


def test_interrupted_save_over_a_bank_never_loads_as_complete(tmp_path, monkeypatch):
    old = ContextualIndex.from_tensors({1: torch.randn(10, 8), 2: torch.randn(10, 8)}, _meta(10))
    old.save(tmp_path)
    new = ContextualIndex.from_tensors({1: torch.randn(30, 8), 2: torch.randn(30, 8)}, _meta(30))
    real, calls = B.write_layer, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between the two layer files
        return real(*args, **kwargs)

    monkeypatch.setattr(B, "write_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    with pytest.raises(BankFormatError):
        ContextualIndex.from_directory(tmp_path)


def test_files_of_another_write_are_detected(tmp_path):
    a = ContextualIndex.from_tensors({1: torch.randn(10, 8)}, _meta(10))
    b = ContextualIndex.from_tensors({1: torch.randn(10, 8)}, _meta(10))
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    # b's layer beside a's manifest and entries: same shapes, other rows
    (tmp_path / "a" / C.LAYER_FILE.format(layer=1)).write_bytes(
        (tmp_path / "b" / C.LAYER_FILE.format(layer=1)).read_bytes()
    )
    with pytest.raises(BankFormatError, match="another write"):
        ContextualIndex.from_directory(tmp_path / "a")
    with pytest.raises(BankFormatError, match="another write"):
        DistributedIndex(tmp_path / "a")


def test_interrupted_rebuild_never_loads_as_complete(tmp_path, monkeypatch):
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    kw = dict(model=model, tokenizer=tok, show_progress=False, layers=[1])
    build_index(None, SENTENCES[:4], output_dir=tmp_path, **kw)
    assert ContextualIndex.from_directory(tmp_path)

    def crash(self, shard, bar):
        raise RuntimeError("killed")

    monkeypatch.setattr(_Builder, "_run_shard", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(None, SENTENCES, output_dir=tmp_path, **kw)
    with pytest.raises(BankFormatError):
        ContextualIndex.from_directory(tmp_path)


# ── resume fingerprint and temporary files ──────────────────────────────────────────


def _build(root, model, **extra):
    kw = dict(layers=[1, 2], model=model, tokenizer=tiny_tokenizer(), show_progress=False)
    kw.update(extra)
    return build_index(None, SENTENCES, output_dir=root, **kw)


def _interrupt_after_first_shard(monkeypatch):
    real, calls = _Builder._run_shard, {"n": 0}

    def flaky(self, shard, bar):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("interrupted")
        return real(self, shard, bar)

    monkeypatch.setattr(_Builder, "_run_shard", flaky)
    return real


def test_resume_with_another_shard_size_restarts_cleanly(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama")
    ref = _build(tmp_path / "ref", model, shard_sentences=3)
    real = _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        _build(tmp_path / "b", model, shard_sentences=2)
    monkeypatch.setattr(_Builder, "_run_shard", real)
    got = _build(tmp_path / "b", model, shard_sentences=3)  # no "row written twice"
    for layer in (1, 2):
        assert torch.equal(got.embeddings(layer), ref.embeddings(layer))


def test_resume_with_other_weights_or_dtype_never_mixes(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama")
    real = _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        _build(tmp_path / "b", model, shard_sentences=2)
    monkeypatch.setattr(_Builder, "_run_shard", real)
    other = tiny_causal_lm("llama").to(torch.bfloat16)
    got = _build(tmp_path / "b", other, shard_sentences=2)
    ref = _build(tmp_path / "ref", other, shard_sentences=2)
    assert torch.equal(got.embeddings(1), ref.embeddings(1))


def test_no_temporary_files_survive_a_resume(tmp_path, monkeypatch):
    model = tiny_causal_lm("llama")
    real = _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        _build(tmp_path, model, shard_sentences=2)
    # what a kill -9 inside atomic_path leaves behind
    (tmp_path / ".build" / ".shard_00001.safetensors.abc123.tmp").write_bytes(b"x" * 1000)
    (tmp_path / ".layer_01.safetensors.def456.tmp").write_bytes(b"x" * 1000)
    monkeypatch.setattr(_Builder, "_run_shard", real)
    _build(tmp_path, model, shard_sentences=2)
    assert not list(tmp_path.rglob("*.tmp"))


# ── legacy files, corpus, ids, Hub ──────────────────────────────────────────────────


def test_legacy_file_that_inflates_is_refused_before_loading(tmp_path):
    layer = tmp_path / "layer_3"
    layer.mkdir()
    path = layer / "embeddings_cache.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(50 * 2**20))  # 50 MiB of zeros, ~50 KiB packed
    assert path.stat().st_size < 2**20
    with pytest.raises(BankFormatError, match="uncompressed"):
        ContextualIndex.from_directory(tmp_path)


def test_txt_corpus_splits_on_newlines_only(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("one\u2028still one\r\ntwo\x0cstill two\n\x85three\n".encode())
    assert load_corpus(path) == ["one\u2028still one", "two\x0cstill two", "three"]


def test_negative_caption_ids_are_refused(tmp_path):
    ContextualIndex.from_tensors({1: torch.randn(4, 8)}, _meta(4)).save(tmp_path)
    entries = B.read_entries(tmp_path)
    bad = B.Entries(
        entries.token_id,
        torch.tensor([0, -1, 2, 3]),
        entries.position,
        entries.captions,
        entries.token_strs,
    )
    B.write_entries(tmp_path, bad, B.read_manifest(tmp_path)["bank_id"])
    with pytest.raises(BankFormatError, match="negative caption_id"):
        ContextualIndex.from_directory(tmp_path)


def test_missing_hub_layer_offline_is_named(tmp_path, monkeypatch):
    ContextualIndex.from_tensors({4: torch.randn(5, 8), 8: torch.randn(5, 8)}, _meta(5)).save(
        tmp_path / "bank"
    )
    files = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()}
    del files[C.LAYER_FILE.format(layer=8)]
    fake_hub_repo(tmp_path / "hub", "org/bank", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LayerNotFoundError, match=r"layer 8 of org/bank .*offline"):
        ContextualIndex.from_pretrained("org/bank", layers=[4, 8], cache_dir=tmp_path / "hub")


def test_exact_scoring_disables_tf32_and_restores_it():
    from latentlens.search.scan import _full_precision_reductions

    m = torch.backends.cuda.matmul
    before = m.allow_tf32
    m.allow_tf32 = True
    try:
        with _full_precision_reductions(torch.device("cuda")):
            assert m.allow_tf32 is False
            assert m.allow_fp16_reduced_precision_reduction is False
        assert m.allow_tf32 is True
    finally:
        m.allow_tf32 = before
