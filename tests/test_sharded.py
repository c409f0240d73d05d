"""Sharded search (gloo, several processes; several devices in one process) equals one index."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentlens import ContextualIndex
from latentlens import distributed as D
from latentlens.sharded import DistributedIndex, MultiDeviceIndex, merge_candidates


def make_bank(root: Path) -> ContextualIndex:
    torch.manual_seed(3)
    n = 23
    meta = [
        {"token_str": f"t{i % 7}", "token_id": i % 7, "caption": f"c{i}", "position": i % 4}
        for i in range(n)
    ]
    base = torch.randn(n, 16)
    layers = {
        1: base.clone(),
        4: torch.randn(n, 16),
        9: base.clone(),
    }  # layer 9 = exact ties with 1
    layers[4][5] = layers[4][2]  # duplicate rows inside a layer
    index = ContextualIndex.from_tensors(layers, meta)
    index.save(root)
    return index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r: int, world: int, port: int, root: str, queries: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    try:
        idx = DistributedIndex(root)
        results = {}
        for name, q, k, layers in [
            ("many", queries, 5, None),
            ("one", queries[0], 3, None),
            ("big_k", queries[:4], 40, None),
            ("subset", queries, 6, [4, 9]),
        ]:
            results[name] = idx.search_rows(q, k, layers)
        results["local_rows"] = {x: int(s.rows.shape[0]) for x, s in idx.slices.items()}
        results["neighbors"] = idx.search(queries[:2], 3)
        torch.save(results, f"{out}.{r}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_search_equals_single_index(tmp_path, world):
    index = make_bank(tmp_path / "bank")
    queries = torch.randn(7, 16)
    queries[3] = index.embeddings(1)[6].float()  # a query whose best hits tie across layers 1/9
    mp.spawn(
        _worker,
        args=(world, free_port(), str(tmp_path / "bank"), queries, str(tmp_path / "res")),
        nprocs=world,
        join=True,
    )
    expected = {
        "many": index.search_rows(queries, 5),
        "one": index.search_rows(queries[0], 3),
        "big_k": index.search_rows(queries[:4], 40),
        "subset": index.search_rows(queries, 6, [4, 9]),
    }
    rows_seen = {1: 0, 4: 0, 9: 0}
    for r in range(world):
        got = torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False)
        for name, (s, lay, row) in expected.items():
            gs, gl, gr = got[name]
            assert torch.equal(gs, s), name  # exact fp64 scores
            assert torch.equal(gl, lay) and torch.equal(gr, row), name
        for x, n in got["local_rows"].items():
            rows_seen[x] += n
        assert got["neighbors"] == index.search(queries[:2], 3)
    assert rows_seen == {1: 23, 4: 23, 9: 23}  # the slices cover each layer exactly once
    assert expected["big_k"][0].shape == (4, 40)


def test_a_rank_with_an_empty_slice(tmp_path):
    meta = [{"token_str": "a", "token_id": 1, "caption": "x", "position": 0}] * 2
    index = ContextualIndex.from_tensors({0: torch.randn(2, 8)}, meta)
    index.save(tmp_path / "tiny")
    assert D.shard_range(2, 3, 2) == (2, 2)
    q = torch.randn(3, 8)
    mp.spawn(
        _tiny_worker,
        args=(3, free_port(), str(tmp_path / "tiny"), q, str(tmp_path / "r")),
        nprocs=3,
        join=True,
    )
    for r in range(3):
        s, lay, row = torch.load(f"{tmp_path / 'r'}.{r}", weights_only=False)
        es, el, er = index.search_rows(q, 5)
        assert torch.equal(s, es) and torch.equal(row, er) and s.shape == (3, 2)


def _tiny_worker(r: int, world: int, port: int, root: str, q: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    try:
        torch.save(DistributedIndex(root).search_rows(q, 5), f"{out}.{r}")
    finally:
        dist.destroy_process_group()


def test_multi_device_single_process(tmp_path):
    index = make_bank(tmp_path / "bank")
    queries = torch.randn(5, 16)
    multi = MultiDeviceIndex(tmp_path / "bank", devices=["cpu", "cpu", "cpu", "cpu"])
    assert [int(s[1].rows.shape[0]) for s in multi.shards] == [6, 6, 6, 5]
    for k in (1, 5, 70):
        got = multi.search_rows(queries, k)
        want = index.search_rows(queries, k)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert multi.search(queries, 4, layers=[4]) == index.search(queries, 4, layers=[4])


def test_single_process_distributed_index_is_the_whole_bank(tmp_path):
    index = make_bank(tmp_path / "bank")
    q = torch.randn(4, 16)
    got = DistributedIndex(tmp_path / "bank").search_rows(q, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, index.search_rows(q, 5)))


def test_merge_candidates_order_and_padding():
    s = torch.tensor([[0.5, 0.9, 0.5, float("-inf")]], dtype=torch.float64)
    lay = torch.tensor([[4, 1, 1, -1]])
    row = torch.tensor([[0, 7, 3, -1]])
    gs, gl, gr = merge_candidates(s, lay, row, 10)
    assert gl.tolist() == [[1, 1, 4]] and gr.tolist() == [[7, 3, 0]] and gs.shape == (1, 3)


def test_shard_helpers():
    assert [D.shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert D.shard(list(range(7)), 3, 1) == [1, 4]
    assert D.world_size() == 1 and D.rank() == 0 and D.gather_objects(5) == [5]


# ── data-parallel build ───────────────────────────────────────────────────────────────


def _build_worker(r: int, world: int, port: int, out: str, crash_rank: int) -> None:
    import os

    from latentlens.extract import _Builder, build_index
    from tests.test_extract import CORPUS
    from tests.tiny import tiny_causal_lm, tiny_tokenizer

    torch.set_num_threads(1)  # same threads as the reference build: bitwise-equal floats
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    real = _Builder._write_shard
    written = {"n": 0}

    def write(self, path, part):
        real(self, path, part)
        written["n"] += 1
        if r == crash_rank and written["n"] == 2:
            os._exit(1)  # killed mid-build, after two of its shards

    _Builder._write_shard = write  # type: ignore[method-assign]
    try:
        index = build_index(
            None,
            CORPUS,
            layers=[1, 2],
            model=tiny_causal_lm("llama"),
            tokenizer=tiny_tokenizer(),
            show_progress=False,
            shard_sentences=1,
            batch_size=2,
            output_dir=out,
        )
        torch.save({"n_written": written["n"], "rows": len(index)}, f"{out}.rank{r}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_distributed_build_equals_single_process_and_survives_a_dead_rank(tmp_path):
    from latentlens.extract import build_index
    from tests.test_extract import CORPUS
    from tests.tiny import tiny_causal_lm, tiny_tokenizer

    out = str(tmp_path / "bank")
    # rank 1 dies (or rank 0 fails first on the broken connection); written shards stay
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        mp.spawn(_build_worker, args=(2, free_port(), out, 1), nprocs=2, join=True)
    before = sorted(p.name for p in (tmp_path / "bank" / ".build").glob("shard_*"))
    assert len(before) >= 2
    mp.spawn(_build_worker, args=(2, free_port(), out, -1), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = build_index(
            None,
            CORPUS,
            layers=[1, 2],
            model=tiny_causal_lm("llama"),
            tokenizer=tiny_tokenizer(),
            show_progress=False,
            shard_sentences=1,
            batch_size=2,
        )
    finally:
        torch.set_num_threads(threads)
    got = ContextualIndex.from_directory(out)
    for layer in (1, 2):
        assert torch.equal(got.embeddings(layer), ref.embeddings(layer))
    assert torch.equal(got.entries.token_id, ref.entries.token_id)
    assert got.entries.captions == ref.entries.captions
    counts = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    total_shards = len(ref.entries.captions)  # one sentence per shard
    assert sum(c["n_written"] for c in counts) == total_shards - len(before)  # nothing redone
    assert all(c["rows"] == len(ref) for c in counts)
