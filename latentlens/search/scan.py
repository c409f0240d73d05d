"""The per-layer scan: fast-scored tiles, running thresholds, candidate re-rank in fp64.

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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from latentlens.search.inputs import RowNorms
from latentlens.search.precision import (
    _LOW_PRECISION_STORAGE,
    _UNIT_ROUNDOFF,
    FastBound,
    Precision,
    _mm_fp32_out,
    compute_dtype,
    fast_bound,
)

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


_PRECISION_LOCK = threading.RLock()


@contextlib.contextmanager
def _full_precision_reductions(device: torch.device) -> Iterator[None]:
    """On CUDA, true fp32 matmuls: no TF32, no reduced-precision split-K reductions.

    The bound assumes fp32 accumulation with u = 2⁻²⁴ (TF32 rounds inputs to 10 bits). The
    flags are process-global, so they are set under a lock that is held until they are
    restored: concurrent searches from several threads cannot restore them mid-way.
    """
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    with _PRECISION_LOCK:
        saved = (
            m.allow_tf32,
            m.allow_fp16_reduced_precision_reduction,
            m.allow_bf16_reduced_precision_reduction,
        )
        m.allow_tf32 = False
        m.allow_fp16_reduced_precision_reduction = False
        m.allow_bf16_reduced_precision_reduction = False
        try:
            yield
        finally:
            (
                m.allow_tf32,
                m.allow_fp16_reduced_precision_reduction,
                m.allow_bf16_reduced_precision_reduction,
            ) = saved


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
    compute = compute_dtype(device, bank.dtype, precision, max_norm, min_norm, d)
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
