"""Make docs/standardize.png: raw vs standardised LatentLens on a model with outlier dimensions.

    python docs/standardize_figure.py

A tiny random Llama (the test model of tests/test_standardize.py) whose every block adds two
huge constant dimensions, like the massive activations of real LLMs; a bank of 12 sentences;
the tokens of two new sentences as queries. Offline, a few seconds on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentlens.extract import build_index  # noqa: E402
from latentlens.models.hooks import get_hidden_states  # noqa: E402
from tests.test_standardize import CORPUS, outlier_model  # noqa: E402
from tests.tiny import tiny_tokenizer  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model, tok = outlier_model(), tiny_tokenizer()
    index = build_index("tiny-outliers", CORPUS, layers=[2], model=model, tokenizer=tok,
                        show_progress=False)  # fmt: skip
    text = ["the dog plays with a red ball", "white birds fly over the house"]
    enc = tok(text, return_tensors="pt", padding=True)
    with torch.inference_mode():
        states = get_hidden_states(model, layers=[2], **enc)[2]
    mask = enc["attention_mask"].bool()
    queries = states[mask][2:]
    words = [tok.decode([t]) for t in enc["input_ids"][mask][2:].tolist()]
    raw = index.search(queries, top_k=3)
    std = index.search(queries, top_k=3, standardize=True)

    fig, (ax, tx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.5]})
    bins = [i / 50 for i in range(-10, 51)]
    ax.hist([n[0].similarity for n in raw], bins=bins, alpha=0.7, label="raw cosine")
    ax.hist([n[0].similarity for n in std], bins=bins, alpha=0.7, label="standardised")
    ax.set_xlabel("top-1 similarity of each query token")
    ax.set_ylabel("query tokens")
    ax.set_title("two outlier dimensions: every raw cosine ≈ 1")
    ax.legend(loc="upper left")
    i = words.index("ball") if "ball" in words else 0
    lines = [f"query token {words[i]!r} in “{text[0]}”", "", "raw (top-3):"]
    lines += [f"  {n.similarity:.3f}  {n.token_str!r:10} {n.caption}" for n in raw[i]]
    lines += ["", "standardised (top-3):"]
    lines += [f"  {n.similarity:.3f}  {n.token_str!r:10} {n.caption}" for n in std[i]]
    distinct = len({(n[0].caption, n[0].position) for n in raw})
    distinct_std = len({(n[0].caption, n[0].position) for n in std})
    lines += ["", f"distinct top-1 rows over {len(raw)} queries: raw {distinct}, "
              f"standardised {distinct_std}"]  # fmt: skip
    tx.axis("off")
    tx.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8.5)
    fig.tight_layout()
    out = ROOT / "docs" / "standardize.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
