"""ContextualIndex: search, save/load, legacy reading, Hub loading, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from latentlens import BankFormatError, ContextualIndex, LayerNotFoundError, Neighbor
from latentlens import constants as C
from latentlens.search import brute_force


def make_meta(n: int) -> list[dict]:
    return [
        {
            "token_str": f" w{i % 37}",
            "token_id": i % 37,
            "caption": f"caption {i // 3}",
            "position": i % 3 + 2,
        }
        for i in range(n)
    ]


@pytest.fixture
def index() -> ContextualIndex:
    layers = {1: torch.randn(120, 32), 4: torch.randn(120, 32) * 5, 8: torch.randn(120, 32)}
    return ContextualIndex.from_tensors(layers, make_meta(120), model_name="tiny")


def test_search_matches_brute_force_with_metadata(index):
    q = torch.randn(6, 32)
    got = index.search(q, top_k=5)
    layers = index.available_layers
    ref = brute_force(q, [index.embeddings(x) for x in layers], 5)
    meta = make_meta(120)
    for i in range(6):
        assert len(got[i]) == 5
        for j, nb in enumerate(got[i]):
            assert isinstance(nb, Neighbor)
            row = int(ref.row[i, j])
            assert nb.contextual_layer == layers[int(ref.bank[i, j])]
            assert nb.token_str == meta[row]["token_str"]
            assert nb.caption == meta[row]["caption"]
            assert nb.position == meta[row]["position"]
            assert nb.token_id == meta[row]["token_id"]
            assert nb.similarity == pytest.approx(float(ref.scores[i, j]), abs=1e-6)
        sims = [n.similarity for n in got[i]]
        assert sims == sorted(sims, reverse=True)


def test_layer_subset_and_single_vector(index):
    q = torch.randn(32, dtype=torch.float64)
    got = index.search(q, top_k=3, layers=[4])
    assert len(got) == 1 and {n.contextual_layer for n in got[0]} == {4}
    scores, layer, entry = index.search_tensors(q[None].half(), top_k=200)
    assert scores.shape == (1, 200) and layer.dtype == torch.int64 and entry.max() < 120
    with pytest.raises(LayerNotFoundError, match=r"available: \[1, 4, 8\]"):
        index.search(q, layers=[2])


def test_properties_and_repr(index):
    assert index.available_layers == [1, 4, 8]
    assert index.hidden_dim == 32 and len(index) == 360
    assert index.dtype == torch.float16 and index.device.type == "cpu"
    assert "hidden_dim=32" in repr(index) and "tiny" in repr(index)
    assert index.to("cpu") is index


def test_rows_are_stored_normalised_fp16(index):
    emb = index.embeddings(4)
    assert emb.dtype == torch.float16
    assert torch.allclose(emb.float().norm(dim=1), torch.ones(120), atol=2e-3)


def test_save_load_round_trip(index, tmp_path):
    index.save(tmp_path / "bank")
    files = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert files == sorted(
        [C.CONFIG_FILE, C.LEGACY_META_FILE, C.ENTRIES_FILE, C.CAPTIONS_FILE, C.TOKENS_FILE]
        + [C.STATS_FILE]
        + [C.LAYER_FILE.format(layer=x) for x in (1, 4, 8)]
    )
    assert json.loads((tmp_path / "bank" / C.LEGACY_META_FILE).read_text()) == {
        "layers": [1, 4, 8],
        "hidden_dim": 32,
    }
    manifest = json.loads((tmp_path / "bank" / C.CONFIG_FILE).read_text())
    assert manifest["hidden_dim"] == 32 and manifest["layers"] == [1, 4, 8]
    assert manifest["dtype"] == "float16" and manifest["num_entries"] == 120
    loaded = ContextualIndex.from_directory(tmp_path / "bank")
    for x in (1, 4, 8):
        assert torch.equal(loaded.embeddings(x), index.embeddings(x))
    q = torch.randn(4, 32)
    assert loaded.search(q) == index.search(q)
    part = ContextualIndex.from_directory(tmp_path / "bank", layers=[8], dtype="float32")
    assert part.available_layers == [8] and part.dtype == torch.float32


def test_loading_one_layer_reads_only_its_file(index, tmp_path):
    index.save(tmp_path / "b")
    (tmp_path / "b" / C.LAYER_FILE.format(layer=1)).write_bytes(b"garbage")
    assert ContextualIndex.from_directory(tmp_path / "b", layers=[4, 8]).available_layers == [4, 8]
    with pytest.raises(BankFormatError, match="layer_01"):
        ContextualIndex.from_directory(tmp_path / "b", layers=[1])


def test_fp8_and_bf16_storage(tmp_path):
    layers = {2: torch.randn(50, 16) * 100}
    for dt in ("float8_e4m3fn", "bfloat16"):
        idx = ContextualIndex.from_tensors(layers, make_meta(50), dtype=dt, normalize=False)
        idx.save(tmp_path / dt)
        back = ContextualIndex.from_directory(tmp_path / dt)
        assert back.dtype == getattr(torch, dt)
        q = torch.randn(3, 16)
        ref = brute_force(q, [back.embeddings(2)], 5)
        assert back.search_rows(q)[2].tolist() == ref.row.tolist()
    assert (
        float(
            ContextualIndex.from_tensors(layers, make_meta(50), dtype="fp8", normalize=False)
            .embeddings(2)
            .float()
            .abs()
            .max()
        )
        <= 448
    )


def test_bad_directories(tmp_path, index):
    with pytest.raises(BankFormatError, match="does not exist"):
        ContextualIndex.from_directory(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankFormatError, match="config.json"):
        ContextualIndex.from_directory(tmp_path / "empty")
    index.save(tmp_path / "b")
    cfg = tmp_path / "b" / C.CONFIG_FILE
    cfg.write_text("{not json")
    with pytest.raises(BankFormatError, match="not valid JSON"):
        ContextualIndex.from_directory(tmp_path / "b")
    index.save(tmp_path / "b")
    m = json.loads(cfg.read_text())
    m["format_version"] = "9.0"
    cfg.write_text(json.dumps(m))
    with pytest.raises(BankFormatError, match="newer"):
        ContextualIndex.from_directory(tmp_path / "b")
    index.save(tmp_path / "b")
    with pytest.raises(LayerNotFoundError, match="available"):
        ContextualIndex.from_directory(tmp_path / "b", layers=[5])
    (tmp_path / "b" / C.ENTRIES_FILE).unlink()
    with pytest.raises(BankFormatError, match="incomplete"):
        ContextualIndex.from_directory(tmp_path / "b")


def test_nan_rows_and_mismatched_shapes_are_refused():
    with pytest.raises(BankFormatError, match="NaN"):
        x = torch.randn(5, 4)
        x[2, 1] = float("nan")
        ContextualIndex.from_tensors({0: x}, make_meta(5), normalize=False)
    with pytest.raises(BankFormatError, match=r"expected \[5, d\]"):
        ContextualIndex.from_tensors({0: torch.randn(4, 4)}, make_meta(5))


# ── legacy layout ─────────────────────────────────────────────────────────────────────


def write_legacy(root: Path, layers: dict[int, torch.Tensor], metas: dict[int, list[dict]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.json").write_text(json.dumps({"layers": sorted(layers), "hidden_dim": 16}))
    for layer, emb in layers.items():
        (root / f"layer_{layer}").mkdir()
        torch.save(
            {"embeddings": emb, "metadata": metas[layer]},
            root / f"layer_{layer}" / "embeddings_cache.pt",
        )


def test_legacy_layout_is_read_and_converted(tmp_path):
    meta = make_meta(40)
    emb = {1: torch.randn(40, 16).half(), 2: torch.randn(30, 16)}
    write_legacy(tmp_path / "old", emb, {1: meta, 2: meta[10:]})
    idx = ContextualIndex.from_directory(tmp_path / "old")
    assert idx.available_layers == [1, 2] and len(idx.entries) == 40
    q = torch.randn(5, 16)
    got = idx.search(q, top_k=4)
    ref = brute_force(q, [emb[1], emb[2]], 4)
    for i in range(5):
        for j, nb in enumerate(got[i]):
            layer = [1, 2][int(ref.bank[i, j])]
            row = int(ref.row[i, j]) + (10 if layer == 2 else 0)
            assert (nb.contextual_layer, nb.caption, nb.position) == (
                layer,
                meta[row]["caption"],
                meta[row]["position"],
            )
    idx.save(tmp_path / "new")
    again = ContextualIndex.from_directory(tmp_path / "new")
    assert again.search(q, top_k=4) == got


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "evil"
    (root / "layer_3").mkdir(parents=True)
    with open(root / "layer_3" / "embeddings_cache.pt", "wb") as f:
        pickle.dump({"embeddings": _Evil(), "metadata": []}, f)
    with pytest.raises(BankFormatError, match="refusing to load"):
        ContextualIndex.from_directory(root)
    assert not (tmp_path / "PWNED_MARKER").exists()


# ── Hugging Face Hub (fake offline cache) ─────────────────────────────────────────────


def fake_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay out files the way huggingface_hub's cache stores a snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_from_pretrained_offline_downloads_only_requested_layers(index, tmp_path, monkeypatch):
    index.save(tmp_path / "bank")
    files = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()}
    del files[C.LAYER_FILE.format(layer=1)]  # not in the cache: must not be needed
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "org/bank", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = ContextualIndex.from_pretrained("org/bank", layers=[4, 8], cache_dir=cache)
    assert got.available_layers == [4, 8]
    q = torch.randn(3, 32)
    assert got.search(q) == index.search(q, layers=[4, 8])
    with pytest.raises(Exception, match="layer_01|LocalEntryNotFound|cannot find|offline"):
        ContextualIndex.from_pretrained("org/bank", layers=[1], cache_dir=cache)


def test_from_pretrained_reads_legacy_hub_layout(tmp_path, monkeypatch):
    meta = make_meta(20)
    write_legacy(tmp_path / "old", {5: torch.randn(20, 16)}, {5: meta})
    files = {
        "metadata.json": (tmp_path / "old" / "metadata.json").read_bytes(),
        "layer_5/embeddings_cache.pt": (
            tmp_path / "old" / "layer_5" / "embeddings_cache.pt"
        ).read_bytes(),
    }
    fake_hub_repo(tmp_path / "hub", "McGill-NLP/latentlens-qwen2vl-embeddings", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    idx = ContextualIndex.from_pretrained(
        "McGill-NLP/latentlens-qwen2vl-embeddings", cache_dir=tmp_path / "hub"
    )
    assert idx.available_layers == [5] and len(idx.entries) == 20


def test_atomic_writes_make_ordinary_files(tmp_path):
    from latentlens.atomic import write_json

    write_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32]
)
def test_layer_writer_places_rows_in_any_order(tmp_path, dtype):
    from latentlens.bank import LayerWriter, read_layer

    x = (torch.randn(50, 8) * 4).to(dtype)
    perm = torch.randperm(50)
    with LayerWriter(tmp_path, 3, 50, 8, dtype) as w:
        w.put(perm[:20], x[perm[:20]])
        w.put(perm[20:], x[perm[20:]])
    got, entry = read_layer(tmp_path, 3)
    assert (
        entry is None
        and got.dtype == dtype
        and torch.equal(got.view(torch.uint8), x.view(torch.uint8))
    )
    with (
        pytest.raises(BankFormatError, match="never written"),
        LayerWriter(tmp_path, 4, 5, 8, dtype) as w,
    ):
        w.put(torch.tensor([0, 1]), x[:2])
    assert not (tmp_path / "layer_04.safetensors").exists()
    with pytest.raises(ValueError, match="twice"), LayerWriter(tmp_path, 5, 5, 8, dtype) as w:
        w.put(torch.tensor([0, 1]), x[:2])
        w.put(torch.tensor([1]), x[:1])
