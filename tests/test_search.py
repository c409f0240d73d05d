"""The search engine against an independent float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentlens.search as search_mod
import latentlens.search.precision as precision_mod
import latentlens.search.scan as scan_mod
from latentlens.errors import DimensionMismatchError, InvalidQueryError
from latentlens.search import (
    DEFAULT_CHUNK_BYTES,
    FastBound,
    RowNorms,
    SearchHits,
    brute_force,
    compute_dtype,
    error_bound,
    fast_pass,
    fast_scores,
    prepare_queries,
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
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adversarial_near_ties_many_queries_buffer_flushes(dtype, monkeypatch):
    """Hundreds of candidates per query inside the band, spread over many chunks; a tiny
    candidate buffer forces early exact re-ranks between chunks."""
    d, nq = 96, 12
    anchors = torch.nn.functional.normalize(torch.randn(nq, d), dim=1)
    near = anchors.repeat_interleave(150, 0) + 2e-3 * torch.randn(nq * 150, d)
    bank = torch.cat([near, torch.randn(4000, d)])
    bank = torch.nn.functional.normalize(bank[torch.randperm(bank.shape[0])], dim=1).to(dtype)
    q = anchors + 1e-3 * torch.randn(nq, d)
    nrm = RowNorms.of(bank)
    q64 = prepare_queries(q, d)
    collected = fast_pass(q64, bank, nrm, 8)
    assert collected > nq * 100  # truly adversarial: far more candidates than k
    monkeypatch.setattr(search_mod, "_plan", _small_cap(search_mod._plan, cap=64))
    hits = run(q, [bank], 8, precision="fast", chunk_bytes=d * 2 * 512, query_block=5)
    assert_same(hits, reference(q, [bank], 8))


def _small_cap(plan_fn, cap):
    def wrapped(*a, **kw):
        plan, qf = plan_fn(*a, **kw)
        plan.cap = cap
        return plan, qf

    return wrapped


def test_massive_duplicates_take_the_dense_path_and_keep_row_order():
    """Every row ties: the fp64 pre-filter path runs and ties still go to the lower row."""
    d = 32
    base = unit(3, d)
    bank = base.repeat(700, 1)  # rows i, i+3, i+6, ... are identical
    banks = [bank, bank.clone()]
    q = torch.cat([base[1:2].float(), torch.randn(2, d)])
    hits = run(q, banks, 6, precision="fast", chunk_bytes=d * 2 * 512)
    assert_same(hits, reference(q, banks, 6))
    assert hits.row[0].tolist() == [1, 4, 7, 10, 13, 16]
    assert hits.bank[0].tolist() == [0] * 6


def test_many_queries_small_tiles_and_later_layers_use_earlier_thresholds():
    banks = [unit(2500, 40), unit(1700, 40, torch.bfloat16), unit(900, 40, torch.float32)]
    banks[2][5] = banks[0][7]  # an exact tie across layers: the lower layer wins
    q = torch.cat([banks[0][7:8].float(), torch.randn(60, 40)])
    for precision in ("fast", "exact"):
        hits = run(q, banks, 9, precision=precision, chunk_bytes=40 * 2 * 128, query_block=16)
        assert_same(hits, reference(q, banks, 9))
    assert (hits.bank[0, 0].item(), hits.row[0, 0].item()) == (0, 7)


def test_tiny_and_huge_row_norms_fall_back_to_fp64_scoring():
    bank = torch.randn(300, 16, dtype=torch.float64)
    bank[:100] *= 1e-30
    bank[100:200] *= 1e30
    nrm = RowNorms.of(bank)
    assert compute_dtype(torch.device("cpu"), bank.dtype, "fast", 1e31, 1e-29) == torch.float64
    q = torch.randn(5, 16)
    assert_same(search_banks(q, [bank], [nrm], 7), reference(q, [bank], 7))
    assert_same(run(q, [bank.float()], 7), reference(q, [bank.float()], 7))


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
    # a zero query has no cosine: an empty per-query result, the batch unharmed
    q = torch.randn(3, 8)
    q[1] = 0
    hits = run(q, banks, 3)
    assert torch.isnan(hits.scores[1]).all() and (hits.row[1] == -1).all()
    ref = brute_force(q[[0, 2]], banks, 3)
    assert torch.equal(hits.row[[0, 2]], ref.row)
    with pytest.raises(InvalidQueryError, match=r"no queries"):
        run(torch.zeros(0, 8), banks, 3)
    with pytest.raises(InvalidQueryError, match="no banks"):
        search_banks(torch.randn(8), [], [], 3)


def test_compute_dtype_policy():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float16, "exact") == torch.float32
    assert compute_dtype(torch.device("cuda"), torch.float16, "fast") == torch.float16
    assert (
        compute_dtype(torch.device("cuda"), torch.float16, "fast", max_norm=1e5) == torch.bfloat16
    )
    assert compute_dtype(torch.device("cuda"), torch.float8_e4m3fn, "fast") == torch.float16
    with pytest.raises(ValueError, match="precision"):
        compute_dtype(cpu, torch.float16, "fastest")  # type: ignore[arg-type]
    # the bound shrinks with precision and grows with d
    assert error_bound(64, torch.float16, torch.float32) < error_bound(
        64, torch.float16, torch.bfloat16
    )
    assert error_bound(4096, torch.float32, torch.float32) > error_bound(
        64, torch.float32, torch.float32
    )


@pytest.mark.parametrize("precision", ["fast", "exact"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn]
)
@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_fast_scores_stay_within_the_proven_bound(precision, dtype, scale):
    """|fast − exact| ≤ α_q + β|fast| for every pair, with the engine's own fast scores."""
    d = 256
    x = torch.randn(3000, d)
    if scale == "unit":
        x = torch.nn.functional.normalize(x, dim=1)
    else:
        x = x * torch.rand(3000, 1) * 20
    bank = x.clamp(-448, 448).to(dtype)
    q = torch.randn(40, d)
    q[0] = 0
    q[0, 3] = 1  # exactly representable query: e_q = 0
    q64 = prepare_queries(q, d)
    nrm = RowNorms.of(bank)
    fast, bound = fast_scores(q64, bank, nrm, precision=precision)
    x64 = bank.double()
    exact = x64 @ q64.T / nrm.norm[:, None]
    err = (fast.double() - exact).abs()
    allowed = bound.alpha[None, :] + bound.beta * fast.double().abs()
    assert bool((err <= allowed).all()), float((err - allowed).max())
    compute = compute_dtype(torch.device("cpu"), dtype, precision)
    if scale == "raw" or compute == torch.float32:
        assert bound.scaled  # rescaling by the fp32 inverse norm is part of the bound
    elif dtype in (torch.float16, torch.bfloat16):
        assert not bound.scaled  # unit rows: no rescaling pass, deviation folded into α
    if scale == "unit" and dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert err.max() <= error_bound(d, dtype, compute)
        # the per-query bound is tighter than the worst case, and not vacuous for bf16
        assert float(bound.alpha.max()) < error_bound(d, dtype, compute)
        if compute == torch.bfloat16:
            assert err.max() > float(bound.alpha.max() + bound.beta) / 10


def test_bound_thresholds_are_monotone_inverses():
    b = FastBound(torch.tensor([1e-3, 2e-3], dtype=torch.float64), 2.0**-8, True)
    f = torch.tensor([0.8, -0.3], dtype=torch.float64)
    low = b.lower(f)
    t = b.threshold(low)
    # the threshold for "can still reach low" sits 2ε below f
    up = t + b.alpha + b.beta * t.abs()
    assert torch.allclose(up, low, rtol=0, atol=1e-15)
    assert bool((t < low).all()) and bool((low < f).all())


def test_plan_keeps_extra_memory_small_and_tiles_cache_sized():
    bank = torch.empty(200_000, 576, dtype=torch.float16)  # never touched
    nrm = RowNorms(torch.ones(200_000, dtype=torch.float64), torch.ones(200_000), 0.0)
    q64 = prepare_queries(torch.randn(576, 576), 576)
    plan, _ = search_mod._plan(q64, bank, nrm, 5, "auto", DEFAULT_CHUNK_BYTES, 1024)
    bank_bytes = bank.numel() * bank.element_size()
    assert plan.budget <= bank_bytes // 16
    tile = plan.chunk * (576 * (2 + 4) + plan.block * 4)  # rows + fp32 step + scores
    assert tile <= bank_bytes * 0.08


@pytest.mark.parametrize("seed", range(10))
def test_fuzz_small_tiles_against_brute_force(seed):
    """Random shapes, dtypes, k, tiles and heavy ties (quantised rows) vs. fp64 brute force."""
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(4, 40, (1,), generator=g))
    n_layers = int(torch.randint(1, 4, (1,), generator=g))
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
    banks = []
    for _ in range(n_layers):
        n = int(torch.randint(1, 1500, (1,), generator=g))
        x = torch.randn(n, d, generator=g)
        if seed % 3 == 0:
            x = x.round().clamp(-2, 2)  # few distinct rows: massive exact ties
        if seed % 2 == 1:
            x = x * torch.rand(n, 1, generator=g) * 5  # raw rows of varied norm
        dt = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=g))]
        banks.append(x.to(dt))
    nq = int(torch.randint(1, 40, (1,), generator=g))
    q = torch.randn(nq, d, generator=g)
    if seed % 3 == 0:
        q = q.round().clamp(-2, 2)
        q[q.abs().sum(1) == 0, 0] = 1
    k = int(torch.randint(1, 25, (1,), generator=g))
    expected = canonical_reference(q, banks, k)
    assert torch.allclose(expected.scores, brute_force(q, banks, k).scores, rtol=0, atol=1e-12)
    for precision in ("fast", "exact"):
        hits = run(q, banks, k, precision=precision, chunk_bytes=d * 2 * 64 * 3, query_block=7)
        assert torch.equal(hits.bank, expected.bank) and torch.equal(hits.row, expected.row)
        assert torch.equal(hits.scores, expected.scores)


def canonical_reference(q, banks, k):
    """Every (query, row) pair scored by the engine's own fp64 routine, then sorted.

    Rows that tie mathematically but differ (e.g. (1, 2) and (2, 1)) can differ in the
    last bit between two fp64 summation orders, so the fuzz test compares against the
    same exact scorer: it checks the pruning and merging, ties included, bit for bit.
    """
    q64 = prepare_queries(q, banks[0].shape[1])
    all_s, all_b, all_r = [], [], []
    for b, bank in enumerate(banks):
        n = bank.shape[0]
        qi = torch.arange(q64.shape[0]).repeat_interleave(n)
        rows = torch.arange(n).repeat(q64.shape[0])
        s = scan_mod._pair_scores(q64, bank, RowNorms.of(bank).norm, qi, rows).view(-1, n)
        s, r = scan_mod._sort_hits(s, torch.arange(n).expand(q64.shape[0], -1).contiguous())
        all_s.append(s[:, :k])
        all_r.append(r[:, :k])
        all_b.append(torch.full_like(r[:, :k], b))
    scores = torch.cat(all_s, 1)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return SearchHits(
        scores.gather(1, order),
        torch.cat(all_b, 1).gather(1, order),
        torch.cat(all_r, 1).gather(1, order),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_band_of_near_ties_as_wide_as_the_bound(dtype):
    """Thousands of rows with cosines spread over the fast pass's error band around the
    k-th score: the fast ranking is scrambled there, and a bound even a few times too
    small drops true top-k rows."""
    d, nq, per = 128, 4, 1500
    anchors = torch.nn.functional.normalize(torch.randn(nq, d, dtype=torch.float64), dim=1)
    rows = []
    for a in anchors:
        orth = torch.randn(per, d, dtype=torch.float64)
        orth -= (orth @ a)[:, None] * a
        orth = torch.nn.functional.normalize(orth, dim=1)
        cos = 0.9 - 0.012 * torch.rand(per, 1, dtype=torch.float64)
        rows.append(cos * a + (1 - cos**2).sqrt() * orth)
    far = torch.nn.functional.normalize(torch.randn(3000, d, dtype=torch.float64), dim=1)
    bank = torch.cat(rows + [far])
    bank = bank[torch.randperm(bank.shape[0])].to(dtype)
    q64 = prepare_queries(anchors, d)
    fast, _ = fast_scores(q64, bank, RowNorms.of(bank), precision="fast")
    exact = bank.double() @ q64.T / bank.double().norm(dim=1, keepdim=True)
    top = exact.topk(10, dim=0).indices
    worst = fast[top, torch.arange(nq)].min(0).values  # lowest fast score of a true top-10
    assert int((fast >= worst).sum(0).min()) > 50  # the fast pass alone cannot tell them apart
    hits = run(anchors, [bank], 10, precision="fast", chunk_bytes=d * 2 * 700)
    assert_same(hits, reference(anchors, [bank], 10))


def test_run_time_path_selection_probes_the_bf16_kernel():
    cpu = torch.device("cpu")
    fast = compute_dtype(cpu, torch.float16, "fast")
    if precision_mod._bf16_matmul_accumulates_fp32("cpu"):  # native or emulated
        assert fast == torch.bfloat16
    else:
        assert fast == torch.float32
    assert compute_dtype(cpu, torch.float16, "exact") == torch.float32
    assert compute_dtype(cpu, torch.float32, "fast", max_norm=2.0**41) == torch.float64


def test_empty_layer_and_fast_pass_counts():
    q64 = prepare_queries(torch.randn(3, 8), 8)
    empty = torch.empty(0, 8, dtype=torch.float16)
    s, r = search_mod.search_layer(q64, empty, RowNorms.of(empty), 4)
    assert s.shape == (3, 0) and r.shape == (3, 0)
    bank = unit(500, 8)
    assert fast_pass(q64, bank, RowNorms.of(bank), 4) >= 3 * 4  # at least the top-k each


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, torch.bfloat16), (3.0, torch.float32)])
def test_auto_precision_is_measured_not_read_from_a_flag(monkeypatch, bf16_seconds, expected):
    # a CPU that emulates bf16 (slower than fp32) must score in fp32; a native one in bf16
    if not precision_mod._bf16_matmul_accumulates_fp32("cpu"):
        pytest.skip("this CPU's bf16 kernel does not sum in fp32: bf16 is never a candidate")
    monkeypatch.setattr(precision_mod, "_MEASURED", {})
    monkeypatch.setattr(search_mod, "cpu_has_fast_bf16", lambda: expected == torch.float32)
    calls = []

    def fake_time(rows, qc, compute):
        calls.append(compute)
        return bf16_seconds if compute == torch.bfloat16 else 1.0

    monkeypatch.setattr(precision_mod, "_time_tile", fake_time)
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float16, "auto", d=64) == expected
    assert {torch.float32, torch.bfloat16} <= set(calls)
    n = len(calls)
    assert compute_dtype(cpu, torch.float16, "auto", d=64) == expected  # cached per process
    assert len(calls) == n
    assert compute_dtype(cpu, torch.float16, "exact", d=64) == torch.float32
    assert precision_mod.measurements() == {"cpu float16 d=64": str(expected).split(".")[-1]}
    # whatever is chosen, the answer is the fp64 one
    bank = unit(3000, 64)
    q = torch.randn(20, 64)
    assert_same(run(q, [bank], 7, precision="auto"), reference(q, [bank], 7))
