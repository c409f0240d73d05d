"""Bank rows read from disk on demand, for banks larger than memory.

:class:`FileRows` stands in for a ``[N, d]`` tensor in the search engine: slicing reads a
chunk of rows from the safetensors file with ``os.pread`` into a fresh tensor (freed after
use), and ``index_select`` reads single rows for the exact re-rank. Nothing is mapped into
the process, so its resident memory stays at the engine's chunk budget however large the
bank; the operating system's page cache keeps hot rows fast without counting against it.
fp8 rows are read as stored and upcast per chunk by the engine.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from latentlens.errors import BankFormatError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
}


class FileRows:
    """A read-only ``[N, d]`` matrix living in one tensor of a safetensors file.

    Supports what the search engine needs: ``shape``, ``dtype``, ``device`` (CPU),
    ``element_size()``, ``ndim``, row slicing (``x[a:b]``) and ``index_select(0, idx)``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: str = "embeddings",
        rows: tuple[int, int] | None = None,
    ) -> None:
        """Open ``key`` of the file at ``path`` (optionally only rows ``[start, stop)``).

        Raises:
            BankFormatError: not a safetensors file, missing key, or not a 2-D float tensor.
        """
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n_header,) = struct.unpack("<Q", f.read(8))
                if n_header > 100 * 2**20:
                    raise ValueError("header too large")
                header = json.loads(f.read(n_header))
        except (OSError, ValueError, struct.error) as e:
            raise BankFormatError(f"{self.path} is not a readable safetensors file: {e}") from e
        info = header.get(key)
        if not isinstance(info, dict):
            raise BankFormatError(f"{self.path} has no tensor {key!r}")
        dtype = _DTYPES.get(info.get("dtype", ""))
        shape = info.get("shape", [])
        if dtype is None or len(shape) != 2:
            raise BankFormatError(f"{self.path}: {key!r} must be a 2-D float tensor, got {info}")
        total, self.dim = int(shape[0]), int(shape[1])
        start, stop = rows if rows is not None else (0, total)
        if not 0 <= start <= stop <= total:
            raise BankFormatError(f"rows {start}:{stop} outside {total} rows of {self.path}")
        self._dtype = dtype
        self._row_bytes = self.dim * torch.empty(0, dtype=dtype).element_size()
        data_start = 8 + n_header + int(info["data_offsets"][0])
        self._offset = data_start + start * self._row_bytes
        self._rows = stop - start
        if os.path.getsize(self.path) < self._offset + self._rows * self._row_bytes:
            raise BankFormatError(f"{self.path} is truncated")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    # tensor-like surface used by the engine
    @property
    def shape(self) -> torch.Size:
        """``[N, d]``."""
        return torch.Size((self._rows, self.dim))

    @property
    def ndim(self) -> int:
        """Always 2."""
        return 2

    @property
    def dtype(self) -> torch.dtype:
        """Stored dtype."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Rows are read into CPU memory."""
        return torch.device("cpu")

    def element_size(self) -> int:
        """Bytes per element."""
        return self._row_bytes // self.dim

    def numel(self) -> int:
        """``N · d``."""
        return self._rows * self.dim

    def new_zeros(self, *size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A zero CPU tensor (like ``Tensor.new_zeros``)."""
        return torch.zeros(*size, dtype=dtype or self._dtype)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        n = max(0, stop - start)
        buf = bytearray(n * self._row_bytes)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [view[done:]], self._offset + start * self._row_bytes + done)
            if got <= 0:
                raise BankFormatError(f"unexpected end of {self.path}")
            done += got
        if n == 0:
            return torch.empty(0, self.dim, dtype=self._dtype)
        return torch.frombuffer(buf, dtype=self._dtype).view(n, self.dim)

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, item: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``item`` — a slice with step 1, or an index tensor — as a new CPU tensor."""
        if isinstance(item, torch.Tensor):
            return self.index_select(0, item.reshape(-1)).view(*item.shape, self.dim)
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("FileRows supports contiguous row slices and index tensors")
        start, stop, _ = item.indices(self._rows)
        return self._read(start, stop)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any order, repeats allowed) as a ``[len(index), d]`` tensor."""
        if dim != 0:
            raise ValueError("FileRows selects rows only (dim=0)")
        idx = index.cpu().to(torch.int64)
        out = torch.empty(idx.numel(), self.dim, dtype=self._dtype)
        if idx.numel() == 0:
            return out
        if int(idx.min()) < 0 or int(idx.max()) >= self._rows:
            raise IndexError(f"row index out of range for {self._rows} rows")
        uniq, inverse = torch.unique(idx, return_inverse=True)
        rows = torch.stack([self._read(r, r + 1)[0] for r in uniq.tolist()])
        return rows[inverse]

    def read_all(self) -> torch.Tensor:
        """Every row in memory (for saving or moving to a device)."""
        return self._read(0, self._rows)

    def to(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Load all rows and convert (like ``Tensor.to``); the result lives in memory."""
        return self.read_all().to(*args, **kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"FileRows({self.path.name}, shape={tuple(self.shape)}, dtype={self._dtype})"
