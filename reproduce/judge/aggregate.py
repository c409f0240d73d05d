"""Aggregate judge results: {lens: {model: {layer: percent}}}, figures, a table beside the paper.

Reads every ``<eval>/<lens>/<model>/evaluation_results.json``. Per (lens, model, layer):
percent = 100 · interpretable / total, rounded to 2 decimals; a model's score is the plain
mean over its layers; a lens's score the plain mean over its models (SPEC §7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from latentlens.atomic import write_json
from reproduce.judge.judge import RESULTS_FILE
from reproduce.judge.names import (
    CONNECTOR_MODELS,
    LENS_LABELS,
    LENSES,
    MODEL_LABELS,
    canonical_lens,
    canonical_model,
)

Failures = Literal["count", "exclude"]
Scores = dict[str, dict[str, dict[str, float]]]  # lens → model → layer (as a string) → percent
PAPER_RESULTS = "paper_results.json"


def load_evaluations(eval_dir: str | Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``lens → model → layer items`` from every ``evaluation_results.json`` under ``eval_dir``.

    The lens is the name of the model folder's parent (known aliases such as ``nn`` or
    ``contextual`` are mapped to ``embeddinglens`` / ``latentlens``); the model is the folder's
    name.
    """
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for f in sorted(Path(eval_dir).rglob(RESULTS_FILE)):
        lens = canonical_lens(f.parent.parent.name)
        with open(f, encoding="utf-8") as fh:
            out.setdefault(lens, {})[f.parent.name] = json.load(fh)
    return out


def layer_percent(item: Mapping[str, Any], failures: Failures = "count") -> float | None:
    """Percent of interpretable patches in one layer item; ``None`` when it has no patch.

    ``failures="count"`` keeps failed patches in the denominator as not interpretable (the
    original's rule); ``"exclude"`` leaves them out. Counted from the patch list when the
    item has one, else from its counts.
    """
    patches = item.get("patches")
    if patches is not None:
        kept = [p for p in patches if failures == "count" or not p.get("failed")]
        total, n_int = len(kept), sum(1 for p in kept if p.get("interpretable"))
    else:
        total = int(item.get("total_count", 0))
        if failures == "exclude":
            total -= int(item.get("failed_count", 0))
        n_int = int(item.get("interpretable_count", 0))
        if total <= 0 and "interpretable_fraction" in item:
            return round(100.0 * float(item["interpretable_fraction"]), 2)
    return round(100.0 * n_int / total, 2) if total > 0 else None


def aggregate(
    source: str | Path | Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    failures: Failures = "count",
) -> Scores:
    """``{lens: {model: {layer: percent}}}`` from an eval folder or :func:`load_evaluations`."""
    evals = load_evaluations(source) if isinstance(source, (str, Path)) else source
    scores: Scores = {}
    for lens, models in evals.items():
        for model, items in models.items():
            layers = {}
            for item in sorted(items, key=lambda it: int(it["layer"])):
                pct = layer_percent(item, failures)
                if pct is not None:
                    layers[str(item["layer"])] = pct
            if layers:
                scores.setdefault(lens, {})[model] = layers
    return scores


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 2)


def model_means(scores: Scores) -> dict[str, dict[str, float]]:
    """``lens → model → mean over its layers``."""
    return {
        lens: {m: _mean(list(ly.values())) for m, ly in models.items()}
        for lens, models in scores.items()
    }


def lens_means(scores: Scores, models: Sequence[str] | None = None) -> dict[str, float]:
    """``lens → plain mean of its models' scores`` (over ``models`` only, when given)."""
    out = {}
    for lens, per_model in model_means(scores).items():
        vals = [v for m, v in per_model.items() if models is None or m in models]
        if vals:
            out[lens] = _mean(vals)
    return out


def load_paper_results() -> dict[str, Any]:
    """The paper's numbers (``reproduce/data/paper_results.json``)."""
    path = Path(__file__).resolve().parents[1] / "data" / PAPER_RESULTS
    return json.loads(path.read_text("utf-8"))


def _layer_axis(
    series: Mapping[str, Mapping[str, float]],
) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Common x positions for several ``name → {layer: value}`` series.

    When every series has the same number of layers they are aligned by rank (so the
    28-layer Qwen2's 26/27 sit with the 32-layer models' 30/31, labelled ``30/26``);
    otherwise by layer number.
    """
    layer_lists = {n: sorted(int(k) for k in s) for n, s in series.items()}
    lengths = {len(v) for v in layer_lists.values()}
    points: dict[str, list[tuple[int, float]]] = {}
    if len(lengths) == 1:
        n = lengths.pop()
        ticks = []
        for i in range(n):
            seen = dict.fromkeys(str(ls[i]) for ls in layer_lists.values())
            ticks.append("/".join(seen))
        for name, ls in layer_lists.items():
            points[name] = [(i, series[name][str(layer)]) for i, layer in enumerate(ls)]
        return points, ticks
    union = sorted({layer for ls in layer_lists.values() for layer in ls})
    pos = {layer: i for i, layer in enumerate(union)}
    for name, ls in layer_lists.items():
        points[name] = [(pos[layer], series[name][str(layer)]) for layer in ls]
    return points, [str(layer) for layer in union]


def _mean_line(points: Mapping[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_x: dict[int, list[float]] = {}
    for pts in points.values():
        for x, y in pts:
            by_x.setdefault(x, []).append(y)
    return [(x, sum(v) / len(v)) for x, v in sorted(by_x.items())]


def _style(ax: Any, ticks: list[str], title: str) -> None:
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("interpretable patches (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_lens(scores: Scores, lens: str) -> Figure:
    """Interpretability by layer for one lens: a line per model and their mean (bold)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    points, ticks = _layer_axis(scores[lens])
    for model, pts in points.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3,
            linewidth=1,
            alpha=0.8,
            label=MODEL_LABELS.get(canonical_model(model) or "", model),
        )
    xs, ys = zip(*_mean_line(points), strict=True)
    ax.plot(xs, ys, color="black", linewidth=2.5, label="mean")
    _style(ax, ticks, f"{LENS_LABELS.get(lens, lens)}: interpretability by layer")
    fig.tight_layout()
    return fig


def plot_lenses(scores: Scores, paper: Mapping[str, Any] | None = None) -> Figure:
    """Interpretability by layer averaged over models, one line per lens.

    With ``paper``, each lens's headline number is drawn as a dashed line of its colour.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    series = {f"{lens}\0{m}": ly for lens, models in scores.items() for m, ly in models.items()}
    points, ticks = _layer_axis(series)
    for i, lens in enumerate(sorted(scores, key=lambda x: (*LENSES, x).index(x))):
        color = f"C{i}"
        mine = {k: v for k, v in points.items() if k.split("\0")[0] == lens}
        xs, ys = zip(*_mean_line(mine), strict=True)
        ax.plot(xs, ys, marker="o", color=color, linewidth=2, label=LENS_LABELS.get(lens, lens))
        ref = (paper or {}).get("lenses", {}).get(lens, {}).get("mean")
        if ref is not None:
            ax.axhline(
                ref,
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"{LENS_LABELS.get(lens, lens)} (paper mean)",
            )
    _style(ax, ticks, "Interpretability by layer, mean over models")
    fig.tight_layout()
    return fig


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def comparison_table(scores: Scores, paper: Mapping[str, Any] | None = None) -> str:
    """A markdown table of each model's score per lens, ours beside the paper's."""
    paper = paper if paper is not None else load_paper_results()
    means = model_means(scores)
    lenses = [ln for ln in LENSES if ln in scores or ln in paper["lenses"]]
    lenses += [ln for ln in scores if ln not in lenses]
    ours_by_canon: dict[str, dict[str, float]] = {}
    extra_models: list[str] = []
    for lens, per_model in means.items():
        for m, v in per_model.items():
            canon = canonical_model(m)
            if canon is None:
                extra_models.append(m)
                canon = m
            ours_by_canon.setdefault(canon, {})[lens] = v
    rows = list(MODEL_LABELS) + [m for m in dict.fromkeys(extra_models) if m not in MODEL_LABELS]

    head = (
        "| Model | "
        + " | ".join(
            f"{LENS_LABELS.get(ln, ln)} (ours) | {LENS_LABELS.get(ln, ln)} (paper)" for ln in lenses
        )
        + " |"
    )
    lines = [head, "|---|" + "---:|" * (2 * len(lenses))]
    for m in rows:
        cells = []
        for ln in lenses:
            ref = paper["lenses"].get(ln, {}).get("models", {}).get(m)
            cells += [_fmt(ours_by_canon.get(m, {}).get(ln)), _fmt(ref)]
        lines.append(f"| {MODEL_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    cells = []
    for ln in lenses:
        vals = [ours_by_canon[m][ln] for m in CONNECTOR_MODELS if ln in ours_by_canon.get(m, {})]
        mine = _fmt(_mean(vals)) if vals else "—"
        if vals and len(vals) < len(CONNECTOR_MODELS):
            mine += f" (n={len(vals)})"
        cells += [mine, _fmt(paper["lenses"].get(ln, {}).get("mean"))]
    lines.append(
        f"| **Mean, {len(CONNECTOR_MODELS)} connector models** | " + " | ".join(cells) + " |"
    )
    return "\n".join(lines)


def layer_table(scores: Scores, lens: str) -> str:
    """A markdown table of one lens's percent per model and layer."""
    models = scores[lens]
    points, ticks = _layer_axis(models)
    lines = ["| Model | " + " | ".join(ticks) + " | mean |", "|---|" + "---:|" * (len(ticks) + 1)]
    for m, pts in points.items():
        row = dict(pts)
        cells = [_fmt(row.get(i)) for i in range(len(ticks))]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(_mean([y for _, y in pts]))} |")
    return "\n".join(lines)


def write_report(eval_dir: str | Path, out_dir: str | Path, *, dpi: int = 150) -> dict[str, Path]:
    """Write the scores (both failure rules), the figures and the markdown report.

    Files: ``interpretability.json`` (failed patches count as not interpretable),
    ``interpretability_excluding_failures.json``, ``interpretability_<lens>.png`` per
    lens, ``interpretability_by_lens.png`` and ``summary.md``.

    Raises:
        FileNotFoundError: no ``evaluation_results.json`` under ``eval_dir``.
    """
    evals = load_evaluations(eval_dir)
    scores = aggregate(evals, "count")
    if not scores:
        raise FileNotFoundError(f"no {RESULTS_FILE} with judged patches under {eval_dir}")
    excl = aggregate(evals, "exclude")
    paper = load_paper_results()
    out = Path(out_dir)
    paths = {
        "scores": out / "interpretability.json",
        "scores_excluding_failures": out / "interpretability_excluding_failures.json",
    }
    write_json(paths["scores"], scores)
    write_json(paths["scores_excluding_failures"], excl)
    order = sorted(scores, key=lambda x: (*LENSES, x).index(x))
    for lens in order:
        paths[f"figure_{lens}"] = out / f"interpretability_{lens}.png"
        plot_lens(scores, lens).savefig(paths[f"figure_{lens}"], dpi=dpi)
    paths["figure_by_lens"] = out / "interpretability_by_lens.png"
    plot_lenses(scores, paper).savefig(paths["figure_by_lens"], dpi=dpi)

    failed = sum(
        int(p.get("failed", False))
        for models in evals.values()
        for items in models.values()
        for item in items
        for p in item.get("patches", [])
    )
    parts = [
        "# Interpretability of visual tokens (LLM judge)",
        "",
        "Percent of judged patches with at least one related candidate word; a model's "
        "score is the mean over its layers.",
        "",
        "## Ours beside the paper",
        "",
        comparison_table(scores, paper),
        "",
        f"Paper: {paper.get('source', '')}",
        "",
    ]
    if failed:
        parts += [
            f"{failed} patch(es) failed to be judged and count as not interpretable above; "
            "leaving them out gives: "
            + ", ".join(f"{LENS_LABELS.get(k, k)} {v:.2f}" for k, v in lens_means(excl).items()),
            "",
        ]
    for lens in order:
        parts += [f"## {LENS_LABELS.get(lens, lens)} by layer", "", layer_table(scores, lens), ""]
    paths["summary"] = out / "summary.md"
    out.mkdir(parents=True, exist_ok=True)
    paths["summary"].write_text("\n".join(parts), encoding="utf-8")
    return paths
