"""Standardised search: cosine after z-scoring every dimension with the layer's own statistics.

A few outlier dimensions (large mean, large spread) can dominate every dot product, so all
cosines sit near 1 and the neighbours ignore the query. Z-scoring each dimension,
``z = (x − μ) / σ`` with the rows' per-dimension mean and standard deviation, removes them.

Exactness. The rows are z-scored once per layer into a cached copy ``Ẑ`` (the bank's dtype;
fp16 for fp8 banks). The exact engine returns the exact top-``K`` over ``Ẑ``; every row's
rounding ``δ_r = ‖Ẑ_r − z_r‖ / ‖z_r‖`` is measured (fp64) when the copy is made, and a
cosine over ``Ẑ`` is within ``2·max δ_r`` of the cosine over the exact ``z_r``. The
candidates are re-scored in fp64 from the stored rows; when the ``K``-th candidate's ``Ẑ``
score plus that slack is below the ``k``-th re-scored one, no other row can enter the top-k,
else ``K`` grows. The answer equals an fp64 brute force over ``(x − μ) / σ`` of the stored
rows, ties broken by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentlens.search import search_layer
from latentlens.search.inputs import RowNorms, prepare_queries
from latentlens.search.precision import Precision

STATS_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class LayerStats:
    """Per-dimension mean and standard deviation of a layer's stored rows.

    Attributes:
        mean: ``[d]`` float64.
        std: ``[d]`` float64 population standard deviation; dimensions without spread
            hold 1 (they are only centred).
        count: rows counted.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int

    def to(self, device: torch.device | str) -> LayerStats:
        """The same statistics on ``device``."""
        return LayerStats(self.mean.to(device), self.std.to(device), self.count)


class RunningStats:
    """Exact mean / variance of rows fed in chunks (Chan et al.'s merge of per-chunk moments,
    in float64), for rows that never sit in memory at once."""

    def __init__(self, d: int) -> None:
        """Start with no rows of width ``d``."""
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        """Count rows ``[m, d]`` (any float dtype, any device)."""
        m = int(rows.shape[0])
        if m == 0:
            return
        x = rows.detach().to("cpu", torch.float64)
        var_b, mean_b = torch.var_mean(x, dim=0, correction=0)  # fused, fp64
        m2_b = var_b * m
        n = self.n + m
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * m / n)
        self.n = n

    def result(self) -> LayerStats:
        """The statistics so far (population standard deviation)."""
        std = (self.m2 / max(self.n, 1)).sqrt()
        return LayerStats(
            self.mean.clone(), torch.where(std > 0, std, torch.ones_like(std)), self.n
        )


def layer_stats(rows: torch.Tensor, chunk_rows: int = STATS_CHUNK_ROWS) -> LayerStats:
    """Exact :class:`LayerStats` of ``rows`` ``[N, d]`` (chunked; float64)."""
    acc = RunningStats(int(rows.shape[1]))
    for start in range(0, int(rows.shape[0]), chunk_rows):
        acc.update(rows[start : start + chunk_rows])
    return acc.result()


@dataclass(frozen=True)
class Standardized:
    """A layer's z-scored copy and what the exact search needs to trust it.

    Attributes:
        rows: ``[N, d]`` ``Ẑ`` in a floating dtype on the bank's device.
        norms: the copy's :class:`RowNorms`.
        slack: ``2 · max_r ‖Ẑ_r − z_r‖ / ‖z_r‖``: how far a cosine over ``Ẑ`` can be from
            the exact one.
        stats: the statistics used.
    """

    rows: torch.Tensor
    norms: RowNorms
    slack: float
    stats: LayerStats


def standardize_rows(
    rows: torch.Tensor, stats: LayerStats, chunk_rows: int = STATS_CHUNK_ROWS
) -> Standardized:
    """Z-score ``rows`` ``[N, d]`` into a copy of the same dtype (fp16 for 8-bit rows)."""
    dtype = rows.dtype if rows.element_size() >= 2 else torch.float16
    mean, std = stats.mean.to(rows.device), stats.std.to(rows.device)
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    worst = 0.0
    for start in range(0, int(rows.shape[0]), chunk_rows):
        z = (rows[start : start + chunk_rows].to(torch.float64) - mean) / std
        stored = z.to(dtype)
        out[start : start + chunk_rows] = stored
        n = z.norm(dim=1)
        err = (stored.to(torch.float64) - z).norm(dim=1)
        rel = torch.where(
            n > 0, err / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n)
        )
        if rel.numel():
            worst = max(worst, float(rel.max()))
    return Standardized(out, RowNorms.of(out), 2.0 * worst, stats)


RESCORE_BYTES = 4 * 2**20  # fp64 working set of one block of re-scored candidates


def exact_z_scores(
    zq: torch.Tensor, rows: torch.Tensor, stats: LayerStats, cand: torch.Tensor
) -> torch.Tensor:
    """fp64 cosines of unit z-scored queries ``zq`` ``[Q, d]`` with the z-scored stored rows
    ``cand`` ``[Q, K]`` (a zero z-scored row scores 0), a block of queries at a time."""
    mean, std = stats.mean.to(zq.device), stats.std.to(zq.device)
    q_block = max(1, RESCORE_BYTES // (8 * max(1, cand.shape[1]) * zq.shape[1]))
    out = torch.empty(cand.shape, dtype=torch.float64, device=zq.device)
    for s in range(0, cand.shape[0], q_block):
        c = cand[s : s + q_block]
        z = (rows[c.reshape(-1)].to(zq.device, torch.float64) - mean) / std
        n = z.norm(dim=1)
        z = z / torch.where(n > 0, n, torch.ones_like(n))[:, None]
        out[s : s + q_block] = (z.view(*c.shape, -1) * zq[s : s + q_block, None, :]).sum(-1)
    return out


def search_standardized(
    queries: torch.Tensor,
    rows: torch.Tensor,
    std: Standardized,
    k: int,
    *,
    precision: Precision = "auto",
    unit_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine of z-scored ``queries`` ``[Q, d]`` against z-scored ``rows``.

    ``unit_queries``: L2-normalise the queries before z-scoring, as the rows were when the
    bank was built normalised (z-scoring happens in the space the rows live in).

    Returns:
        ``(scores [Q, k] float64, rows [Q, k] int64)`` on the CPU, by (score desc, row asc);
        a zero query, or one equal to the mean (no direction left), gets NaN and -1.
    """
    n = int(rows.shape[0])
    stats = std.stats
    d = int(rows.shape[1])
    q = prepare_queries(queries, d, allow_zero=True)  # validated, unit
    if not unit_queries:
        q = torch.as_tensor(queries).reshape(-1, d).to(q.device, torch.float64)
    zq = (q - stats.mean.to(q.device)) / stats.std.to(q.device)
    qn = zq.norm(dim=1)
    live = (qn > 0) & (q != 0).any(dim=1)  # a zero query has no direction either way
    zq = zq / torch.where(live, qn, torch.ones_like(qn))[:, None]
    k = min(k, n)
    scores = torch.full((q.shape[0], k), float("nan"), dtype=torch.float64)
    out_rows = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    todo = live.nonzero()[:, 0]
    want = min(n, max(2 * k, k + 8))
    while todo.numel():
        s_hat, cand = search_layer(zq[todo], std.rows, std.norms, want, precision=precision)
        s_hat, cand = s_hat.cpu(), cand.cpu()
        exact = exact_z_scores(zq[todo], rows, stats, cand.to(rows.device)).cpu()
        order = torch.sort(cand, dim=1, stable=True).indices  # row asc, then score desc:
        exact, cand = exact.gather(1, order), cand.gather(1, order)
        best = exact.argsort(dim=1, descending=True, stable=True)[:, :k]
        top_s, top_r = exact.gather(1, best), cand.gather(1, best)
        if want >= n:
            certified = torch.ones(todo.numel(), dtype=torch.bool)
        else:  # no row outside the candidates can beat the k-th re-scored one
            certified = s_hat[:, -1] + std.slack < top_s[:, -1]
        done = todo[certified]
        scores[done], out_rows[done] = top_s[certified], top_r[certified]
        todo = todo[~certified]
        want = min(n, want * 4)
    return scores, out_rows
