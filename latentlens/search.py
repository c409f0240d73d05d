"""The one exact top-k cosine engine: fast scoring, a proven bound, an fp64 re-rank.

Every search in latentlens (LatentLens, EmbeddingLens, the distributed index) ends here.
The result always equals an fp64 brute force over the stored bank, ties included
(order: score desc, then bank asc, then row asc); only the speed depends on the path.

**Path.** Picked at run time by :func:`compute_dtype`: bf16 on CPUs with native bf16
(AVX512-BF16/AMX, after a one-time probe that the kernel really sums in fp32), fp16 or
bf16 on CUDA (fp32 output when ``torch.mm(..., out_dtype=float32)`` exists), else fp32.
``precision="exact"`` forces fp32 scoring (the reference path), ``"fast"``/``"auto"``
the fast one. Banks stored as bf16 are fastest on CPU (no per-chunk conversion, ``ρ = 0``
below); fp16 rows are converted chunk by chunk through fp32.

**Algorithm**, per bank layer. The bank is read in place, ``C`` rows at a time (a tile is
``C`` rows × a block of ``B`` queries, sized to ``chunk_bytes`` and to 1/32 of the layer,
so extra memory stays a few percent of the bank); it is never upcast or copied whole.

1. *Fast scores.* ``S = rows @ Qᵀ`` (``[C, B]``, fp32 accumulation) in the compute dtype;
   rows that are not unit length are multiplied by their fp32 inverse norm.
2. *Running threshold.* The tile is cut into groups of ``g`` rows (64) and the group
   maxima taken (a vectorised reduction; on 16-bit scores an int16 reduction once all
   thresholds are positive, see ``_group_max``). The ``k`` largest values kept so far
   belong to ``k`` distinct rows, so their smallest, ``m``, is at most the ``k``-th best
   fast score, and ``L = m − ε(m)`` is at most the exact ``k``-th best cosine ``S_k``
   (the first tile seeds this with its true top-k). Once candidates are re-ranked
   (step 4), ``L`` also takes the exact ``k``-th best so far, and layers searched earlier
   hand theirs to the next layer.
3. *Candidates.* A row with fast score ``f`` can reach the top-k only if
   ``f + ε(f) ≥ L``; the smallest such ``f`` is the threshold ``t``. Only groups whose
   maximum is ``≥ t`` are opened, and every row in them with ``f ≥ t`` is kept: per query,
   *all* rows within the proven error bound of the running ``k``-th best, however many —
   there is no fixed ``k'`` to overflow and nothing is ever rescanned.
4. *Exact re-rank.* Candidates still above the final threshold are re-scored in float64
   from the stored rows by one fixed routine (:func:`_pair_scores`, so duplicated rows
   get identical scores) and merged into a running top-k ordered by (score desc,
   row asc). When the candidate buffer outgrows its budget it is re-ranked early, which
   raises ``L``. A tile where a large share of the pairs are candidates (massive
   duplication) is pre-filtered by an fp64 matmul instead (``_dense``).

A discarded row has ``c ≤ f + ε(f) < L ≤ S_k``: strictly below the ``k``-th exact score,
so it can neither be in the top-k nor tie with it. Layers are merged with one stable
sort, so ties go to the lower layer, then the lower row.

**The bound** (``|f − c| ≤ ε(f) = α + β|f|``, :func:`fast_bound`). For a unit query ``q``
(fp64) and a stored row ``r`` let ``c = ⟨q,r⟩/‖r‖`` be the exact cosine. ``q̂``, ``r̂`` are
``q``, ``r`` rounded to the compute dtype (unit roundoff ``u_c``: ``2⁻⁸`` bf16, ``2⁻¹¹``
fp16, ``2⁻²⁴`` fp32). We measure ``e_q = ‖q̂ − q‖`` per query, and ``ρ`` bounds
``‖r̂ − r‖/‖r‖`` (0 when the stored dtype converts exactly: bf16 or fp8 rows into bf16,
16-bit rows into fp32; ``u_c`` for one round-to-nearest; ``u_c + u₃₂(1+u_c)`` for fp64
rows taken through fp32). By Cauchy–Schwarz::

    |⟨q̂,r̂⟩ − ⟨q,r⟩| ≤ |⟨q̂−q, r̂⟩| + |⟨q, r̂−r⟩| ≤ ‖r‖·(e_q(1+ρ) + ρ).

Products of two bf16/fp16 numbers are exact in fp32, and any fp32 summation of ``d`` of
them errs by at most ``γ_d Σ|q̂ᵢr̂ᵢ| ≤ γ_d ‖q̂‖‖r̂‖`` with ``γ_d = d·u₃₂/(1 − d·u₃₂)``
(Higham, Thm 3.1). So the accumulator ``x`` has ``|x − ⟨q,r⟩| ≤ ‖r‖·α₀``,
``α₀ = e_q(1+ρ) + ρ + γ_d(1+e_q)(1+ρ)``. The kernel rounds ``x`` once to its output dtype
(bf16 on CPU): ``|o − x| ≤ u_o|o|`` (``u_o = 2⁻⁸``; 0 for fp32 output). Multiplying by the
fp32 inverse norm, ``f = fl(o · fl(1/‖r‖))``, gives ``|f − o/‖r‖| ≤ θ|f|`` with
``θ = (1 − u₃₂)⁻² − 1``. Altogether::

    α = α₀ + a_sub,   β = θ + u_o(1 + θ).

Rows within ``δ ≤ u_c/4`` of unit norm skip the rescaling (``f = o``); then
``|⟨q,r⟩ − c| ≤ δ`` and ``α = (1+δ)α₀ + δ + a_sub``, ``β = u_o``. ``a_sub`` covers
underflow — flush-to-zero bf16 dot products, subnormal fp16 rows and outputs:
``(2d·2⁻¹²⁶ + s_o + s_r√d)/min‖r‖`` with ``s_o``, ``s_r`` half the subnormal spacing of the
output/row dtype (0 when exact) — plus ``10⁻¹² + 2(d+2)·2⁻⁵³`` for the fp64 arithmetic of
thresholds and the gap between the canonical fp64 score and the real cosine. Banks
whose row norms leave ``[2⁻⁴⁰, 2⁴⁰]`` are scored in fp64 instead, where none of this can
under- or overflow. Typical values (``d = 576``, CPU bf16): ``α ≈ 1.8·10⁻³`` for bf16 rows,
``≈ 5.7·10⁻³`` for fp16 rows, ``β = 2⁻⁸``; fp32 scoring gives ``α ≈ 3.4·10⁻⁵``.
:func:`error_bound` gives the worst case over all unit queries and rows.
"""

from __future__ import annotations

import contextlib
import functools
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
# Half the spacing of subnormal numbers: the absolute rounding error below the normal range.
_HALF_SUBNORMAL = {
    torch.float64: 2.0**-1075,
    torch.float32: 2.0**-150,
    torch.bfloat16: 2.0**-134,
    torch.float16: 2.0**-25,
}
_LOW_PRECISION_STORAGE = (torch.float16, torch.bfloat16)
_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
_U32 = 2.0**-24
_SLACK = 1e-12  # absorbs fp64 rounding in thresholds and norms (scores are O(1))
# Row norms outside this range are scored in fp64 (no under/overflow analysis needed).
_NORM_RANGE = (2.0**-40, 2.0**40)

# Working-set budget of one tile: converted rows + scores + candidate buffer (bytes).
# The effective budget is also capped at 1/32 of the layer so that extra memory stays
# far below 10% of the bank.
DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_CHUNK_BYTES_CUDA = 512 * 2**20
DEFAULT_QUERY_BLOCK = 1024
_MIN_BUDGET = 2**20
_BANK_FRACTION = 32  # tile budget ≤ layer bytes / this
_EXACT_SLICE_BYTES = 2**20  # fp64 rows re-scored at once (stays in L2)
_GROUP = 64  # rows per group maximum
_SEED_ROWS = 512  # rows of the first tile whose true top-k seeds the threshold


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


# ── run-time path selection ───────────────────────────────────────────────────────────


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _bf16_matmul_accumulates_fp32(device_type: str) -> bool:
    """Probe: does ``bf16 @ bf16`` here sum in fp32 and round only once (as the bound assumes)?

    Each output is ``256 + 8191·2⁻⁹ ≈ 272.0`` (exact products). A bf16 running sum, or one
    rounded to bf16 after every block of up to 511 terms (each block adds ``< 1``, half an
    ulp of 256), stays at 256. Checked at a small and a large shape (kernels go by size).
    """
    k = 8192
    try:
        col = torch.full((k,), 2.0**-9)
        col[0] = 256
        for m, n in ((8, 8), (256, 256)):
            a = torch.ones(m, k, dtype=torch.bfloat16, device=device_type)
            b = col.to(torch.bfloat16).to(device_type)[:, None].expand(k, n).contiguous()
            out = (a @ b).float()
            if not bool((out > 270).all()):
                return False
        return True
    except RuntimeError:
        return False


@functools.cache
def _mm_fp32_out(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` works for ``dtype`` inputs here."""
    if dtype == torch.float32:
        return False
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def compute_dtype(
    device: torch.device,
    storage: torch.dtype,
    precision: Precision,
    max_norm: float = 1.0,
    min_norm: float = 1.0,
) -> torch.dtype:
    """The dtype the fast pass multiplies in, for a bank stored as ``storage``.

    ``exact`` uses fp32. ``fast`` (and ``auto``) use bf16 on CPUs with native bf16 whose
    kernel passes the fp32-accumulation probe (fp16 has no fast CPU kernel), fp16/bf16
    on CUDA (the stored one when it is 16-bit; bf16 when rows are large enough for fp16
    products to overflow), else fp32. Banks with row norms outside ``[2⁻⁴⁰, 2⁴⁰]`` (and
    fp64 banks under ``exact``) are scored in fp32/fp64 as the bound requires.
    """
    if precision not in ("auto", "exact", "fast"):
        raise ValueError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    if max_norm > _NORM_RANGE[1] or min_norm < _NORM_RANGE[0]:
        return torch.float64
    if precision == "exact" or storage == torch.float64:
        return torch.float32
    if device.type == "cuda":
        if storage in _LOW_PRECISION_STORAGE:
            if storage == torch.float16 and max_norm > 1e4:
                return torch.bfloat16
            return storage
        return torch.bfloat16 if max_norm > 1e4 else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16() and _bf16_matmul_accumulates_fp32("cpu"):
        return torch.bfloat16
    return torch.float32


# ── the bound ─────────────────────────────────────────────────────────────────────────


def _row_rounding(storage: torch.dtype, compute: torch.dtype) -> float:
    """``ρ``: relative rounding of a stored row converted to ``compute`` (normal range)."""
    if _exactly_representable(storage, compute):
        return 0.0
    u_c = _UNIT_ROUNDOFF[compute]
    if storage == torch.float64 and compute != torch.float32:
        return u_c + _U32 * (1 + u_c)  # converted through fp32: two roundings
    return u_c


def _exactly_representable(storage: torch.dtype, compute: torch.dtype) -> bool:
    if storage == compute or compute == torch.float64:
        return True
    if storage in _FP8_DTYPES:
        return compute in (torch.bfloat16, torch.float16, torch.float32)
    if compute == torch.float32:
        return storage in _LOW_PRECISION_STORAGE
    return False


@dataclass(frozen=True)
class FastBound:
    """``|fast − exact cosine| ≤ alpha[b] + beta·|fast|`` for query ``b`` and any row.

    Attributes:
        alpha: ``[Q]`` float64 absolute part (per query: it uses ``‖q̂ − q‖``).
        beta: relative part (output rounding and inverse-norm scaling).
        scaled: whether scores are multiplied by the inverse row norm.
    """

    alpha: torch.Tensor
    beta: float
    scaled: bool

    def lower(self, fast: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The smallest exact cosine a row with fast score ``fast`` can have (monotone)."""
        a = self.alpha if alpha is None else alpha
        return fast - a - self.beta * fast.abs()

    def threshold(self, low: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The smallest fast score whose largest possible exact cosine is ``≥ low``.

        Solves ``f + α + β|f| = low``; rows below it have exact cosine ``< low``.
        """
        a = self.alpha if alpha is None else alpha
        x = low - a
        return torch.where(x >= 0, x / (1 + self.beta), x / (1 - self.beta))


def _coefficients(
    e_q: torch.Tensor,
    d: int,
    storage: torch.dtype,
    compute: torch.dtype,
    out_fp32: bool,
    max_deviation: float,
    min_norm: float,
) -> FastBound:
    """``α``, ``β`` of the module docstring for per-query rounding errors ``e_q``."""
    u_c = _UNIT_ROUNDOFF[compute]
    acc = torch.float64 if compute == torch.float64 else torch.float32
    u_a = _UNIT_ROUNDOFF[acc]
    gamma = d * u_a / (1 - d * u_a)
    rho = _row_rounding(storage, compute)
    alpha0 = e_q * (1 + rho) + rho + gamma * (1 + e_q) * (1 + rho)
    rounded_out = not out_fp32 and compute not in (torch.float32, torch.float64)
    u_o = _UNIT_ROUNDOFF[compute] if rounded_out else 0.0
    s_o = _HALF_SUBNORMAL[compute] if rounded_out else 0.0
    s_r = 0.0 if _exactly_representable(storage, compute) else _HALF_SUBNORMAL[compute]
    tiny = 2.0**-1022 if compute == torch.float64 else 2.0**-126
    a_sub = (2 * d * tiny + s_o + s_r * math.sqrt(d)) / max(min_norm, 1e-300)
    # fp64 slack: threshold arithmetic, and the canonical fp64 score vs. the real cosine
    a_sub += _SLACK + 2 * (d + 2) * 2.0**-53
    if max_deviation <= u_c / 4 and compute != torch.float64:
        dev = max_deviation  # rows within δ of unit norm: no rescaling
        return FastBound((1 + dev) * alpha0 + dev + a_sub, u_o, False)
    theta = 1 / (1 - u_a) ** 2 - 1  # fp32 inverse norm (fp64 norm division for fp64)
    return FastBound(alpha0 + a_sub, theta + u_o * (1 + theta), True)


def fast_bound(
    q64: torch.Tensor,
    q_fast: torch.Tensor,
    storage: torch.dtype,
    compute: torch.dtype,
    *,
    out_fp32: bool,
    max_deviation: float,
    min_norm: float = 1.0,
) -> FastBound:
    """The proven bound (module docstring) for unit queries ``q64`` rounded to ``q_fast``.

    ``e_q = ‖q̂ − q‖`` is measured per query in fp64 (exact up to a relative ``10⁻¹⁵``,
    covered by the factor below).
    """
    e_q = torch.empty(q64.shape[0], dtype=torch.float64, device=q64.device)
    for s in range(0, q64.shape[0], 256):  # in blocks: no [Q, d] fp64 temporary
        diff = q_fast[s : s + 256].to(torch.float64, copy=True).sub_(q64[s : s + 256])
        e_q[s : s + 256] = diff.norm(dim=1)
    e_q *= 1 + 1e-12
    return _coefficients(
        e_q, q64.shape[1], storage, compute, out_fp32, max_deviation, min_norm
    )


def error_bound(
    d: int, storage: torch.dtype, compute: torch.dtype, *, out_fp32: bool = False
) -> float:
    """Worst-case ``|fast score − exact cosine|`` over unit queries and unit rows.

    Uses ``e_q ≤ u_c`` (plus ``2⁻²⁵√d`` for fp16's subnormals), the rescaled form of the
    bound and ``|f| ≤ 1 + ε``, so ``ε = (α + β)/(1 − β)``. The search uses the tighter
    per-query :func:`fast_bound`.
    """
    e_q = _UNIT_ROUNDOFF[compute] + (
        _HALF_SUBNORMAL[compute] * math.sqrt(d) if compute == torch.float16 else 0.0
    )
    e = torch.tensor([e_q], dtype=torch.float64)
    b = _coefficients(e, d, storage, compute, out_fp32, 1.0, 1.0)
    return (float(b.alpha[0]) + b.beta) / (1 - b.beta)


# ── queries ───────────────────────────────────────────────────────────────────────────


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
    q = queries.to(torch.float64, copy=True)  # normalised in place below
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        count = int(bad.sum())
        raise InvalidQueryError(f"query {first} contains NaN or inf ({count} such queries)")
    norms = q.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        first = int((norms[:, 0] == 0).nonzero()[0])
        raise InvalidQueryError(f"query {first} is a zero vector: cosine similarity is undefined")
    return q.div_(norms)


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


# ── exact scores and the running exact top-k ──────────────────────────────────────────


def _pair_scores(
    q64: torch.Tensor,
    bank: torch.Tensor,
    norm64: torch.Tensor,
    qi: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Exact float64 cosines of the pairs ``(q64[qi], bank[rows])``.

    Always the same routine (a contiguous fp64 multiply and row sum), so a (query, row)
    pair gets the same bits however it was batched: duplicated rows tie exactly.
    """
    d = bank.shape[1]
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=bank.device)
    step = max(16, _EXACT_SLICE_BYTES // (8 * d))
    for s in range(0, rows.shape[0], step):
        v = bank.index_select(0, rows[s : s + step]).to(torch.float64)
        v.mul_(q64.index_select(0, qi[s : s + step]))
        torch.sum(v, 1, out=out[s : s + step])
    return out.div_(norm64[rows])


def _merge_topk(
    scores: torch.Tensor,
    rows: torch.Tensor,
    qi: torch.Tensor,
    new_rows: torch.Tensor,
    new_scores: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(qi, new_rows, new_scores)`` into per-query top-k ``[Q, k]`` lists.

    Order: score desc, then row asc (three stable sorts: row, score, query).
    """
    nq, k = scores.shape
    device = scores.device
    all_q = torch.cat([torch.arange(nq, device=device).repeat_interleave(k), qi])
    all_s = torch.cat([scores.reshape(-1), new_scores])
    all_r = torch.cat([rows.reshape(-1), new_rows])
    o = all_r.argsort(stable=True)
    o = o[all_s[o].argsort(descending=True, stable=True)]
    o = o[all_q[o].argsort(stable=True)]
    counts = torch.bincount(all_q, minlength=nq)
    starts = counts.cumsum(0) - counts
    pick = o[(starts[:, None] + torch.arange(k, device=device)).reshape(-1)]
    return all_s[pick].view(nq, k), all_r[pick].view(nq, k)


def _sort_hits(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each line by (score desc, row asc): rows first, then a stable score sort."""
    rows, order = rows.sort(dim=1)
    scores = scores.gather(1, order)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, rows.gather(1, order)


# ── one layer ─────────────────────────────────────────────────────────────────────────


@dataclass
class _Plan:
    compute: torch.dtype
    out_fp32: bool
    bound: FastBound
    chunk: int
    block: int
    group: int
    cap: int  # candidate buffer entries before an early re-rank
    budget: int
    step32: int  # rows per fp32 conversion slice (0: no fp32 step)


def _plan(
    q64: torch.Tensor,
    bank: torch.Tensor,
    norms: RowNorms,
    k: int,
    precision: Precision,
    chunk_bytes: int | None,
    query_block: int,
) -> tuple[_Plan, torch.Tensor]:
    n, d = bank.shape
    device = bank.device
    # zero rows hold norm 1: min/max over all rows can only widen the range (conservative)
    min_norm = float(norms.norm.min()) if n else 1.0
    max_norm = float(norms.norm.max()) if n else 1.0
    compute = compute_dtype(device, bank.dtype, precision, max_norm, min_norm)
    out_fp32 = compute in (torch.float32, torch.float64) or _mm_fp32_out(device.type, compute)
    q_fast = q64.to(compute)
    bound = fast_bound(
        q64,
        q_fast,
        bank.dtype,
        compute,
        out_fp32=out_fp32,
        max_deviation=norms.max_deviation,
        min_norm=min_norm,
    )
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    budget = min(chunk_bytes, max(_MIN_BUDGET, n * d * bank.element_size() // _BANK_FRACTION))
    block = max(1, min(query_block, q64.shape[0]))
    esize = torch.empty((), dtype=compute).element_size()
    row_bytes = esize * d if bank.dtype != compute else 0
    if compute == torch.float64:
        score_bytes = 8
    elif out_fp32:
        score_bytes = 4
    else:
        score_bytes = esize + (4 if bound.scaled else 0)
    chunk = max(64, budget // (row_bytes + score_bytes * block) // 64 * 64)
    chunk = min(chunk, -(-n // 64) * 64)
    # fp16/fp8/fp64 rows reach bf16/fp16 through fp32 (exact, vectorised): in slices
    step32 = 0
    if bank.dtype != compute and compute in _LOW_PRECISION_STORAGE and bank.dtype != torch.float32:
        step32 = min(chunk, max(128, budget // 4 // (4 * d) // 64 * 64))
    group = _GROUP
    while group > 1 and chunk // group < 4 * k:
        group //= 2
    cap = max(4096, budget // 24)
    return _Plan(compute, out_fp32, bound, chunk, block, group, cap, budget, step32), q_fast


class _LayerScan:
    """State of one layer's search over all queries (see the module docstring)."""

    def __init__(
        self,
        q64: torch.Tensor,
        q_fast: torch.Tensor,
        bank: torch.Tensor,
        norms: RowNorms,
        k: int,
        plan: _Plan,
        lower_bound: torch.Tensor | None,
    ) -> None:
        nq = q64.shape[0]
        device = bank.device
        self.q64, self.bank, self.norms, self.k, self.plan = q64, bank, norms, k, plan
        self.q_fast_t = q_fast.T  # [d, Q]
        self.alpha = plan.bound.alpha
        ninf = float("-inf")
        self.run = torch.full((k, nq), ninf, dtype=torch.float32, device=device)
        self.low = torch.full((nq,), ninf, dtype=torch.float64, device=device)
        self.t32 = torch.full((nq,), ninf, dtype=torch.float32, device=device)
        if lower_bound is not None:
            self.low = torch.maximum(self.low, lower_bound.to(device, torch.float64))
            self._set_threshold(slice(None))
        self.top_s = torch.full((nq, k), ninf, dtype=torch.float64, device=device)
        self.top_r = torch.full((nq, k), bank.shape[0], dtype=torch.int64, device=device)
        self.buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.positive: set[int] = set()  # query blocks whose thresholds are all > 0
        self.seeded: set[int] = set()  # query blocks whose run holds a true top-k
        self.buffered = 0
        self.flush_at = plan.cap  # re-rank early when the buffer outgrows its budget
        self.ar_group = torch.arange(plan.group, device=device)
        # fp64 cosine vs. the canonical pair routine differ by at most 2(γ_d + 2u) (u = 2⁻⁵³)
        d = bank.shape[1]
        g64 = d * 2.0**-53 / (1 - d * 2.0**-53)
        self.delta64 = 2.02 * (g64 + 2 * 2.0**-53) + 1e-15

    # thresholds ---------------------------------------------------------------------

    def _set_threshold(self, idx: slice | torch.Tensor) -> None:
        """Recompute the fast-score thresholds of queries ``idx`` from their ``low``."""
        t = self.plan.bound.threshold(self.low[idx], self.alpha[idx])
        # round down to fp32 (relative fp32 rounding < 1e-7): a superset is kept
        self.t32[idx] = (t - 1e-7 * t.abs() - 1e-30).to(torch.float32)

    def _raise_low_from_exact(self) -> None:
        self.low = torch.maximum(self.low, self.top_s[:, -1])
        self._set_threshold(slice(None))

    # scanning -----------------------------------------------------------------------

    def _buffers(self) -> None:
        plan, bank = self.plan, self.bank
        d, device = bank.shape[1], bank.device
        compute = plan.compute
        self.conv32 = self.conv = None
        if bank.dtype != compute:
            self.conv = torch.empty(plan.chunk, d, dtype=compute, device=device)
        if plan.step32:
            self.conv32 = torch.empty(plan.step32, d, dtype=torch.float32, device=device)
        low = compute not in (torch.float32, torch.float64)
        score = torch.float32 if plan.out_fp32 and low else compute
        self.st_buf = None
        if not (plan.out_fp32 and low):
            self.st_buf = torch.empty(plan.chunk * plan.block, dtype=score, device=device)
        self.sf_buf = None
        if plan.bound.scaled and score != torch.float32 and compute != torch.float64:
            self.sf_buf = torch.empty(plan.chunk * plan.block, dtype=torch.float32, device=device)

    def _convert(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in the compute dtype; fp16/fp8/fp64 → bf16/fp16 go through fp32 slices."""
        if self.conv is None:
            return rows
        c = rows.shape[0]
        if self.conv32 is None:
            return self.conv[:c].copy_(rows)
        step = self.conv32.shape[0]
        for s in range(0, c, step):
            part = rows[s : s + step]
            self.conv[s : s + part.shape[0]].copy_(self.conv32[: part.shape[0]].copy_(part))
        return self.conv[:c]

    def _score(self, rows_c: torch.Tensor, start: int, sl: slice) -> torch.Tensor:
        """Fast scores ``[c, nb]`` of converted rows ``rows_c`` against queries ``sl``."""
        plan, norms = self.plan, self.norms
        c, nb = rows_c.shape[0], sl.stop - sl.start
        qt = self.q_fast_t[:, sl]
        if plan.out_fp32 and plan.compute not in (torch.float32, torch.float64):
            st = torch.mm(rows_c, qt, out_dtype=torch.float32)  # CUDA: no output rounding
        else:
            st = torch.mm(rows_c, qt, out=self.st_buf[: c * nb].view(c, nb))
        if plan.bound.scaled:
            if plan.compute == torch.float64:
                st.div_(norms.norm[start : start + c, None])
            elif self.sf_buf is not None:
                inv = norms.inv[start : start + c, None]
                st = torch.mul(st, inv, out=self.sf_buf[: c * nb].view(c, nb))
            else:
                st.mul_(norms.inv[start : start + c, None])
        return st

    def scan(self, rescore: bool = True) -> None:
        plan, n, nq = self.plan, self.bank.shape[0], self.q64.shape[0]
        self._buffers()
        for start in range(0, n, plan.chunk):
            rows_c = self._convert(self.bank[start : start + plan.chunk])
            for qs in range(0, nq, plan.block):
                sl = slice(qs, min(nq, qs + plan.block))
                self._tile(self._score(rows_c, start, sl), start, sl, plan.group, rescore)
        if rescore:
            self._flush()

    def _group_max(self, st: torch.Tensor, g: int, sl: slice) -> torch.Tensor:
        """Maxima ``[G, nb]`` (fp32) of groups of ``g`` rows; each is some row's score."""
        c, nb = st.shape
        cg = c // g * g
        src = st
        if st.element_size() == 2 and sl.start in self.positive:
            # 16-bit floats are sign-magnitude: on values ≥ 0 the integer order of the bits
            # is the float order, and any value ≥ 0 beats every negative one. So the int16
            # maximum is the true maximum whenever that is ≥ 0 and otherwise some negative
            # element of the group, which the threshold (> 0 here) rejects either way.
            # Four to eight times faster than a bf16 reduction on CPU.
            src = st.view(torch.int16)
        gm = src[:cg].view(c // g, g, nb).amax(1)
        if cg < c:
            gm = torch.cat([gm, src[cg:].amax(0, keepdim=True)])
        return gm.view(st.dtype).to(torch.float32)

    def _update_run(self, gm: torch.Tensor, sl: slice) -> None:
        """Merge group maxima into the running top-k of distinct rows' fast scores."""
        upd = (gm > self.run[-1, sl]).any(0).nonzero()[:, 0]  # queries whose k-th rises
        if upd.shape[0] == 0:
            return
        cols = upd + sl.start
        run = torch.cat([self.run[:, cols], gm[:, upd]]).topk(self.k, dim=0, sorted=True).values
        self.run[:, cols] = run
        low = self.plan.bound.lower(run[-1].to(torch.float64), self.alpha[cols])
        self.low[cols] = torch.maximum(self.low[cols], low)
        self._set_threshold(cols)

    def _tile(self, st: torch.Tensor, start: int, sl: slice, g: int, rescore: bool) -> None:
        c, nb = st.shape
        cg = c // g * g
        gm = self._group_max(st, g, sl)
        if sl.start in self.seeded:
            self._update_run(gm, sl)
        else:
            # first tile of this query block: seed the run with the true top-k of its first
            # rows (tighter than their group maxima) and the maxima of the other groups;
            # each row counts once
            self.seeded.add(sl.start)
            head = min(c, max(_SEED_ROWS, self.k) // g * g + g)
            top = st[:head].topk(min(self.k, head), dim=0).values.to(torch.float32)
            self._update_run(torch.cat([top, gm[-(-head // g) :]]), sl)
        t32 = self.t32[sl]
        if sl.start not in self.positive and bool((t32 > 0).all()):
            self.positive.add(sl.start)  # thresholds only rise
        hit = (gm >= t32).nonzero()
        n_hit = hit.shape[0]
        if n_hit == 0:
            return
        if n_hit * g * 2 > c * nb:
            # many groups open (early tiles): one full-tile mask beats gathering the groups
            self._tile_mask(st, start, sl, t32, rescore)
            return
        step = max(1, c * nb // (64 * g))  # bounds the gathered values to 1/64 of the tile
        for h0 in range(0, n_hit, step):
            grp, bq = hit[h0 : h0 + step].unbind(1)
            ridx = grp[:, None] * g + self.ar_group  # [H, g] rows inside the chunk
            if cg < c:
                ridx = ridx.clamp_max(c - 1)  # the tail group repeats its last row
            vals = st[ridx, bq[:, None]].to(torch.float32)
            keep = vals >= self.t32[bq + sl.start][:, None]
            if cg < c:
                keep &= grp[:, None] * g + self.ar_group < c
            h, j = keep.nonzero().unbind(1)
            self.buf.append((bq[h] + sl.start, ridx[h, j] + start, vals[h, j]))
            self.buffered += h.shape[0]
            if rescore and self.buffered > self.flush_at:
                self._flush()  # raises the thresholds for the next slices too

    def _tile_mask(
        self, st: torch.Tensor, start: int, sl: slice, t32: torch.Tensor, rescore: bool
    ) -> None:
        c, nb = st.shape
        t = t32
        if st.dtype != torch.float32:
            # compare in the scores' dtype (no fp32 copy of the tile): t − 2u|t| rounds to
            # a value ≤ t, so the mask is a superset (the extras fail the fp32 test at flush)
            t = (t32 - t32.abs() * (2 * _UNIT_ROUNDOFF[st.dtype])).to(st.dtype)
        mask = st >= t
        if rescore and int(mask.sum()) * 4 > c * nb:
            # a quarter of the tile is candidates (massive duplication): one fp64 matmul
            # pre-filter is cheaper than re-scoring them one by one
            self._dense(start, c, sl.start + mask.any(0).nonzero()[:, 0])
            return
        step = max(1, c // 8)  # row blocks bound the candidate arrays to ~1/8 of the tile
        for r0 in range(0, c, step):
            r, b = mask[r0 : r0 + step].nonzero().unbind(1)
            r += r0
            self.buf.append((b + sl.start, r + start, st[r, b].to(torch.float32)))
            self.buffered += r.shape[0]
            if rescore and self.buffered > self.flush_at:
                self._flush()

    def _flush(self) -> None:
        """Re-rank the buffered candidates exactly and merge them into the running top-k."""
        if not self.buf:
            return
        qi = torch.cat([b[0] for b in self.buf])
        rows = torch.cat([b[1] for b in self.buf])
        f = torch.cat([b[2] for b in self.buf])
        self.buf, self.buffered = [], 0
        alive = f >= self.t32[qi]
        qi, rows, f = qi[alive], rows[alive], f[alive]
        # Stage 1: the candidates at or above the run's k-th fast score (at least k per
        # query) give an exact k-th score; the threshold it implies sits about half-way up
        # the band, so stage 2 re-scores only what is still above it.
        first = f >= self.run[-1][qi]
        if bool(first.any()) and not bool(first.all()):
            self._add_exact(qi[first], rows[first])
            qi, rows, f = qi[~first], rows[~first], f[~first]
            alive = f >= self.t32[qi]
            qi, rows = qi[alive], rows[alive]
        if qi.shape[0]:
            self._add_exact(qi, rows)

    def _add_exact(self, qi: torch.Tensor, rows: torch.Tensor) -> None:
        order = rows.argsort()  # gather bank rows in address order
        qi, rows = qi[order], rows[order]
        s = _pair_scores(self.q64, self.bank, self.norms.norm, qi, rows)
        self.top_s, self.top_r = _merge_topk(self.top_s, self.top_r, qi, rows, s)
        self._raise_low_from_exact()

    def _dense(self, start: int, c: int, qsel: torch.Tensor) -> None:
        """A tile where most pairs are candidates: pre-filter with an fp64 matmul."""
        self._flush()
        d = self.bank.shape[1]
        q = self.q64[qsel]
        step = max(16, self.plan.budget // (8 * (d + qsel.shape[0])))
        for s0 in range(start, start + c, step):
            s1 = min(start + c, s0 + step)
            s64 = (q @ self.bank[s0:s1].to(torch.float64).T).div_(self.norms.norm[s0:s1])
            kk = min(self.k, s1 - s0)
            v = s64.topk(kk, dim=1).values[:, -1]
            if kk < self.k:
                v = torch.full_like(v, float("-inf"))
            # rows with fp64 score < v − 2δ (or < low − δ) have canonical score < S_k
            thr = torch.maximum(v - 2 * self.delta64, self.low[qsel] - self.delta64)
            i, j = (s64 >= thr[:, None]).nonzero().unbind(1)
            if i.shape[0]:
                self._add_exact(qsel[i], j + s0)


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
        :class:`SearchHits` on the first bank's device, ties broken by (bank, row).
    """
    if not banks:
        raise InvalidQueryError("nothing to search: no banks/layers selected")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    d = banks[0].shape[1]
    q64 = prepare_queries(queries, d)
    out_device = banks[0].device
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for b, (bank, nrm) in enumerate(zip(banks, norms, strict=True)):
        if bank.shape[1] != d:
            raise DimensionMismatchError(f"bank {b} has width {bank.shape[1]}, expected {d}")
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
    if best is None:
        raise InvalidQueryError("nothing to search: every selected bank is empty")
    return SearchHits(scores=best[0], bank=best[1], row=best[2])


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
