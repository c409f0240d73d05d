"""Search inputs and outputs: validated unit queries, per-row norms, hit tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentlens.errors import BankFormatError, DimensionMismatchError, InvalidQueryError


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
        bad_row: the first row holding NaN or inf (-1 when all rows are finite); a search
            over such a bank is refused (one NaN row would poison every comparison).
    """

    norm: torch.Tensor
    inv: torch.Tensor
    max_deviation: float
    bad_row: int = -1

    @classmethod
    def of(cls, bank: torch.Tensor, chunk_rows: int | None = None) -> RowNorms:
        """Compute the norms of ``bank`` ``[N, d]`` in float64, one chunk at a time.

        Chunks default to 4 MiB of float64 so loading a bank adds little peak memory.
        """
        chunk_rows = chunk_rows or max(1, 4 * 2**20 // (8 * max(1, bank.shape[1])))
        parts = [
            bank[i : i + chunk_rows].to(torch.float64).pow(2).sum(1).sqrt()
            for i in range(0, bank.shape[0], chunk_rows)
        ]
        norm = torch.cat(parts) if parts else bank.new_zeros(0, dtype=torch.float64)
        zero = norm == 0
        inv = torch.where(zero, torch.zeros_like(norm), 1.0 / norm.clamp_min(1e-300))
        norm = torch.where(zero, torch.ones_like(norm), norm)
        finite = torch.isfinite(norm)
        bad_row = -1 if bool(finite.all()) else int((~finite).nonzero()[0])
        dev = float((norm - 1).abs()[finite].max()) if bool(finite.any()) else 0.0
        return cls(norm=norm, inv=inv.to(torch.float32), max_deviation=dev, bad_row=bad_row)

    def check(self, where: str) -> RowNorms:
        """Raise `BankFormatError` when a row holds NaN or inf; returns self."""
        if self.bad_row >= 0:
            raise BankFormatError(
                f"{where}: row {self.bad_row} contains NaN or inf values; a bank must be finite"
            )
        return self


def checked_norms(bank: torch.Tensor, where: str) -> RowNorms:
    """`RowNorms.of(bank)`, refusing non-finite rows (the message names ``where``)."""
    return RowNorms.of(bank).check(where)


# ── run-time path selection ───────────────────────────────────────────────────────────


def prepare_queries(queries: torch.Tensor, d: int, *, allow_zero: bool = False) -> torch.Tensor:
    """Validate and L2-normalise queries in float64.

    Args:
        queries: ``[d]``, ``[Q, d]`` or ``[..., d]`` (leading dims flattened, row-major),
            any float dtype and device.
        d: the bank's hidden size.
        allow_zero: keep zero vectors (as zeros) instead of raising; the caller gives
            them a per-query "no result".

    Returns:
        ``[Q, d]`` float64 unit vectors (or zero rows) on the queries' device.

    Raises:
        DimensionMismatchError: the last dimension is not ``d``.
        InvalidQueryError: no queries, a NaN/inf entry, or (unless ``allow_zero``) a zero
            vector.
    """
    if not isinstance(queries, torch.Tensor):
        queries = torch.as_tensor(queries)
    if queries.ndim == 1:
        queries = queries.unsqueeze(0)
    if queries.ndim > 2 and queries.shape[-1] == d:  # e.g. [1, seq, d] straight from a model
        queries = queries.reshape(-1, d)
    if queries.ndim != 2:
        raise InvalidQueryError(
            f"queries must be [d], [Q, d] or [..., d], got shape {tuple(queries.shape)}"
        )
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
    zero = norms == 0
    if bool(zero.any()):
        if not allow_zero:
            first = int(zero[:, 0].nonzero()[0])
            raise InvalidQueryError(
                f"query {first} is a zero vector: cosine similarity is undefined"
            )
        norms = torch.where(zero, torch.ones_like(norms), norms)
    return q.div_(norms)
