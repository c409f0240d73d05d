"""Bank build time against the bare forward passes it needs, interleaved in one run.

    python benchmarks/bench_extract.py            # SmolLM2-135M, bundled demo captions, CPU

Columns (median of --repeats interleaved rounds):
  truncated forward   the same length-sorted batches through get_hidden_states, stopped at
                      the deepest bank layer (the roofline: a build cannot do less)
  full forward        model(..., output_hidden_states=True): every layer, final norm and
                      logits (what the original release runs)
  build_index         the whole build: tokenise, plan, forward, gather, normalise, store
Target: build ≤ 1.15 × truncated forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlens.corpus import load_corpus  # noqa: E402
from latentlens.demo import demo_corpus_path  # noqa: E402
from latentlens.extract import _decoder, auto_layers, build_index, tokenize  # noqa: E402
from latentlens.models.hooks import get_hidden_states  # noqa: E402
from latentlens.models.loading import load_smollm2  # noqa: E402
from latentlens.models.registry import num_layers  # noqa: E402
from latentlens.selection import plan_entries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", default=str(demo_corpus_path()))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default=None, help="comma-separated (default auto)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    sentences = load_corpus(args.corpus)
    layers = (
        [int(x) for x in args.layers.split(",")] if args.layers else auto_layers(num_layers(model))
    )
    ids = tokenize(tok, sentences, 512)
    plan = plan_entries(ids, _decoder(tok), cap=50)
    wanted = sorted(set(plan.sentence), key=lambda s: (-len(ids[s]), s))
    batches = []
    for b in range(0, len(wanted), args.batch_size):
        chunk = wanted[b : b + args.batch_size]
        width = max(len(ids[s]) for s in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        m = torch.zeros_like(x)
        for r, s in enumerate(chunk):
            x[r, : len(ids[s])] = torch.tensor(ids[s])
            m[r, : len(ids[s])] = 1
        batches.append((x, m))

    @torch.inference_mode()
    def truncated() -> None:
        for x, m in batches:
            get_hidden_states(model, layers=layers, input_ids=x, attention_mask=m)

    @torch.inference_mode()
    def full() -> None:
        for x, m in batches:
            model(input_ids=x, attention_mask=m, output_hidden_states=True, use_cache=False)

    def build() -> None:
        build_index(
            "smollm2",
            sentences,
            layers=layers,
            model=model,
            tokenizer=tok,
            batch_size=args.batch_size,
            show_progress=False,
        )

    methods = {"truncated forward": truncated, "full forward": full, "build_index": build}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    n_tok = sum(len(i) for i in ids)
    roof = statistics.median(times["truncated forward"])
    print(
        f"SmolLM2-135M, {len(sentences)} sentences ({n_tok:,} tokens), layers {layers}, "
        f"{len(plan):,} entries, batch {args.batch_size}, threads {torch.get_num_threads()}"
    )
    print(f"{'method':<20}{'time s':>9}{'× truncated':>13}{'sent/s':>9}")
    for name in methods:
        t = statistics.median(times[name])
        print(f"{name:<20}{t:>9.3f}{t / roof:>13.2f}{len(sentences) / t:>9.0f}")


if __name__ == "__main__":
    main()
