"""Which dtype the fast pass multiplies in, and a proven bound on its error.

**Path.** Picked at run time by :func:`compute_dtype`, by *measurement*: the first
search per device, storage dtype and width times one tile in fp32 and in each
low-precision dtype whose bound holds there (bf16 on CPUs whose bf16 kernel passes a
one-time probe that it sums in fp32; fp16 or bf16 on CUDA, fp32 output when
``torch.mm(..., out_dtype=float32)`` exists) and keeps the fastest — never a capability
flag, since CPUs without AVX512-BF16/AMX emulate bf16 at a third of fp32's speed.
``precision="exact"`` forces fp32 scoring (the reference path), ``"fast"`` the
low-precision one whenever valid. Banks stored as bf16 are fastest on CPU (no per-chunk conversion, ``ρ = 0``
below); fp16 rows are converted chunk by chunk through fp32.

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

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["auto", "exact", "fast"]

logger = logging.getLogger(__name__)

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


def _low_precision_candidates(
    device: torch.device, storage: torch.dtype, max_norm: float
) -> list[torch.dtype]:
    """Low-precision compute dtypes whose bound holds on this device (correctness only)."""
    if device.type == "cuda":
        if storage in _LOW_PRECISION_STORAGE:
            if storage == torch.float16 and max_norm > 1e4:
                return [torch.bfloat16]
            return [storage]
        return [torch.bfloat16] if max_norm > 1e4 else [torch.float16]
    if device.type == "cpu" and _bf16_matmul_accumulates_fp32("cpu"):
        return [torch.bfloat16]
    return []


def compute_dtype(
    device: torch.device,
    storage: torch.dtype,
    precision: Precision,
    max_norm: float = 1.0,
    min_norm: float = 1.0,
    d: int | None = None,
) -> torch.dtype:
    """The dtype the fast pass multiplies in, for a bank stored as ``storage``.

    ``exact`` uses fp32. ``fast`` uses the low-precision dtype whenever its bound holds
    (bf16 on CPUs whose bf16 kernel sums in fp32 — native or emulated —, fp16/bf16 on
    CUDA: the stored one when it is 16-bit, bf16 when rows are large enough for fp16
    products to overflow). ``auto`` *measures*: the first search per (device, storage
    dtype, width ``d``) times one representative tile in fp32 and in each valid
    low-precision dtype and keeps the fastest (see :func:`measured_fastest`), so a CPU
    that only emulates bf16 (AVX-512 without AVX512-BF16/AMX: a third of fp32's speed)
    scores in fp32. Banks with row norms outside ``[2⁻⁴⁰, 2⁴⁰]`` (and fp64 banks under
    ``exact``) are scored in fp32/fp64 as the bound requires.
    """
    if precision not in ("auto", "exact", "fast"):
        raise ValueError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    if max_norm > _NORM_RANGE[1] or min_norm < _NORM_RANGE[0]:
        return torch.float64
    if precision == "exact" or storage == torch.float64:
        return torch.float32
    candidates = _low_precision_candidates(device, storage, max_norm)
    if not candidates:
        return torch.float32
    if precision == "fast":
        return candidates[0]
    return measured_fastest(device, storage, d or 1024, tuple(candidates))


_MEASURED: dict[tuple[str, torch.dtype, int, tuple[torch.dtype, ...]], torch.dtype] = {}
_MEASURE_LOCK = threading.Lock()
_TILE_QUERIES = 256  # one query block
_TILE_BYTES = 8 * 2**20  # fp32 rows of the timed tile


def _time_tile(rows: torch.Tensor, qc: torch.Tensor, compute: torch.dtype) -> float:
    """Seconds of what the fast pass does per tile: convert the rows, multiply."""
    sync = torch.cuda.synchronize if rows.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    rc = rows if rows.dtype == compute else rows.to(compute)
    if compute != torch.float32 and _mm_fp32_out(rows.device.type, compute):
        out = torch.mm(rc, qc.T, out_dtype=torch.float32)
    else:
        out = rc @ qc.T
    del out
    sync()
    return time.perf_counter() - t0


def measured_fastest(
    device: torch.device, storage: torch.dtype, d: int, candidates: tuple[torch.dtype, ...]
) -> torch.dtype:
    """The fastest of fp32 and ``candidates`` for tiles of this bank shape, measured once.

    Times one tile (``8 MiB`` of fp32 rows × 256 queries) in each dtype, interleaved,
    median of 3, and keeps a low-precision dtype only when it is at least 10% faster than fp32
    (it also costs a wider bound, so more rows to re-rank). The result is cached for the
    process per (device, storage dtype, width, candidates).
    """
    key = (str(device), storage, int(d), candidates)
    with _MEASURE_LOCK:
        if key in _MEASURED:
            return _MEASURED[key]
        n = max(256, min(8192, _TILE_BYTES // (4 * d)))
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(n, d, generator=gen).div_(math.sqrt(d)).to(device)
        rows = rows.to(storage) if storage in _LOW_PRECISION_STORAGE + _FP8_DTYPES else rows
        q = torch.randn(_TILE_QUERIES, d, generator=gen).to(device)
        qs = {c: q.to(c) for c in (torch.float32, *candidates)}
        for c, qc in qs.items():  # warm up kernels and caches
            _time_tile(rows, qc, c)
        times: dict[torch.dtype, list[float]] = {c: [] for c in qs}
        for _ in range(3):  # interleaved, so a busy machine slows every dtype alike
            for c, qc in qs.items():
                times[c].append(_time_tile(rows, qc, c))
        median = {c: sorted(t)[1] for c, t in times.items()}
        best = min(candidates, key=lambda c: median[c])
        chosen = best if median[best] < 0.9 * median[torch.float32] else torch.float32
        _MEASURED[key] = chosen
        logger.info(
            "search precision on %s for %s rows of width %d: %s (tile times %s)",
            device,
            storage,
            d,
            chosen,
            ", ".join(
                f"{str(c).removeprefix('torch.')} {t * 1e3:.2f} ms" for c, t in median.items()
            ),
        )
        return chosen


def measurements() -> dict[str, str]:
    """The choices :func:`measured_fastest` made in this process (for benchmarks / logs)."""
    return {
        f"{dev} {str(st).removeprefix('torch.')} d={d}": str(c).removeprefix("torch.")
        for (dev, st, d, _), c in _MEASURED.items()
    }


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
        # -inf (a still-empty running top-k) stays -inf: beta * |-inf| is NaN when beta = 0
        low = fast - a - self.beta * fast.abs()
        return torch.where(torch.isfinite(fast), low, fast)

    def threshold(self, low: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The smallest fast score whose largest possible exact cosine is ``≥ low``.

        Solves ``f + α + β|f| = low``; rows below it have exact cosine ``< low``.
        """
        a = self.alpha if alpha is None else alpha
        x = low - a
        t = torch.where(x >= 0, x / (1 + self.beta), x / (1 - self.beta))
        return torch.where(torch.isfinite(low), t, low)


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
    return _coefficients(e_q, q64.shape[1], storage, compute, out_fp32, max_deviation, min_norm)


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
