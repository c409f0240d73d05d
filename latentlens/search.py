"""The one exact top-k cosine engine: chunked fast scoring, certified fp64 re-rank.

Every search in latentlens (LatentLens, EmbeddingLens, the distributed index) ends here.

Algorithm, per bank layer and block of queries:

1. *Fast pass.* Score chunks of bank rows against the queries in a compute precision
   picked for the device (fp32, or bf16/fp16 with fp32 accumulation), multiply by the
   row's inverse norm, and keep a running top-``k'`` (``k' = k + margin``) per query. The
   bank is read in place, chunk by chunk, in its stored dtype; at most one chunk is
   converted at a time, so extra memory is ``O(query_block × chunk + chunk × d)``.
2. *Re-rank.* Re-score the ``k'`` candidates exactly in float64 from the stored rows and
   sort them by (similarity desc, row asc).
3. *Certificate.* With ``eps`` the proven bound on ``|fast − exact|`` (see
   :func:`error_bound`), any row outside the candidates has exact score at most
   ``m' + eps`` where ``m'`` is the ``k'``-th fast score. If the exact ``k``-th score is
   strictly above that, the answer equals an fp64 brute force over the stored bank, ties
   included. Queries that fail the check are searched again with a wider ``k'`` until
   they pass (at worst ``k' = N``: a full exact scan).

Layers are merged with one stable sort over ``[Q, layers × k]``: ties go to the lower
layer, then the lower row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from latentlens.errors import DimensionMismatchError, InvalidQueryError

Precision = Literal["auto", "exact", "fast"]

_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
_LOW_PRECISION_STORAGE = (torch.float16, torch.bfloat16)
_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)

# Working-set budget for one chunk of scores / converted rows (bytes).
DEFAULT_CHUNK_BYTES = 8 * 2**20
DEFAULT_QUERY_BLOCK = 1024
DEFAULT_MARGIN = 16


@dataclass(frozen=True)
class SearchHits:
    """Top-k results of a multi-layer search.

    Attributes:
        scores: ``[Q, k]`` float64 cosine similarities, best first.
        bank: ``[Q, k]`` int64 position of the hit's bank in the list searched.
        row: ``[Q, k]`` int64 row of the hit inside its bank.
    """

    scores: torch.Tensor
    bank: torch.Tensor
    row: torch.Tensor


@dataclass(frozen=True)
class RowNorms:
    """Per-row L2 norms of one bank, computed once at load.

    Attributes:
        norm: ``[N]`` float64 norms on the bank's device (zero rows hold 1).
        inv: ``[N]`` float32 inverse norms on the bank's device (zero rows hold 0).
        max_deviation: ``max |norm − 1|`` over rows, used to skip rescaling for unit banks.
    """

    norm: torch.Tensor
    inv: torch.Tensor
    max_deviation: float

    @classmethod
    def of(cls, bank: torch.Tensor, chunk_rows: int = 65536) -> RowNorms:
        """Compute the norms of ``bank`` ``[N, d]`` in float64, one chunk at a time."""
        parts = [
            bank[i : i + chunk_rows].to(torch.float64).pow(2).sum(1).sqrt()
            for i in range(0, bank.shape[0], chunk_rows)
        ]
        norm = torch.cat(parts) if parts else bank.new_zeros(0, dtype=torch.float64)
        zero = norm == 0
        inv = torch.where(zero, torch.zeros_like(norm), 1.0 / norm.clamp_min(1e-300))
        norm = torch.where(zero, torch.ones_like(norm), norm)
        dev = float((norm - 1).abs().max()) if norm.numel() else 0.0
        return cls(norm=norm, inv=inv.to(torch.float32), max_deviation=dev)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(
    device: torch.device, storage: torch.dtype, precision: Precision, max_norm: float = 1.0
) -> torch.dtype:
    """The dtype the fast pass multiplies in, for a bank stored as ``storage``.

    ``exact`` always uses fp32. ``fast`` (and ``auto``) use bf16 on CPUs with native bf16
    (fp16 has no fast CPU kernel), fp16/bf16 on CUDA (the stored one when it is 16-bit;
    bf16 when rows are large enough for fp16 products to overflow), else fp32.
    """
    if precision not in ("auto", "exact", "fast"):
        raise ValueError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    if precision == "exact" or storage == torch.float64:
        return torch.float32
    if device.type == "cuda":
        if storage in _LOW_PRECISION_STORAGE:
            if storage == torch.float16 and max_norm > 1e4:
                return torch.bfloat16
            return storage
        return torch.bfloat16 if max_norm > 1e4 else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def error_bound(d: int, storage: torch.dtype, compute: torch.dtype) -> float:
    """A proven bound on ``|fast score − exact cosine|`` for one (query, row) pair.

    Queries are unit vectors (normalised in fp64), rows are scaled by their inverse norm.
    With ``u_q``/``u_r`` the rounding of query and row into the compute dtype, ``γ_d =
    d·u_a / (1 − d·u_a)`` the fp32 accumulation error over ``d`` terms and ``u_o`` the
    rounding of the product's output, the unscaled dot product is within
    ``c·‖q‖·‖r‖`` of the exact one, ``c = (1+u_q)(1+u_r)(1+γ_d)(1+u_o) − 1``
    (Cauchy–Schwarz bounds ``Σ|q_i r_i|``). Scaling by the fp32 inverse norm and rounding
    the product add ``3·2^-24·(1+c)``. Subnormal fp16 query components add at most
    ``2^-25·√d`` (absolute). The result is that sum, plus ``1e-12`` for fp64 noise.
    """
    u_c = _UNIT_ROUNDOFF[compute]
    u_q = u_c
    u_r = 0.0 if _exactly_representable(storage, compute) else u_c
    u_a = _UNIT_ROUNDOFF[torch.float32]
    gamma = d * u_a / (1 - d * u_a)
    u_o = 0.0 if compute == torch.float32 else u_c
    c = (1 + u_q) * (1 + u_r) * (1 + gamma) * (1 + u_o) - 1
    eps = c + 3 * u_a * (1 + c)
    if compute == torch.float16:
        eps += 2.0**-25 * math.sqrt(d) * (1 + c)
    return eps + 1e-12


def _exactly_representable(storage: torch.dtype, compute: torch.dtype) -> bool:
    if storage == compute:
        return True
    if storage in _FP8_DTYPES:
        return compute in (torch.bfloat16, torch.float16, torch.float32)
    if compute == torch.float32:
        return storage in _LOW_PRECISION_STORAGE
    return False


def prepare_queries(queries: torch.Tensor, d: int) -> torch.Tensor:
    """Validate and L2-normalise queries in float64.

    Args:
        queries: ``[d]`` or ``[Q, d]``, any float dtype and device.
        d: the bank's hidden size.

    Returns:
        ``[Q, d]`` float64 unit vectors on the queries' device.

    Raises:
        DimensionMismatchError: the last dimension is not ``d``.
        InvalidQueryError: no queries, a NaN/inf entry, or a zero vector.
    """
    if not isinstance(queries, torch.Tensor):
        queries = torch.as_tensor(queries)
    if queries.ndim == 1:
        queries = queries.unsqueeze(0)
    if queries.ndim != 2:
        raise InvalidQueryError(f"queries must be [d] or [Q, d], got shape {tuple(queries.shape)}")
    if queries.shape[1] != d:
        raise DimensionMismatchError(
            f"query width {queries.shape[1]} does not match the bank's hidden size {d}"
        )
    if queries.shape[0] == 0:
        raise InvalidQueryError("no queries given (shape [0, d])")
    if not queries.is_floating_point():
        queries = queries.to(torch.float32)
    q = queries.to(torch.float64)
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise InvalidQueryError(f"query {first} contains NaN or inf ({int(bad.sum())} such queries)")
    norms = q.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        first = int((norms[:, 0] == 0).nonzero()[0])
        raise InvalidQueryError(f"query {first} is a zero vector: cosine similarity is undefined")
    return q / norms


@contextlib.contextmanager
def _full_precision_reductions(device: torch.device) -> Iterator[None]:
    """On CUDA, forbid reduced-precision split-K reductions so fp32 accumulation holds."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def _chunk_rows(n_queries: int, d: int, chunk_bytes: int) -> int:
    by_scores = chunk_bytes // (4 * max(n_queries, 1))
    by_rows = chunk_bytes // (4 * d)
    return max(256, min(by_scores, by_rows) // 256 * 256)


def _fast_topk(
    q: torch.Tensor,
    bank: torch.Tensor,
    inv_norm: torch.Tensor | None,
    kk: int,
    compute: torch.dtype,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``kk`` of fast scores. ``q`` ``[B, d]`` in ``compute``; returns ``[B, kk]``."""
    n = bank.shape[0]
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n, chunk):
        rows = bank[start : start + chunk]
        if rows.dtype != compute:
            rows = rows.to(compute)
        s = q @ rows.T  # [B, C]
        if inv_norm is not None:
            s = s * inv_norm[start : start + chunk]  # promotes to fp32
        elif s.dtype != torch.float32:
            s = s.float()
        v, i = torch.topk(s, min(kk, s.shape[1]), dim=1)
        i += start
        if best_v is None:
            best_v, best_i = v, i
        else:
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_v, pos = torch.topk(v, min(kk, v.shape[1]), dim=1)
            best_i = i.gather(1, pos)
    assert best_v is not None and best_i is not None
    return best_v, best_i


def _exact_scores(
    q64: torch.Tensor, bank: torch.Tensor, norm64: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Exact float64 cosines of ``q64`` ``[B, d]`` with ``bank[rows]`` (``rows`` ``[B, m]``)."""
    block = max(1, (16 * 2**20) // max(1, rows.shape[1] * bank.shape[1] * 8))
    out = []
    for s in range(0, rows.shape[0], block):
        r = rows[s : s + block]
        vecs = bank[r.reshape(-1)].to(torch.float64).view(r.shape[0], r.shape[1], -1)
        dots = torch.einsum("bmd,bd->bm", vecs, q64[s : s + block])
        out.append(dots / norm64[r])
    return torch.cat(out)


def _sort_hits(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each line by (score desc, row asc): rows first, then a stable score sort."""
    rows, order = rows.sort(dim=1)
    scores = scores.gather(1, order)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, rows.gather(1, order)


def search_layer(
    q64: torch.Tensor,
    bank: torch.Tensor,
    norms: RowNorms,
    k: int,
    *,
    precision: Precision = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    query_block: int = DEFAULT_QUERY_BLOCK,
    margin: int = DEFAULT_MARGIN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine of unit queries against one bank.

    Args:
        q64: ``[Q, d]`` float64 unit queries (see :func:`prepare_queries`).
        bank: ``[N, d]`` rows in their stored dtype, on the device the search runs on.
        norms: the bank's :class:`RowNorms`.
        k: neighbours wanted; ``min(k, N)`` are returned.

    Returns:
        ``(scores [Q, k] float64, rows [Q, k] int64)`` sorted by (score desc, row asc).
    """
    n, d = bank.shape
    k = min(k, n)
    device = bank.device
    q64 = q64.to(device)
    compute = compute_dtype(device, bank.dtype, precision, 1 + norms.max_deviation)
    eps = error_bound(d, bank.dtype, compute)
    # Rows within eps/8 of unit norm need no rescaling: fold the deviation into the bound.
    skip_scale = norms.max_deviation * 2 < eps / 8
    inv = None if skip_scale else norms.inv
    if skip_scale:
        eps = eps * (1 + norms.max_deviation) + norms.max_deviation / (1 - norms.max_deviation)
    out_s = torch.empty(q64.shape[0], k, dtype=torch.float64, device=device)
    out_r = torch.empty(q64.shape[0], k, dtype=torch.int64, device=device)
    with _full_precision_reductions(device):
        for qs in range(0, q64.shape[0], query_block):
            qb = q64[qs : qs + query_block]
            chunk = _chunk_rows(qb.shape[0], d, chunk_bytes)
            todo = torch.arange(qb.shape[0], device=device)
            kk = min(n, k + margin)
            while todo.numel():
                fast_v, cand = _fast_topk(qb[todo].to(compute), bank, inv, kk, compute, chunk)
                exact = _exact_scores(qb[todo], bank, norms.norm, cand)
                s, r = _sort_hits(exact, cand)
                if kk >= n:
                    ok = torch.ones(todo.numel(), dtype=torch.bool, device=device)
                else:
                    ok = s[:, k - 1] > fast_v[:, -1] + eps
                done = todo[ok]
                out_s[qs + done] = s[ok, :k]
                out_r[qs + done] = r[ok, :k]
                todo = todo[~ok]
                kk = min(n, kk * 4)
    return out_s, out_r


def search_banks(
    queries: torch.Tensor,
    banks: Sequence[torch.Tensor],
    norms: Sequence[RowNorms],
    k: int,
    *,
    precision: Precision = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> SearchHits:
    """Global top-k cosine over several banks (e.g. the layers of a contextual index).

    Args:
        queries: ``[d]`` or ``[Q, d]`` any float dtype/device; normalised here.
        banks: ``[N_l, d]`` row matrices, each searched on its own device and dtype.
        norms: one :class:`RowNorms` per bank.
        k: neighbours per query; ``min(k, Σ N_l)`` are returned.

    Returns:
        :class:`SearchHits` on the first bank's device, ties broken by (bank, row).
    """
    if not banks:
        raise InvalidQueryError("nothing to search: no banks/layers selected")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    d = banks[0].shape[1]
    q64 = prepare_queries(queries, d)
    out_device = banks[0].device
    all_s, all_b, all_r = [], [], []
    for b, (bank, nrm) in enumerate(zip(banks, norms, strict=True)):
        if bank.shape[1] != d:
            raise DimensionMismatchError(f"bank {b} has width {bank.shape[1]}, expected {d}")
        if bank.shape[0] == 0:
            continue
        s, r = search_layer(
            q64, bank, nrm, k, precision=precision, chunk_bytes=chunk_bytes, query_block=query_block
        )
        all_s.append(s.to(out_device))
        all_r.append(r.to(out_device))
        all_b.append(torch.full_like(r, b, device=out_device))
    if not all_s:
        raise InvalidQueryError("nothing to search: every selected bank is empty")
    scores = torch.cat(all_s, dim=1)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
    return SearchHits(
        scores=scores.gather(1, order),
        bank=torch.cat(all_b, dim=1).gather(1, order),
        row=torch.cat(all_r, dim=1).gather(1, order),
    )


def brute_force(
    queries: torch.Tensor, banks: Sequence[torch.Tensor], k: int
) -> SearchHits:
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
