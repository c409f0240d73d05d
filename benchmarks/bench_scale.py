"""Sharded search over gloo processes, and the cost and recall of fp8 / fp16 banks.

    python benchmarks/bench_scale.py                 # synthetic 2 × 200k × 576 bank, 1-3 ranks, + recall
    python benchmarks/bench_scale.py --skip-recall --worlds 1,2,4 --rows 1000000

Part 1 — ``DistributedIndex`` on 1, 2, 3 gloo processes (torch threads split evenly between
ranks, so the total compute is the same): search time of Q queries (max over ranks) and
peak resident memory per rank (VmHWM), against one in-process ``ContextualIndex``.
Part 2 — a realistic bank (SmolLM2-135M hidden states of the bundled captions, raw rows
stored fp32 / fp16 / fp8 e4m3) searched with held-out sentences' token states: time per
dtype and recall@5 of fp16 and fp8 against fp32.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlens import ContextualIndex  # noqa: E402
from latentlens.bank import Entries  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_bank(root: Path, layers: int, rows: int, dim: int) -> None:
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4096, dim), dim=1)
    tensors = {}
    for i in range(layers):
        x = centers[torch.randint(0, 4096, (rows,))] + 0.6 * torch.randn(rows, dim) / dim**0.5
        tensors[i] = torch.nn.functional.normalize(x, dim=1).half()
    entries = Entries(
        torch.zeros(rows, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64),
        [""],
        {0: "x"},
    )
    ContextualIndex(tensors, entries).save(root)


def _rank_main(
    r: int, world: int, port: int, root: str, queries: torch.Tensor, repeats: int, out: str
) -> None:
    from latentlens.sharded import DistributedIndex

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    idx = DistributedIndex(root)
    idx.search_rows(queries[:8], 5)  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        idx.search_rows(queries, 5)
        times.append(time.perf_counter() - t)
    torch.save({"time": statistics.median(times), "mem": _status("VmHWM") - base}, f"{out}.{r}")
    dist.destroy_process_group()


def part_sharded(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bank"
        synthetic_bank(root, args.layers, args.rows, args.dim)
        bank_mib = args.layers * args.rows * args.dim * 2 / 2**20
        queries = torch.randn(args.queries, args.dim)
        single = ContextualIndex.from_directory(root)
        single.search_rows(queries[:8], 5)
        t = time.perf_counter()
        for _ in range(args.repeats):
            single.search_rows(queries, 5)
        t_single = (time.perf_counter() - t) / args.repeats
        print(
            f"bank {args.layers} × {args.rows:,} × {args.dim} fp16 ({bank_mib:.0f} MiB), Q={args.queries}, top-5"
        )
        print(f"{'ranks':<8}{'time s':>9}{'× 1 process':>13}{'peak MiB/rank':>15}{'% of bank':>11}")
        print(f"{'(index)':<8}{t_single:>9.3f}{1.0:>13.2f}{'-':>15}{'-':>11}")
        for world in args.worlds:
            out = str(Path(tmp) / f"res{world}")
            mp.spawn(
                _rank_main,
                args=(world, _free_port(), str(root), queries, args.repeats, out),
                nprocs=world,
                join=True,
            )
            res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
            tm = max(x["time"] for x in res)
            mem = max(x["mem"] for x in res) / 2**20
            print(
                f"{world:<8}{tm:>9.3f}{tm / t_single:>13.2f}{mem:>15.0f}{100 * mem / bank_mib:>11.0f}"
            )


def part_recall(args: argparse.Namespace) -> None:
    from latentlens.corpus import load_corpus
    from latentlens.demo import demo_corpus_path
    from latentlens.extract import build_index, tokenize
    from latentlens.models.hooks import get_hidden_states
    from latentlens.models.loading import load_smollm2

    model, tok = load_smollm2()
    captions = load_corpus(demo_corpus_path())
    bank_caps, query_caps = captions[:260], captions[260:]
    layers = [8, 16, 24]
    ref = build_index(
        "smollm2",
        bank_caps,
        layers=layers,
        model=model,
        tokenizer=tok,
        show_progress=False,
        sampling="first",
        max_contexts_per_token=None,
        skip_first=0,
        dedup=False,
        normalize=False,
        storage_dtype="float32",
    )
    vecs = []
    with torch.inference_mode():
        for ids in tokenize(tok, query_caps, 512):
            h = get_hidden_states(model, layers=layers, input_ids=torch.tensor([ids]))
            vecs.append(torch.cat([h[x][0] for x in layers]))
    queries = torch.cat(vecs).float()
    banks = {"float32": ref}
    for dt in ("float16", "float8_e4m3fn"):
        with tempfile.TemporaryDirectory() as tmp:
            ref.save(tmp, dtype=dt)
            banks[dt] = ContextualIndex.from_directory(tmp)
    want = ref.search_rows(queries, 5)
    print(
        f"\nrealistic bank: SmolLM2-135M raw hidden states of {len(bank_caps)} captions, layers {layers}, "
        f"{len(ref):,} rows; {queries.shape[0]:,} queries (token states of {len(query_caps)} held-out captions)"
    )
    print(f"{'dtype':<16}{'MiB':>8}{'time s':>9}{'recall@5 vs fp32':>18}{'top-1 agree':>13}")
    for name, idx in banks.items():
        t = time.perf_counter()
        got = idx.search_rows(queries, 5)
        dt = time.perf_counter() - t
        hits = 0
        for a_l, a_r, b_l, b_r in zip(
            got[1].tolist(), got[2].tolist(), want[1].tolist(), want[2].tolist()
        ):
            hits += len(set(zip(a_l, a_r)) & set(zip(b_l, b_r)))
        top1 = (
            torch.stack([got[1][:, 0], got[2][:, 0]]) == torch.stack([want[1][:, 0], want[2][:, 0]])
        ).all(0)
        print(
            f"{name:<16}{idx.nbytes() / 2**20:>8.1f}{dt:>9.3f}{hits / (5 * queries.shape[0]):>18.4f}"
            f"{float(top1.float().mean()):>13.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--skip-sharded", action="store_true")
    ap.add_argument("--skip-recall", action="store_true")
    args = ap.parse_args()
    if not args.skip_sharded:
        part_sharded(args)
    if not args.skip_recall:
        part_recall(args)


if __name__ == "__main__":
    main()
