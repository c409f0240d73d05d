"""Banks streamed from disk: same answers as in memory, bounded resident memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentlens import BankFormatError, ContextualIndex
from latentlens.streaming import FileRows


def save_bank(root: Path, n: int, d: int, dtype: str) -> ContextualIndex:
    torch.manual_seed(0)
    meta = [
        {"token_str": f"t{i % 50}", "token_id": i % 50, "caption": f"c{i % 300}", "position": 1}
        for i in range(n)
    ]
    x = {2: torch.randn(n, d) * 3, 5: torch.randn(n, d)}
    index = ContextualIndex.from_tensors(x, meta, dtype=dtype, normalize=dtype != "float8_e4m3fn")
    index.save(root)
    return index


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float32"])
def test_streamed_search_equals_in_memory(tmp_path, dtype):
    index = save_bank(tmp_path / "b", 3000, 24, dtype)
    streamed = ContextualIndex.from_directory(tmp_path / "b", mmap=True)
    assert isinstance(streamed.embeddings(2), FileRows)
    q = torch.randn(9, 24)
    for k in (1, 5, 40):
        got, want = streamed.search_rows(q, k), index.search_rows(q, k)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert streamed.search(q[:2], 3, layers=[5]) == index.search(q[:2], 3, layers=[5])


def test_file_rows_reads_exactly(tmp_path):
    index = save_bank(tmp_path / "b", 100, 8, "bfloat16")
    rows = FileRows(tmp_path / "b" / "layer_02.safetensors")
    full = index.embeddings(2)
    assert rows.shape == full.shape and rows.dtype == torch.bfloat16
    assert torch.equal(rows[10:37], full[10:37]) and torch.equal(rows[95:500], full[95:])
    idx = torch.tensor([7, 3, 7, 99, 0])
    assert torch.equal(rows.index_select(0, idx), full[idx])
    part = FileRows(tmp_path / "b" / "layer_02.safetensors", rows=(40, 60))
    assert torch.equal(part[:], full[40:60])
    with pytest.raises(IndexError):
        rows.index_select(0, torch.tensor([100]))
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(BankFormatError):
        FileRows(tmp_path / "bad.safetensors")
    with pytest.raises(BankFormatError, match="mmap"):
        ContextualIndex.from_directory(tmp_path / "b", mmap=True, dtype="float32")


MEASURE = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from latentlens import ContextualIndex
    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    idx = ContextualIndex.from_directory({bank!r}, mmap=True)
    q = torch.randn(64, 256)
    idx.search_rows(q[:2], 5)
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    idx.search_rows(q, 5)
    print(status("VmHWM") - base, idx.nbytes())
    """
)


def test_streamed_search_memory_stays_bounded(tmp_path):
    """A 100 MiB bank searched from disk raises resident memory by far less than its size."""
    n, d = 200_000, 256
    torch.manual_seed(0)
    meta_n = n
    x = torch.nn.functional.normalize(torch.randn(meta_n, d), dim=1).half()
    from latentlens.bank import Entries

    entries = Entries(
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
        [""],
        {0: "x"},
    )
    ContextualIndex({0: x}, entries).save(tmp_path / "big")
    del x
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", MEASURE.format(root=root, bank=str(tmp_path / "big"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    extra, bank = (int(v) for v in out.stdout.split())
    assert bank == n * d * 2
    assert extra < 0.3 * bank, (
        f"extra resident memory {extra / 2**20:.1f} MiB for a {bank / 2**20:.0f} MiB bank"
    )


def test_file_rows_tensor_indexing(tmp_path):
    index = save_bank(tmp_path / "b", 60, 8, "float16")
    rows = FileRows(tmp_path / "b" / "layer_05.safetensors")
    idx = torch.tensor([[3, 59], [0, 3]])
    assert torch.equal(rows[idx], index.embeddings(5)[idx])
