"""One GPU check, one JSON: exactness, speed against peak, build throughput, memory.

    python benchmarks/gpu_check.py              # paper-shaped bank on cuda (< 5 min on an H200)
    python benchmarks/gpu_check.py --small      # the same checks, tiny sizes (any device)

1. A clustered bank shaped like the paper's (8 layers × 300k × 4096, fp16) is searched
   with 576 queries (one image). For precision "auto" (fp16/bf16 scoring), "fast" and
   "exact" — with TF32 allowed globally, which exact scoring must switch off — the hits
   of a query subset are compared with an fp64 brute force (rows, layers and scores).
2. Time per 576-query image (median of repeats), the fraction of the GPU's dense fp16
   peak it reaches (2·Q·N·d FLOP), and the same for a bare fp16 torch.mm over the bank
   (the roofline measured in the same run).
3. Build throughput (tokens/s) of `build_index` with a small random Llama in fp16.
4. Peak GPU memory (allocator) of each part.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlens import ContextualIndex, build_index  # noqa: E402
from latentlens.bank import Entries  # noqa: E402
from latentlens.search import brute_force  # noqa: E402
from latentlens.search.precision import measurements  # noqa: E402

# Dense fp16/bf16 tensor-core peaks (FLOP/s, no sparsity), by device-name fragment.
PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10": 125e12,
    "4090": 165e12,
    "V100": 125e12,
}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def clustered(rows: int, dim: int, centers: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty(rows, dim, dtype=torch.float16, device=device)
    gen = torch.Generator(device="cpu").manual_seed(rows)
    for s in range(0, rows, 65536):
        m = min(rows, s + 65536) - s
        idx = torch.randint(0, centers.shape[0], (m,), generator=gen).to(device)
        x = centers[idx] + 0.6 * torch.randn(m, dim, device=device) / dim**0.5
        out[s : s + m] = torch.nn.functional.normalize(x, dim=1).half()
    return out


def brute_force_chunked(q: torch.Tensor, banks: list[torch.Tensor], k: int):
    """fp64 reference, chunked (a whole fp64 layer copy would not fit)."""
    best_s = best_b = best_r = None
    for b, bank in enumerate(banks):
        for s in range(0, bank.shape[0], 65536):
            ref = brute_force(q, [bank[s : s + 65536]], k)
            sc, rows = ref.scores, ref.row + s
            lay = torch.full_like(rows, b)
            if best_s is None:
                best_s, best_b, best_r = sc, lay, rows
                continue
            sc = torch.cat([best_s, sc], 1)
            key_b, key_r = torch.cat([best_b, lay], 1), torch.cat([best_r, rows], 1)
            # order: score desc, then layer asc, then row asc
            order = torch.argsort(key_b * bank.shape[0] * 4 + key_r, dim=1, stable=True)
            sc, key_b, key_r = sc.gather(1, order), key_b.gather(1, order), key_r.gather(1, order)
            order = torch.argsort(sc, dim=1, descending=True, stable=True)[:, :k]
            best_s, best_b, best_r = (
                sc.gather(1, order),
                key_b.gather(1, order),
                key_r.gather(1, order),
            )
    return best_s, best_b, best_r


def check_search(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4096, args.dim, device=device), dim=1)
    layers = {i: clustered(args.rows, args.dim, centers, device) for i in range(args.layers)}
    zeros = torch.zeros(args.rows, dtype=torch.int64)
    entries = Entries(zeros, zeros, zeros, [""], {0: "x"})
    index = ContextualIndex(layers, entries)
    q = centers[torch.randint(0, 4096, (args.queries,), device=device)]
    q = q + 0.3 * torch.randn_like(q) / args.dim**0.5
    sub = q[: args.check_queries]
    torch.backends.cuda.matmul.allow_tf32 = True  # globally on: exact scoring must undo it
    banks = [layers[i] for i in sorted(layers)]
    t0 = time.perf_counter()
    ref_s, ref_b, ref_r = brute_force_chunked(sub, banks, args.top_k)
    out: dict = {"brute_force_s": round(time.perf_counter() - t0, 2), "exact": {}}
    flops = 2.0 * args.queries * args.rows * args.layers * args.dim
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    for precision in ("auto", "fast", "exact"):
        scores, layer, row = index.search_rows(sub, args.top_k, precision=precision)
        # same rows and layers in the same order (ties included); scores to fp64 rounding
        # (the re-rank and the reference sum the same products in another order)
        same = bool(torch.equal(row, ref_r.cpu()) and torch.equal(layer, ref_b.cpu()))
        gap = float((scores - ref_s.cpu()).abs().max())
        out["exact"][precision] = same and gap <= 1e-12
        out["exact"][f"max_score_gap_{precision}"] = gap
        index.search_rows(q, args.top_k, precision=precision)  # warm-up at full size
        reset_peak(device)
        times = []
        for _ in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            index.search_rows(q, args.top_k, precision=precision)
            sync(device)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out[f"ms_per_image_{precision}"] = round(1e3 * med, 2)
        out[f"tflops_{precision}"] = round(flops / med / 1e12, 1)
        if peak:
            out[f"fraction_of_fp16_peak_{precision}"] = round(flops / med / peak, 3)
        out[f"peak_gib_{precision}"] = peak_gib(device)
    # roofline: a bare fp16 matmul over the same rows, in 64k-row chunks
    qh = q.half()
    times = []
    for _ in range(args.repeats + 1):
        sync(device)
        t = time.perf_counter()
        for bank in banks:
            for s in range(0, bank.shape[0], 65536):
                qh @ bank[s : s + 65536].T
        sync(device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times[1:])
    out["ms_per_image_bare_fp16_mm"] = round(1e3 * med, 2)
    if peak:
        out["fraction_of_fp16_peak_bare_mm"] = round(flops / med / peak, 3)
    out["auto_over_bare_mm"] = round(out["ms_per_image_auto"] / out["ms_per_image_bare_fp16_mm"], 2)
    out["precision_chosen"] = measurements()
    out["tf32_still_allowed_after"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


def check_build(args: argparse.Namespace, device: torch.device) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(2000)]
    gen = torch.Generator().manual_seed(0)
    sentences = [
        " ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=gen))
        for n in torch.randint(6, 24, (args.sentences,), generator=gen)
    ]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(words) + 2,
        hidden_size=args.build_dim,
        intermediate_size=4 * args.build_dim,
        num_hidden_layers=args.build_layers,
        num_attention_heads=args.build_dim // 128 or 1,
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    n_tokens = sum(len(s.split()) for s in sentences)
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    index = build_index(
        None,
        sentences,
        model=model,
        tokenizer=tokenizer,
        layers=[1, args.build_layers // 2, args.build_layers - 1],
        max_contexts_per_token=None,
        batch_size=256 if device.type == "cuda" else 32,
        show_progress=False,
    )
    sync(device)
    seconds = time.perf_counter() - t
    return {
        "model": f"llama d={args.build_dim} layers={args.build_layers} {dtype}",
        "sentences": len(sentences),
        "tokens": n_tokens,
        "rows_per_layer": index.num_rows(1),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / seconds),
        "peak_gib": peak_gib(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a smoke test anywhere)")
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--queries", type=int, default=576)
    ap.add_argument("--check-queries", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=20_000)
    ap.add_argument("--build-dim", type=int, default=1024)
    ap.add_argument("--build-layers", type=int, default=8)
    args = ap.parse_args()
    if args.small:
        args.rows, args.dim, args.layers, args.queries, args.check_queries = 3000, 256, 2, 64, 16
        args.repeats, args.sentences, args.build_dim, args.build_layers = 2, 200, 128, 4
    device = torch.device(args.device)
    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "bank": f"{args.layers} x {args.rows} x {args.dim} fp16, Q={args.queries}, top-{args.top_k}",
    }
    t = time.perf_counter()
    report["search"] = check_search(args, device)
    report["build"] = check_build(args, device)
    report["total_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(report, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
