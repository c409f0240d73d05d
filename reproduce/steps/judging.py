"""Steps 4–5: the LLM judge over every (lens, model) folder, then scores, figures and the table.

Both are :mod:`reproduce.judge`, wired to the run's folders. The judge's verdict
cache makes step 4 resumable without judging a patch twice; a (lens, model) whose
``evaluation_results.json`` is complete (no pending or failed patch, same judge model,
newer than its lens files) is skipped. Failed patches are reported and retried by the
next run, never counted as verdicts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reproduce.judge.aggregate import write_report
from reproduce.judge.client import JudgeConfig
from reproduce.judge.judge import RESULTS_FILE, evaluate
from reproduce.judge.names import LENSES
from reproduce.judge.plan import Seeding
from reproduce.layout import Layout, read_json_or_none
from reproduce.lens_files import find_layer_files

logger = logging.getLogger(__name__)


@dataclass
class JudgeOutcome:
    """What step 4 did for one (lens, model)."""

    lens: str
    model: str
    status: str  # "judged", "skipped" (complete), "missing" (no lens files) or "dry-run"
    sent: int = 0
    reused: int = 0
    failed: int = 0
    total: int = 0
    interpretable: int = 0
    estimate: str = ""
    dollars: float | None = None

    def describe(self) -> str:
        """One line for the log."""
        if self.status == "missing":
            return f"{self.lens:>13} × {self.model:<12} no lens files (run step 3)"
        if self.status == "dry-run":
            return f"{self.lens:>13} × {self.model:<12} dry run: {self.estimate}"
        head = f"{self.lens:>13} × {self.model:<12} {self.status:<7}"
        body = f"{self.interpretable}/{self.total} interpretable"
        if self.status == "judged":
            body += f"; sent {self.sent}, reused {self.reused}"
        if self.failed:
            body += f"; {self.failed} FAILED (not counted as verdicts; run again to retry)"
        return f"{head} {body}"


def _layer_files(results_dir: Path) -> dict[int, Path]:

    return find_layer_files(results_dir) if results_dir.is_dir() else {}


def _counts(items: list[dict[str, Any]]) -> tuple[int, int, int]:
    total = sum(int(it.get("total_count", 0)) for it in items)
    interpretable = sum(int(it.get("interpretable_count", 0)) for it in items)
    failed = sum(int(it.get("failed_count", 0)) for it in items)
    return total, interpretable, failed


def judge_done(results: Path, lens_files: dict[int, Path], judge_model: str) -> bool:
    """Whether ``results`` is a complete judgement of these lens files by ``judge_model``."""
    items = read_json_or_none(results)
    if not isinstance(items, list) or not items or not lens_files:
        return False
    if {int(it.get("layer", -1)) for it in items} != set(lens_files):
        return False
    if any(it.get("pending_count") or it.get("failed_count") for it in items):
        return False
    if any(it.get("judge_model") != judge_model for it in items):
        return False
    newest = max(p.stat().st_mtime for p in lens_files.values())
    return results.stat().st_mtime >= newest


def judge_all(
    layout: Layout,
    models: Sequence[str],
    config: JudgeConfig,
    *,
    lenses: Sequence[str] = LENSES,
    patches_per_layer: int = 100,
    seed: int = 42,
    seeding: Seeding = "per-layer",
    concurrency: int = 8,
    force: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> list[JudgeOutcome]:
    """Judge every (lens, model) of the run that has lens files (SPEC §7).

    Args:
        layout: the run's folders.
        models: model names.
        config: the judge endpoint and model.
        lenses: lens names.
        patches_per_layer: patches judged per layer (one per image, in index order).
        seed: sampling seed.
        seeding: ``"per-layer"`` (the paper: a fresh generator per layer, so every layer
            judges the same patches) or ``"once"`` (the released script).
        concurrency: requests in flight.
        force: rebuild complete results too (cached verdicts are reused, not re-asked).
        dry_run: plan and estimate every (lens, model) that is not complete, sending and
            writing nothing.
        progress: progress bars.

    Returns:
        One :class:`JudgeOutcome` per (lens, model).
    """

    outcomes = []
    for model in models:
        for lens in lenses:
            results_dir = layout.lens_dir(lens, model)
            files = _layer_files(results_dir)
            out = layout.eval_dir(lens, model)
            if not files:
                outcomes.append(JudgeOutcome(lens, model, "missing"))
                continue
            results = out / RESULTS_FILE
            if not force and judge_done(results, files, config.model):
                total, n_int, failed = _counts(read_json_or_none(results))
                outcomes.append(JudgeOutcome(lens, model, "skipped", 0, 0, failed, total, n_int))
                logger.debug("step 4: %s × %s already judged", lens, model)
                continue
            logger.info("step 4: judging %s × %s", lens, model)
            ev = evaluate(
                results_dir,
                layout.images,
                out,
                config,
                lens=lens,
                model=model,
                patches_per_layer=patches_per_layer,
                seed=seed,
                seeding=seeding,
                concurrency=concurrency,
                progress=progress,
                dry_run=dry_run,
            )
            if dry_run:
                est = ev.estimate
                outcomes.append(
                    JudgeOutcome(
                        lens,
                        model,
                        "dry-run",
                        sent=est.calls,
                        reused=est.cached,
                        estimate=est.describe(),
                        dollars=est.dollars,
                    )
                )
                continue
            run = ev.run
            total, n_int, failed = _counts(ev.results)
            outcomes.append(
                JudgeOutcome(
                    lens,
                    model,
                    "judged",
                    run.sent if run else 0,
                    run.reused if run else 0,
                    failed,
                    total,
                    n_int,
                )
            )
    return outcomes


def report_done(layout: Layout) -> bool:
    """Whether the report is newer than every ``evaluation_results.json``."""
    scores = layout.report / "interpretability.json"
    summary = layout.report / "summary.md"
    if not (scores.exists() and summary.exists()) or read_json_or_none(scores) is None:
        return False
    if not any(layout.report.glob("interpretability_*.png")):
        return False
    results = list(layout.eval.rglob(RESULTS_FILE)) if layout.eval.is_dir() else []
    newest = max((p.stat().st_mtime for p in results), default=0.0)
    return min(scores.stat().st_mtime, summary.stat().st_mtime) >= newest


def aggregate_step(layout: Layout, *, force: bool = False, dpi: int = 150) -> dict[str, Path]:
    """Step 5: ``{lens: {model: {layer: percent}}}``, figures and the table beside the paper.

    Returns:
        The report's files by name (empty when skipped).

    Raises:
        FileNotFoundError: nothing judged yet.
    """

    if not force and report_done(layout):
        logger.info("step 5: the report is newer than every judged result (%s)", layout.report)
        return {}
    return write_report(layout.eval, layout.report, dpi=dpi)
