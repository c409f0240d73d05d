"""The one exact top-k cosine engine: fast scoring, a proven bound, an fp64 re-rank.

Every search in latentlens (LatentLens, EmbeddingLens, the distributed index) ends here.
The result always equals an fp64 brute force over the stored bank, ties included
(order: score desc, then bank asc, then row asc); only the speed depends on the path.

Modules: :mod:`~latentlens.search.precision` (compute dtype per device; the error bound
and its derivation), :mod:`~latentlens.search.scan` (the per-layer algorithm),
:mod:`~latentlens.search.inputs` (queries, row norms, hits); this module holds the entry
points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentlens.errors import DimensionMismatchError, InvalidQueryError
from latentlens.search.inputs import RowNorms, SearchHits, checked_norms, prepare_queries
from latentlens.search.precision import (
    FastBound,
    Precision,
    compute_dtype,
    cpu_has_fast_bf16,
    error_bound,
    fast_bound,
)
from latentlens.search.scan import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_BYTES_CUDA,
    DEFAULT_QUERY_BLOCK,
    _full_precision_reductions,
    _LayerScan,
    _plan,
    _sort_hits,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES_CUDA",
    "DEFAULT_QUERY_BLOCK",
    "FastBound",
    "Precision",
    "RowNorms",
    "SearchHits",
    "brute_force",
    "checked_norms",
    "compute_dtype",
    "cpu_has_fast_bf16",
    "error_bound",
    "fast_bound",
    "fast_pass",
    "fast_scores",
    "prepare_queries",
    "search_banks",
    "search_layer",
]


def search_layer(
    q64: torch.Tensor,
    bank: torch.Tensor,
    norms: RowNorms,
    k: int,
    *,
    precision: Precision = "auto",
    chunk_bytes: int | None = None,
    query_block: int = DEFAULT_QUERY_BLOCK,
    lower_bound: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine of unit queries against one bank.

    Args:
        q64: ``[Q, d]`` float64 unit queries (see :func:`prepare_queries`).
        bank: ``[N, d]`` rows in their stored dtype, on the device the search runs on.
        norms: the bank's :class:`RowNorms`.
        k: neighbours wanted; ``min(k, N)`` are returned.
        precision: ``"auto"``/``"fast"`` (fast compute dtype, see :func:`compute_dtype`) or
            ``"exact"`` (fp32 scoring). Both return the fp64 answer.
        chunk_bytes: working-set budget per tile (default 16 MiB on CPU, 512 MiB on
            CUDA where launches are costly); also capped at 1/32 of the layer.
        query_block: queries scored per matmul.
        lower_bound: optional ``[Q]`` float64 values known to be ``≤`` the score of the
            ``k``-th hit wanted (e.g. from layers already searched). Hits scoring below it
            may come back as ``(-inf, N)`` placeholders.

    Returns:
        ``(scores [Q, k] float64, rows [Q, k] int64)`` sorted by (score desc, row asc).
    """
    n, _ = bank.shape
    k = min(k, n)
    q64 = q64.to(bank.device)
    if k == 0:
        empty = torch.empty(q64.shape[0], 0, device=bank.device)
        return empty.to(torch.float64), empty.to(torch.int64)
    plan, q_fast = _plan(q64, bank, norms, k, precision, chunk_bytes, query_block)
    scan = _LayerScan(q64, q_fast, bank, norms, k, plan, lower_bound)
    with _full_precision_reductions(bank.device):
        scan.scan()
    return scan.top_s, scan.top_r


def fast_pass(
    q64: torch.Tensor,
    bank: torch.Tensor,
    norms: RowNorms,
    k: int,
    *,
    precision: Precision = "fast",
    chunk_bytes: int | None = None,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> int:
    """The fast pass alone (scoring, thresholds, candidate collection; no re-rank).

    For benchmarks: returns the number of candidates collected, not a result.
    """
    k = min(k, bank.shape[0])
    q64 = q64.to(bank.device)
    plan, q_fast = _plan(q64, bank, norms, k, precision, chunk_bytes, query_block)
    scan = _LayerScan(q64, q_fast, bank, norms, k, plan, None)
    with _full_precision_reductions(bank.device):
        scan.scan(rescore=False)
    return sum(b[0].shape[0] for b in scan.buf)


def fast_scores(
    q64: torch.Tensor, bank: torch.Tensor, norms: RowNorms, *, precision: Precision = "fast"
) -> tuple[torch.Tensor, FastBound]:
    """The fast pass's scores ``[N, Q]`` (fp32) and their :class:`FastBound`.

    Computed by the same code as the search, for tests and inspection (small banks only).
    """
    q64 = q64.to(bank.device)
    plan, q_fast = _plan(q64, bank, norms, 1, precision, None, q64.shape[0])
    scan = _LayerScan(q64, q_fast, bank, norms, 1, plan, None)
    scan._buffers()
    out = []
    for start in range(0, bank.shape[0], plan.chunk):
        rows_c = scan._convert(bank[start : start + plan.chunk])
        out.append(scan._score(rows_c, start, slice(0, q64.shape[0])).to(torch.float32, copy=True))
    return torch.cat(out), plan.bound


def search_banks(
    queries: torch.Tensor,
    banks: Sequence[torch.Tensor],
    norms: Sequence[RowNorms],
    k: int,
    *,
    precision: Precision = "auto",
    chunk_bytes: int | None = None,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> SearchHits:
    """Global top-k cosine over several banks (e.g. the layers of a contextual index).

    Args:
        queries: ``[d]`` or ``[Q, d]`` any float dtype/device; normalised here.
        banks: ``[N_l, d]`` row matrices, each searched on its own device and dtype.
        norms: one :class:`RowNorms` per bank.
        k: neighbours per query; ``min(k, Σ N_l)`` are returned.
        precision: ``"auto"``/``"fast"`` or ``"exact"`` (see :func:`search_layer`).

    Returns:
        :class:`SearchHits` on the first bank's device, ties broken by (bank, row). A
        zero query's row holds score NaN and bank / row -1 (no cosine is defined).

    Raises:
        BankFormatError: a bank holds a NaN/inf row.
        InvalidQueryError: a NaN/inf query, no queries, or nothing to search.
    """
    if not banks:
        raise InvalidQueryError("nothing to search: no banks/layers selected")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    d = banks[0].shape[1]
    for b, (bank, nrm) in enumerate(zip(banks, norms, strict=True)):
        if bank.shape[1] != d:
            raise DimensionMismatchError(f"bank {b} has width {bank.shape[1]}, expected {d}")
        nrm.check(f"bank {b}")
    if sum(int(bank.shape[0]) for bank in banks) == 0:
        raise InvalidQueryError("nothing to search: every selected bank is empty")
    q64 = prepare_queries(queries, d, allow_zero=True)
    out_device = banks[0].device
    # A zero query has no cosine: it gets an empty result (score NaN, bank and row -1)
    # and is left out of the search, so the rest of the batch is unharmed.
    live = (q64 != 0).any(dim=1)
    n_live = int(live.sum())
    k_out = min(k, sum(int(bank.shape[0]) for bank in banks))
    if n_live < q64.shape[0]:
        scores = torch.full((q64.shape[0], k_out), float("nan"), dtype=torch.float64)
        bank_ix = torch.full((q64.shape[0], k_out), -1, dtype=torch.int64)
        out = SearchHits(
            scores.to(out_device), bank_ix.to(out_device), bank_ix.clone().to(out_device)
        )
        if n_live:
            hits = _search_unit(q64[live], banks, norms, k, precision, chunk_bytes, query_block)
            rows = live.nonzero()[:, 0].to(out_device)
            out.scores[rows], out.bank[rows], out.row[rows] = hits.scores, hits.bank, hits.row
        return out
    return _search_unit(q64, banks, norms, k, precision, chunk_bytes, query_block)


def _search_unit(
    q64: torch.Tensor,
    banks: Sequence[torch.Tensor],
    norms: Sequence[RowNorms],
    k: int,
    precision: Precision,
    chunk_bytes: int | None,
    query_block: int,
) -> SearchHits:
    out_device = banks[0].device
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for b, (bank, nrm) in enumerate(zip(banks, norms, strict=True)):
        if bank.shape[0] == 0:
            continue
        low = None
        if best is not None and best[0].shape[1] >= k:
            low = best[0][:, k - 1]
        s, r = search_layer(
            q64,
            bank,
            nrm,
            k,
            precision=precision,
            chunk_bytes=chunk_bytes,
            query_block=query_block,
            lower_bound=low,
        )
        s, r = s.to(out_device), r.to(out_device)
        layer = torch.full_like(r, b)
        if best is None:
            best = (s, layer, r)
            continue
        scores = torch.cat([best[0], s], dim=1)
        order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
        best = (
            scores.gather(1, order),
            torch.cat([best[1], layer], dim=1).gather(1, order),
            torch.cat([best[2], r], dim=1).gather(1, order),
        )
    assert best is not None
    return SearchHits(scores=best[0], bank=best[1], row=best[2])


def brute_force(queries: torch.Tensor, banks: Sequence[torch.Tensor], k: int) -> SearchHits:
    """Reference search in float64 over whole banks (small data only; for tests/benchmarks)."""
    q = prepare_queries(queries, banks[0].shape[1])
    all_s, all_b, all_r = [], [], []
    for b, bank in enumerate(banks):
        x = bank.to(torch.float64).to(q.device)
        n = x.norm(dim=1)
        s = (q @ x.T) / torch.where(n == 0, torch.ones_like(n), n)
        rows = torch.arange(x.shape[0], device=q.device).expand(q.shape[0], -1)
        s, r = _sort_hits(s, rows.contiguous())
        kk = min(k, x.shape[0])
        all_s.append(s[:, :kk])
        all_r.append(r[:, :kk])
        all_b.append(torch.full_like(r[:, :kk], b))
    scores = torch.cat(all_s, dim=1)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
    return SearchHits(
        scores.gather(1, order),
        torch.cat(all_b, 1).gather(1, order),
        torch.cat(all_r, 1).gather(1, order),
    )
