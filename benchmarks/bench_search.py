"""Search speed and memory against a plain-torch roofline and FAISS, interleaved in one run.

    python benchmarks/bench_search.py                       # 2 layers × 200k × 576, Q=576 (~1-2 min, CPU)
    python benchmarks/bench_search.py --rows 2500000 --dim 4096 --layers 1 --device cuda

Columns (median of --repeats interleaved rounds, ratios against the fp32 matmul):
  fp32 matmul   bare [Q, d] × [d, N] in fp32 over fp32 copies of the rows (the roofline)
  bf16 matmul   the same in bf16 (what the fast path's matmuls cost alone)
  faiss         IndexFlatIP.search on fp32 rows (optional: pip install faiss-cpu)
  ours exact    ContextualIndex search, precision="exact"   (fp32 scoring + fp64 re-rank)
  ours fast     ContextualIndex search, precision="fast"    (bf16 scoring + certified fp64 re-rank)
  fast no rerank  the fast pass alone (chunked bf16 scoring + running top-k')
Extra memory = VmHWM after the call minus VmRSS before it (CPU), or the CUDA peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlens import ContextualIndex  # noqa: E402
from latentlens.bank import Entries  # noqa: E402
from latentlens.search import (  # noqa: E402
    DEFAULT_MARGIN,
    _chunk_rows,
    _fast_topk,
    compute_dtype,
    prepare_queries,
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """(seconds, extra peak bytes) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS")
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = _status("VmHWM") - base
    return time.perf_counter() - t, max(extra, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per layer")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=576)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--dtype", default="float16", help="bank storage dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    # Clustered rows (like real banks: many contexts per token) rather than pure noise.
    centers = torch.nn.functional.normalize(torch.randn(4096, args.dim), dim=1)
    layers = {}
    for i in range(args.layers):
        x = centers[torch.randint(0, 4096, (args.rows,))] + 0.6 * torch.randn(args.rows, args.dim) / args.dim**0.5
        layers[i] = torch.nn.functional.normalize(x, dim=1).to(getattr(torch, args.dtype)).to(device)
        del x
    n = args.rows * args.layers
    entries = Entries(
        token_id=torch.zeros(args.rows, dtype=torch.int64),
        caption_id=torch.zeros(args.rows, dtype=torch.int64),
        position=torch.zeros(args.rows, dtype=torch.int64),
        captions=[""],
        token_strs={0: "x"},
    )
    index = ContextualIndex(layers, entries)
    q = (centers[torch.randint(0, 4096, (args.queries,))] + 0.3 * torch.randn(args.queries, args.dim) / args.dim**0.5).to(device)
    bank_bytes = index.nbytes()

    fp32 = [t.float() for t in layers.values()]
    bf16 = [t.to(torch.bfloat16) for t in layers.values()]
    chunk = _chunk_rows(args.queries, args.dim, 8 * 2**20)
    q32, qbf = q.float(), q.to(torch.bfloat16)

    def matmul(qx: torch.Tensor, banks: list[torch.Tensor]) -> None:
        for b in banks:
            for s in range(0, b.shape[0], chunk):
                qx @ b[s : s + chunk].T

    q64 = prepare_queries(q, args.dim)
    compute = compute_dtype(device, index.dtype, "fast")

    def fast_no_rerank() -> None:
        for layer in index.available_layers:
            _fast_topk(q64.to(compute), index.embeddings(layer), None, args.top_k + DEFAULT_MARGIN, compute, chunk)

    methods: dict[str, Callable[[], object]] = {
        "fp32 matmul": lambda: matmul(q32, fp32),
        "bf16 matmul": lambda: matmul(qbf, bf16),
        "ours exact": lambda: index.search_tensors(q, args.top_k, precision="exact"),
        "ours fast": lambda: index.search_tensors(q, args.top_k, precision="fast"),
        "fast no rerank": fast_no_rerank,
    }
    if not args.no_faiss and device.type == "cpu":
        try:
            import faiss

            faiss_indexes = []
            for b in fp32:
                fi = faiss.IndexFlatIP(args.dim)
                fi.add(b.numpy())
                faiss_indexes.append(fi)
            qn = torch.nn.functional.normalize(q32, dim=1).numpy()
            methods["faiss flatIP"] = lambda: [fi.search(qn, args.top_k) for fi in faiss_indexes]
        except ImportError:
            print("(faiss not installed: pip install faiss-cpu for its column)")

    times: dict[str, list[float]] = {k: [] for k in methods}
    mem: dict[str, int] = dict.fromkeys(methods, 0)
    for name, fn in methods.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t, m = measure(fn, device)
            times[name].append(t)
            mem[name] = max(mem[name], m)

    roof = statistics.median(times["fp32 matmul"])
    flops = 2.0 * args.queries * n * args.dim
    print(
        f"bank: {args.layers} × {args.rows:,} × {args.dim} {args.dtype} on {device} "
        f"({bank_bytes / 2**20:.0f} MiB), Q={args.queries}, top-{args.top_k}, "
        f"threads={torch.get_num_threads()}, chunk={chunk} rows"
    )
    print(f"{'method':<16}{'time s':>9}{'× fp32 mm':>11}{'GFLOP/s':>9}{'extra MiB':>11}{'% of bank':>10}")
    for name in methods:
        t = statistics.median(times[name])
        print(
            f"{name:<16}{t:>9.3f}{t / roof:>11.2f}{flops / t / 1e9:>9.1f}"
            f"{mem[name] / 2**20:>11.1f}{100 * mem[name] / bank_bytes:>10.1f}"
        )


if __name__ == "__main__":
    main()
