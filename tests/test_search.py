"""The search engine against an independent float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentlens.errors import DimensionMismatchError, InvalidQueryError
from latentlens.search import (
    RowNorms,
    compute_dtype,
    error_bound,
    search_banks,
)


def reference(queries: torch.Tensor, banks: list[torch.Tensor], k: int):
    """numpy fp64: cosine of every (query, row), sorted by (score desc, bank asc, row asc)."""
    q = queries.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for qi in q:
        cands = []
        for b, bank in enumerate(banks):
            x = bank.double().numpy()
            n = np.linalg.norm(x, axis=1)
            s = (x @ qi) / np.where(n == 0, 1.0, n)
            cands += [(-float(v), b, r) for r, v in enumerate(s)]
        cands.sort()
        out.append(cands[:k])
    return out


def assert_same(hits, ref, tol=1e-12):
    assert hits.scores.shape[0] == len(ref)
    for i, expected in enumerate(ref):
        assert hits.scores.shape[1] == len(expected)
        got = list(zip((-hits.scores[i]).tolist(), hits.bank[i].tolist(), hits.row[i].tolist()))
        for (gs, gb, gr), (es, eb, er) in zip(got, expected):
            assert abs(gs - es) <= tol
            assert (gb, gr) == (eb, er), f"query {i}: got {(gb, gr)} want {(eb, er)}"


def unit(n: int, d: int, dtype=torch.float16) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(dtype)


def run(q, banks, k, **kw):
    return search_banks(q, banks, [RowNorms.of(b) for b in banks], k, **kw)


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_random_banks_match_fp64(precision, dtype):
    banks = [unit(n, 48, torch.float32).mul(3).to(dtype) for n in (700, 5, 1300)]
    q = torch.randn(9, 48)
    # tiny chunks so the running top-k crosses many chunk borders
    hits = run(q, banks, 7, precision=precision, chunk_bytes=48 * 4 * 256)
    assert_same(hits, reference(q, banks, 7))


@pytest.mark.parametrize("k", [1, 4, 50])
def test_single_query_and_topk_larger_than_layer(k):
    banks = [unit(3, 16), unit(40, 16)]
    q = torch.randn(16)
    hits = run(q, banks, k)
    assert hits.scores.shape == (1, min(k, 43))
    assert_same(hits, reference(q[None], banks, k))


def test_duplicates_and_ties_are_ordered_by_bank_then_row():
    base = unit(50, 32)
    dup = torch.cat([base[:10], base[:10], base[10:]])  # rows 0-9 repeated at 10-19
    banks = [dup, dup.clone()]
    q = base[3].float()[None]
    hits = run(q, banks, 6, precision="fast")
    assert_same(hits, reference(q, banks, 6))
    assert hits.bank[0, :4].tolist() == [0, 0, 1, 1]
    assert hits.row[0, :4].tolist() == [3, 13, 3, 13]


def test_near_ties_within_error_bound_are_resolved_exactly():
    """Many rows sit within the fast pass's error bound of the k-th score."""
    d = 64
    anchor = torch.nn.functional.normalize(torch.randn(d), dim=0)
    noise = torch.nn.functional.normalize(torch.randn(400, d), dim=1)
    rows = torch.nn.functional.normalize(anchor + 1e-3 * noise, dim=1)  # cos ≈ 1 - 5e-7
    far = unit(3000, d, torch.float32)
    bank = torch.cat([far[:1500], rows, far[1500:]]).to(torch.float32)
    eps = error_bound(d, bank.dtype, torch.bfloat16)
    assert eps > 1e-3  # the bf16 bound is far wider than the spread of the near-ties
    q = anchor[None]
    hits = run(q, [bank], 10, precision="fast", chunk_bytes=d * 4 * 256)
    assert_same(hits, reference(q, [bank], 10))


def test_raw_unnormalised_rows_are_ranked_by_cosine():
    bank = torch.randn(500, 32) * torch.rand(500, 1) * 300  # paper-mode style raw rows
    bank[7] = 0  # a zero row scores 0
    q = torch.randn(4, 32)
    fp8 = bank.clamp(-448, 448).to(torch.float8_e4m3fn)
    for b in (bank, bank.half(), fp8):
        assert_same(run(q, [b], 5), reference(q, [b], 5))


def test_query_dtypes_and_batches_agree():
    banks = [unit(300, 24)]
    q = torch.randn(70, 24)
    a = run(q, banks, 5)
    b = run(q.half(), banks, 5, query_block=16)
    assert torch.equal(a.row, b.row) or torch.allclose(a.scores, b.scores, atol=1e-3)
    c = run(q, banks, 5, query_block=7)
    assert torch.equal(a.row, c.row) and torch.equal(a.scores, c.scores)


def test_bad_queries_raise_clear_errors():
    banks = [unit(10, 8)]
    with pytest.raises(DimensionMismatchError, match="width 9 .* hidden size 8"):
        run(torch.randn(2, 9), banks, 3)
    q = torch.randn(3, 8)
    q[1, 2] = float("nan")
    with pytest.raises(InvalidQueryError, match="query 1 contains NaN"):
        run(q, banks, 3)
    with pytest.raises(InvalidQueryError, match="zero vector"):
        run(torch.zeros(1, 8), banks, 3)
    with pytest.raises(InvalidQueryError, match=r"no queries"):
        run(torch.zeros(0, 8), banks, 3)
    with pytest.raises(InvalidQueryError, match="no banks"):
        search_banks(torch.randn(8), [], [], 3)


def test_compute_dtype_policy():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float16, "exact") == torch.float32
    assert compute_dtype(torch.device("cuda"), torch.float16, "fast") == torch.float16
    assert compute_dtype(torch.device("cuda"), torch.float16, "fast", max_norm=1e5) == torch.bfloat16
    assert compute_dtype(torch.device("cuda"), torch.float8_e4m3fn, "auto") == torch.float16
    with pytest.raises(ValueError, match="precision"):
        compute_dtype(cpu, torch.float16, "fastest")  # type: ignore[arg-type]
    # the bound shrinks with precision and grows with d
    assert error_bound(64, torch.float16, torch.float32) < error_bound(64, torch.float16, torch.bfloat16)
    assert error_bound(4096, torch.float32, torch.float32) > error_bound(64, torch.float32, torch.float32)


def test_error_bound_holds_empirically():
    d = 256
    bank = unit(2000, d, torch.float16)
    q = torch.nn.functional.normalize(torch.randn(50, d, dtype=torch.float64), dim=1)
    exact = q @ bank.double().T
    for compute in (torch.float32, torch.bfloat16):
        fast = (q.to(compute) @ bank.to(compute).T).double()
        assert (fast - exact).abs().max() <= error_bound(d, torch.float16, compute)
