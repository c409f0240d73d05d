"""Explaining any vector: SAE decoder rows (SAELens' artefact layout), steering vectors, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from latentlens.cli import main
from latentlens.errors import DimensionMismatchError, InvalidQueryError, LatentLensError
from latentlens.extract import build_index
from latentlens.search import brute_force
from latentlens.vectors import load_vectors
from tests.tiny import SENTENCES, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    out = tmp_path_factory.mktemp("vec") / "bank"
    index = build_index("tiny", SENTENCES, layers=[1, 2], model=tiny_causal_lm("llama"),
                        tokenizer=tiny_tokenizer(), show_progress=False, output_dir=out)  # fmt: skip
    return out, index


def unique_rows(rows: torch.Tensor, n: int) -> list[int]:
    """Rows whose direction no other row shares (so their own entry must come first)."""
    x = torch.nn.functional.normalize(rows.double(), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-2)
    return [i for i in range(rows.shape[0]) if float(sims[i].max()) < 1 - 1e-6][:n]


def write_sae(folder, w_dec: torch.Tensor) -> None:
    """A sparse autoencoder in SAELens' artefact layout (cfg.json + sae_weights.safetensors)."""
    folder.mkdir()
    d_sae, d_in = w_dec.shape
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae,
           "hook_name": "blocks.1.hook_resid_post", "dtype": "float32"}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec.contiguous(),
         "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)},
        str(folder / "sae_weights.safetensors"),
    )  # fmt: skip


def test_sae_features_that_are_bank_rows_find_their_own_context(bank, tmp_path):
    root, index = bank
    rows = index.embeddings(2)
    own = unique_rows(rows, 4)
    g = torch.Generator().manual_seed(3)
    w_dec = torch.cat([rows[own].float() * 3.0, torch.randn(3, rows.shape[1], generator=g),
                       torch.zeros(1, rows.shape[1])])  # fmt: skip
    write_sae(tmp_path / "sae", w_dec)
    args = ["explain-vectors", str(root), str(tmp_path / "sae"), "--layer", "2", "--top-k", "3",
            "--json", str(tmp_path / "v.json"), "--html", str(tmp_path / "v.html")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "feature 0" in r.output and "zero vector" in r.output
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["layers"] == [2] and len(doc["vectors"]) == w_dec.shape[0]
    assert "SAE decoder W_dec" in doc["source"]
    entries = index.entries
    for f, row in enumerate(own):
        top = doc["vectors"][f]["neighbors"][0]
        rec = entries.record(row)
        assert (top["caption"], top["position"], top["token_id"]) == (
            rec["caption"], rec["position"], rec["token_id"],
        )  # fmt: skip
        assert top["similarity"] == pytest.approx(1.0, abs=1e-6)
        assert top["contextual_layer"] == 2 and "char_span" in top
    # the random features: the fp64 brute force over the layer's rows
    want = brute_force(w_dec[len(own) : len(own) + 3], [rows], 3)
    for j in range(3):
        got = doc["vectors"][len(own) + j]["neighbors"]
        assert [n["caption"] for n in got] == [
            entries.record(int(i))["caption"] for i in want.row[j]
        ]
        assert [n["similarity"] for n in got] == pytest.approx(want.scores[j].tolist(), abs=1e-6)
    assert doc["vectors"][-1]["neighbors"] == [] and doc["vectors"][-1]["norm"] == 0
    page = (tmp_path / "v.html").read_text()
    assert page.count('<section class="vec"') == w_dec.shape[0] and "<mark>" in page
    # a few features only
    r = CliRunner().invoke(main, [*args[:5], "--features", "1,0", "-q", "--json",
                                  str(tmp_path / "two.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    two = json.loads((tmp_path / "two.json").read_text())["vectors"]
    assert [v["name"] for v in two] == ["feature 1", "feature 0"]


def test_library_explain_vectors_equals_search(bank):
    _, index = bank
    v = torch.randn(5, index.hidden_dim)
    items = index.explain_vectors(v, top_k=4, layers=[1])
    assert [it.name for it in items] == [f"vector {i}" for i in range(5)]
    assert [[n.caption for n in it.neighbors] for it in items] == [
        [n.caption for n in nbs] for nbs in index.search(v, 4, [1])
    ]
    steer = index.explain_vectors(v[0], top_k=2)  # one steering vector [d]
    assert len(steer) == 1 and steer[0].norm == pytest.approx(float(v[0].norm()), rel=1e-6)


def test_vector_files_of_every_kind_and_their_errors(bank, tmp_path):
    _, index = bank
    d = index.hidden_dim
    v = torch.randn(3, d)
    np.save(tmp_path / "v.npy", v.numpy())
    assert torch.equal(load_vectors(tmp_path / "v.npy").vectors, v)
    save_file({"steer": v[0]}, str(tmp_path / "one.safetensors"))
    assert load_vectors(tmp_path / "one.safetensors").vectors.shape == (1, d)
    save_file({"a": v, "b": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(LatentLensError, match="--key"):
        load_vectors(tmp_path / "two.safetensors")
    assert load_vectors(tmp_path / "two.safetensors", key="b").source.endswith(":b")
    torch.save({"direction": v[1]}, tmp_path / "d.pt")
    assert torch.equal(load_vectors(tmp_path / "d.pt").vectors[0], v[1])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LatentLensError, match="refusing"):
        load_vectors(tmp_path / "evil.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LatentLensError, match="npy"):
        load_vectors(tmp_path / "obj.npy")
    bad = v.clone()
    bad[1, 0] = float("nan")
    save_file({"w": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(InvalidQueryError, match="vector 1"):
        load_vectors(tmp_path / "nan.safetensors")
    with pytest.raises(DimensionMismatchError):
        index.explain_vectors(torch.randn(2, d + 1))
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_in": d + 4}))
    save_file({"W_dec": v}, str(tmp_path / "sae" / "sae_weights.safetensors"))
    with pytest.raises(LatentLensError, match="d_in"):
        load_vectors(tmp_path / "sae")
    with pytest.raises(InvalidQueryError, match="outside"):
        load_vectors(tmp_path / "v.npy").select([7])
    r = CliRunner().invoke(main, ["explain-vectors", str(tmp_path), str(tmp_path / "v.npy")])
    assert r.exit_code == 1 and "Error:" in r.output
