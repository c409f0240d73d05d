"""Search speed and memory against a plain-torch roofline and FAISS, interleaved in one run.

    python benchmarks/bench_search.py          # 2 layers × 200k × 576 fp16, Q=576 (~2 min, CPU)
    python benchmarks/bench_search.py --rows 2500000 --dim 4096 --layers 1 --device cuda

Columns (every method runs once per round, rounds interleaved; times are medians, ratios
are medians of per-round ratios to that round's fp32 matmul, so a noisy shared machine
slows every column alike):
  fp32 matmul      bare [Q, d] × [d, N] in fp32, 4096-row chunks (the roofline)
  bf16 matmul      the same in the fast path's dtype (bf16 on CPU, fp16 on most GPUs):
                   what the fast pass's matmuls cost alone
  faiss flatIP     faiss.IndexFlatIP.search on the same rows as fp32 (CPU; faiss-cpu)
  ours auto        ContextualIndex.search_tensors, default precision: fast scoring,
                   proven bound, fp64 re-rank — the exact answer (what users get)
  ours auto bf16   the same on the bank loaded with dtype="bfloat16" (CPU: no per-chunk
                   fp16 → bf16 conversion, tighter bound)
  ours exact-fp32  precision="exact": fp32 scoring + fp64 re-rank (the reference path)
  fast pass only   the fast pass alone (scoring, thresholds, candidates; no re-rank)
  ours standardize search_tensors(standardize=True): the exact search in z-scored space
                   (its z-scored copy is made once before the rounds; time printed)
GFLOP/s counts 2·Q·N·d for every column. Extra memory = VmHWM during the call minus
VmRSS before it (CPU, after returning freed heap pages), or the CUDA allocator's peak.
The run checks that "ours auto" returns exactly the hits of "ours exact-fp32".
On CUDA, or when fp32 copies of the bank would not fit (--max-copy-gib), the matmul
baselines cycle over one window of rows instead of full copies (same FLOPs).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlens import ContextualIndex  # noqa: E402
from latentlens.bank import Entries  # noqa: E402
from latentlens.search import RowNorms, compute_dtype, fast_pass, prepare_queries  # noqa: E402

CHUNK = 4096


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int, object]:
    """(seconds, extra peak bytes, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _trim()  # hand freed heap pages back, so the peak counts only this call's memory
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS")
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = _status("VmHWM") - base
    return time.perf_counter() - t, max(extra, 0), out


def cpu_flags() -> str:
    """The CPU model and the flags that decide bf16 speed (native vs emulated)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    wanted = (
        "avx2",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
        "avx512_vnni",
        "avx512_fp16",
    )
    return f"{model}; " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def clustered_bank(
    rows: int, dim: int, centers: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Unit rows around random centres (like real banks: many contexts per token)."""
    out = torch.empty(rows, dim, dtype=dtype, device=device)
    for s in range(0, rows, 65536):
        m = min(rows, s + 65536) - s
        x = centers[torch.randint(0, centers.shape[0], (m,))]
        x = x + 0.6 * torch.randn(m, dim) / dim**0.5
        out[s : s + m] = torch.nn.functional.normalize(x, dim=1).to(device, dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000, help="rows per layer")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=576)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--dtype", default="float16", help="bank storage dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument(
        "--bf16-bank",
        choices=("auto", "yes", "no"),
        default="auto",
        help="add the 'ours auto bf16' column (auto: on CPU)",
    )
    ap.add_argument("--max-copy-gib", type=float, default=4.0, help="fp32 baseline copies cap")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    dtype = getattr(torch, args.dtype)
    centers = torch.nn.functional.normalize(torch.randn(4096, args.dim), dim=1)
    layers = {
        i: clustered_bank(args.rows, args.dim, centers, dtype, device) for i in range(args.layers)
    }
    n = args.rows * args.layers
    zeros = torch.zeros(args.rows, dtype=torch.int64)
    entries = Entries(
        token_id=zeros, caption_id=zeros, position=zeros, captions=[""], token_strs={0: "x"}
    )
    index = ContextualIndex(layers, entries)
    q = centers[torch.randint(0, 4096, (args.queries,))]
    q = (q + 0.3 * torch.randn(args.queries, args.dim) / args.dim**0.5).to(device)
    bank_bytes = index.nbytes()

    # the baselines see the same stored rows, widened to their dtype
    low = compute_dtype(device, index.dtype, "fast")
    low_name = str(low).split(".")[-1]
    full_copies = device.type == "cpu" and n * args.dim * 4 <= args.max_copy_gib * 2**30
    if full_copies:
        fp32 = [t.float() for t in layers.values()]
        lowp = [t.to(low) for t in layers.values()]
    else:  # one window per dtype, cycled: same FLOPs, no bank-sized copies
        window = min(args.rows, 16 * CHUNK)
        fp32 = [layers[0][:window].float()]
        lowp = [layers[0][:window].to(low)]
    q32, qlow = q.float(), q.to(low)

    def matmul(qx: torch.Tensor, banks: list[torch.Tensor]) -> None:
        if full_copies:
            for b in banks:
                for s in range(0, b.shape[0], CHUNK):
                    qx @ b[s : s + CHUNK].T
            return
        w = banks[0]
        for s in range(0, n, CHUNK):
            r = s % w.shape[0]
            qx @ w[r : r + min(CHUNK, n - s)].T

    q64 = prepare_queries(q, args.dim)
    norms = [RowNorms.of(t) for t in layers.values()]

    def fast_only() -> int:
        return sum(
            fast_pass(q64, t, nrm, args.top_k)
            for t, nrm in zip(layers.values(), norms, strict=True)
        )

    methods: dict[str, Callable[[], object]] = {
        "fp32 matmul": lambda: matmul(q32, fp32),
        f"{low_name} matmul": lambda: matmul(qlow, lowp),
        "ours auto": lambda: index.search_tensors(q, args.top_k),
        "ours exact-fp32": lambda: index.search_tensors(q, args.top_k, precision="exact"),
        "fast pass only": fast_only,
    }
    t0 = time.perf_counter()
    for layer in index.available_layers:
        index.standardized(layer)
    z_seconds = time.perf_counter() - t0
    methods["ours standardize"] = lambda: index.search_tensors(q, args.top_k, standardize=True)
    want_bf16 = args.bf16_bank == "yes" or (args.bf16_bank == "auto" and device.type == "cpu")
    if want_bf16 and index.dtype != torch.bfloat16:
        index_bf16 = ContextualIndex({i: t.to(torch.bfloat16) for i, t in layers.items()}, entries)
        methods["ours auto bf16"] = lambda: index_bf16.search_tensors(q, args.top_k)
    if not args.no_faiss and device.type == "cpu":
        try:
            import faiss

            faiss_indexes = []
            for b in layers.values():
                fi = faiss.IndexFlatIP(args.dim)
                for s in range(0, b.shape[0], 65536):
                    fi.add(b[s : s + 65536].float().numpy())
                faiss_indexes.append(fi)
            qn = torch.nn.functional.normalize(q32, dim=1).numpy()
            methods["faiss flatIP"] = lambda: [fi.search(qn, args.top_k) for fi in faiss_indexes]
        except ImportError:
            print("(faiss not installed: pip install faiss-cpu for its column)")

    ratios: dict[str, list[float]] = {k: [] for k in methods}
    times: dict[str, list[float]] = {k: [] for k in methods}
    mem: dict[str, int] = dict.fromkeys(methods, 0)
    results: dict[str, object] = {}
    for name, fn in methods.items():  # warm-up (and results for the agreement check)
        results[name] = fn()
    for _ in range(args.repeats):
        round_t = {}
        for name, fn in methods.items():
            t, m, _ = measure(fn, device)
            round_t[name] = t
            times[name].append(t)
            mem[name] = max(mem[name], m)
        for name in methods:
            ratios[name].append(round_t[name] / round_t["fp32 matmul"])

    from latentlens.search.precision import measurements

    ref = results["ours exact-fp32"]
    got = results["ours auto"]
    agree = all(torch.equal(got[i], ref[i]) for i in (1, 2))  # type: ignore[index]
    cands = int(results["fast pass only"])  # type: ignore[call-overload]
    flops = 2.0 * args.queries * n * args.dim
    print(
        f"bank: {args.layers} × {args.rows:,} × {args.dim} {args.dtype} on {device} "
        f"({bank_bytes / 2**20:.0f} MiB), Q={args.queries}, top-{args.top_k}, "
        f"threads={torch.get_num_threads()}, fast dtype={low_name}, "
        f"{args.repeats} interleaved rounds"
        + ("" if full_copies else ", matmul baselines cycle one window")
    )
    head = ("method", "time s", "× fp32 mm", "GFLOP/s", "extra MiB", "% of bank")
    print(f"{head[0]:<17}{head[1]:>8}{head[2]:>11}{head[3]:>9}{head[4]:>11}{head[5]:>10}")
    for name in methods:
        t = statistics.median(times[name])
        print(
            f"{name:<17}{t:>8.3f}{statistics.median(ratios[name]):>11.2f}"
            f"{flops / t / 1e9:>9.1f}{mem[name] / 2**20:>11.1f}"
            f"{100 * mem[name] / bank_bytes:>10.1f}"
        )
    print(
        f"ours auto == ours exact-fp32 (rows and layers): {agree}; "
        f"fast-pass candidates per (query, layer): {cands / (args.queries * args.layers):.1f}"
    )
    print(f"cpu: {cpu_flags()}")
    print(f"precision chosen by measurement (auto): {measurements()}")
    auto_vs_exact = statistics.median(
        a / e for a, e in zip(times["ours auto"], times["ours exact-fp32"], strict=True)
    )
    print(f"ours auto / ours exact-fp32 (median of per-round ratios): {auto_vs_exact:.2f}")
    print(f"standardised copies of all layers made once in {z_seconds:.2f} s")


if __name__ == "__main__":
    main()
