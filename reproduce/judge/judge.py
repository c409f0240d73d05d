"""Judge lens results: plan the patches, ask the judge (concurrently, cached), write the results.

One call of :func:`evaluate` handles one (lens, model) folder, as the original evaluator
did, and writes its ``evaluation_results.json`` (SPEC §8) plus the verdict cache
``judge_cache.jsonl``. Running it again after an interruption sends only the patches
without a cached success, so no patch is billed twice.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from latentlens.atomic import write_json
from reproduce.judge.cache import CACHE_FILE, JudgeCache, read_cache
from reproduce.judge.client import FatalJudgeError, JudgeClient, JudgeConfig, JudgeFailed
from reproduce.judge.names import canonical_lens, default_convention, encoder_for_model
from reproduce.judge.plan import PatchTask, Seeding, plan_tasks
from reproduce.judge.prompt import build_messages, build_prompt
from reproduce.judge.render import (
    RENDER_SIZE,
    Encoder,
    judge_views,
    load_rgb,
    png_data_url,
    region_box,
    render_view,
)
from reproduce.judge.sampling import Convention

log = logging.getLogger(__name__)

RESULTS_FILE = "evaluation_results.json"


@functools.lru_cache(maxsize=64)
def _view(path: str, encoder: Encoder) -> Image.Image:
    return render_view(load_rgb(path), encoder)


def task_messages(task: PatchTask, image_detail: str | None = None) -> list[dict[str, Any]]:
    """The chat messages for one patch: boxed view, instructions, crop."""
    boxed, crop = judge_views(
        _view(task.image_path, task.encoder), task.patch_row, task.patch_col, task.grid
    )
    return build_messages(
        task.candidate_words, png_data_url(boxed), png_data_url(crop), image_detail
    )


def _task_fields(task: PatchTask, key: str, judge_model: str) -> dict[str, Any]:
    return {
        "key": key,
        "lens": task.lens,
        "model": task.model,
        "layer": task.layer,
        "image_idx": task.image_idx,
        "patch_row": task.patch_row,
        "patch_col": task.patch_col,
        "candidate_words": list(task.candidate_words),
        "judge_model": judge_model,
    }


@dataclass
class JudgeRun:
    """What a judge run produced.

    Attributes:
        records: ``key → cache record`` for every planned patch that has one.
        sent: patches sent to the judge by this run.
        reused: patches whose success was already cached.
        failures: records of the patches that failed in this run (not verdicts).
        usage: token usage summed over this run's replies.
    """

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: int = 0
    reused: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)


def judge_patches(
    tasks: Sequence[PatchTask],
    client: JudgeClient,
    cache_path: str | Path,
    *,
    concurrency: int = 8,
    progress: bool = False,
) -> JudgeRun:
    """Judge every patch without a cached success, ``concurrency`` requests at a time.

    Each answer (verdict or failure) is appended to the cache the moment it arrives.

    Raises:
        FatalJudgeError: the judge refused the key, URL or model; the run stops (pending
            requests are cancelled, answers already in flight are still cached).
        RuntimeError: another run holds the cache.
    """
    from tqdm import tqdm

    judge_model = client.config.model
    keyed: dict[str, PatchTask] = {}
    for t in tasks:
        keyed.setdefault(t.key(judge_model), t)
    run = JudgeRun()
    stop = threading.Event()
    fatal: list[FatalJudgeError] = []  # the first fatal error of any worker
    with JudgeCache(cache_path) as cache:
        done = cache.load()
        run.records = {k: done[k] for k in keyed if done.get(k, {}).get("status") == "ok"}
        run.reused = len(run.records)
        pending = [(k, t) for k, t in keyed.items() if k not in run.records]
        run.sent = len(pending)

        def work(key: str, task: PatchTask) -> dict[str, Any]:
            rec = _task_fields(task, key, judge_model)
            try:
                messages = task_messages(task, client.config.image_detail)
            except (OSError, ValueError) as e:  # the image could not be read or drawn
                rec.update(status="failed", error_kind="image", error=str(e), attempts=0)
            else:
                try:
                    reply = client.judge(messages, request_key=key, stop=stop)
                except FatalJudgeError as e:
                    # stop the other workers before any of them sends another request
                    fatal.append(e)
                    stop.set()
                    raise
                except JudgeFailed as e:
                    rec.update(
                        status="failed", error_kind=e.kind, error=str(e), attempts=e.attempts
                    )
                else:
                    rec.update(
                        status="ok",
                        judgment=reply.verdict.to_judgment(),
                        interpretable=reply.verdict.interpretable,
                        usage=reply.usage,
                        attempts=reply.attempts,
                    )
            rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            cache.append(rec)
            return rec

        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="judge")
        try:
            futures = [pool.submit(work, k, t) for k, t in pending]
            for fut in tqdm(
                as_completed(futures),
                total=len(futures),
                disable=not progress,
                desc="judge",
                unit="patch",
            ):
                rec = fut.result()
                run.records[rec["key"]] = rec
                if rec["status"] != "ok":
                    run.failures.append(rec)
                    log.warning(
                        "patch %s failed (%s): %s", rec["key"], rec["error_kind"], rec["error"]
                    )
                for name, value in (rec.get("usage") or {}).items():
                    if isinstance(value, int):
                        run.usage[name] = run.usage.get(name, 0) + value
        except BaseException as e:
            stop.set()  # retries waiting to be sent give up; in-flight answers are cached
            if fatal and not isinstance(e, FatalJudgeError):
                raise fatal[0] from e  # the cause, not another worker's JudgeAborted
            if isinstance(e, KeyboardInterrupt):
                log.warning("interrupted: waiting for the requests in flight to be cached")
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return run


def image_tokens(width: int, height: int) -> int:
    """Rough input tokens of one image (OpenAI's tile rule: 85 + 170 per 512-px tile)."""
    w, h = float(width), float(height)
    s = min(1.0, 2048 / max(w, h))  # fit into 2048², then shortest side at most 768
    w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


# OpenAI's list prices, USD per million (input, output) tokens, standard tier, as of
# 2025-08; only for the dry run's estimate (override with --price IN,OUT).
LIST_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.40),
}


def list_price(model: str) -> tuple[float, float] | None:
    """The list price of ``model`` (a dated snapshot takes its family's), or ``None``."""
    for name in sorted(LIST_PRICES, key=len, reverse=True):
        if model == name or model.startswith(name + "-20"):
            return LIST_PRICES[name]
    return None


@dataclass(frozen=True)
class CostEstimate:
    """What a run would send: calls, patches already cached, a token and a cost estimate.

    ``price``: USD per million (input, output) tokens, when known.
    """

    calls: int
    cached: int
    input_tokens: int
    output_tokens: int
    price: tuple[float, float] | None = None

    @property
    def dollars(self) -> float | None:
        """The estimated cost in USD, or ``None`` without a price."""
        if self.price is None:
            return None
        return (self.input_tokens * self.price[0] + self.output_tokens * self.price[1]) / 1e6

    def describe(self) -> str:
        """One human-readable line."""
        cost = (
            f", about ${self.dollars:,.2f}"
            if self.dollars is not None
            else " (no price known for this model: pass --price IN,OUT)"
        )
        return (
            f"{self.calls} judge calls ({self.cached} patches already cached), about "
            f"{self.input_tokens:,} input and {self.output_tokens:,} output tokens{cost}"
        )


def estimate_cost(
    tasks: Sequence[PatchTask],
    judge_model: str,
    cache_path: str | Path | None = None,
    *,
    output_tokens_per_call: int = 600,
    price: tuple[float, float] | None = None,
) -> CostEstimate:
    """Count the calls a run would make and estimate its tokens and cost, sending nothing.

    Text is taken as 4 characters per token; each image by :func:`image_tokens`; the
    output (reasoning included) as ``output_tokens_per_call``. ``price`` (USD per million
    input, output tokens) defaults to the judge model's list price, if known.
    """
    cached = read_cache(cache_path) if cache_path is not None else {}
    keys = {t.key(judge_model): t for t in tasks}
    pending = [t for k, t in keys.items() if cached.get(k, {}).get("status") != "ok"]
    tokens = 0
    for t in pending:
        left, top, right, bottom = region_box(t.patch_row, t.patch_col, t.grid, RENDER_SIZE)
        tokens += len(build_prompt(t.candidate_words)) // 4 + 10
        tokens += image_tokens(RENDER_SIZE, RENDER_SIZE) + image_tokens(right - left, bottom - top)
    return CostEstimate(
        len(pending),
        len(keys) - len(pending),
        tokens,
        len(pending) * output_tokens_per_call,
        price or list_price(judge_model),
    )


def build_results(
    tasks: Sequence[PatchTask], records: dict[str, dict[str, Any]], judge_model: str
) -> list[dict[str, Any]]:
    """The ``evaluation_results.json`` content: one item per layer, in plan order (SPEC §8).

    ``total_count`` / ``interpretable_fraction`` count failed patches as not interpretable
    (the original's denominator); ``judged_count`` / ``interpretable_fraction_judged``
    leave them out. Failed patches are listed with ``failed: true`` and ``judgment: null``.
    Patches with no record yet are counted in ``pending_count`` only.
    """
    layers: dict[int, dict[str, Any]] = {}
    for t in tasks:
        item = layers.setdefault(
            t.layer,
            {
                "layer": t.layer,
                "method": t.method,
                "grid_size": max(t.grid),
                "grid": list(t.grid),
                "judge_model": judge_model,
                "patches": [],
                "pending_count": 0,
            },
        )
        rec = records.get(t.key(judge_model))
        if rec is None:
            item["pending_count"] += 1
            continue
        patch = {
            "image_idx": t.image_idx,
            "patch_row": t.patch_row,
            "patch_col": t.patch_col,
            "candidate_words": list(t.candidate_words),
        }
        if rec["status"] == "ok":
            patch.update(judgment=rec["judgment"], interpretable=bool(rec["interpretable"]))
        else:
            patch.update(
                judgment=None,
                interpretable=False,
                failed=True,
                error=f"{rec.get('error_kind')}: {rec.get('error')}",
            )
        item["patches"].append(patch)
    out = []
    for item in layers.values():
        patches = item["patches"]
        n_ok = sum(1 for p in patches if not p.get("failed"))
        n_int = sum(1 for p in patches if p["interpretable"])
        item.update(
            interpretable_count=n_int,
            total_count=len(patches),
            interpretable_fraction=n_int / len(patches) if patches else 0.0,
            judged_count=n_ok,
            failed_count=len(patches) - n_ok,
            interpretable_fraction_judged=n_int / n_ok if n_ok else 0.0,
        )
        out.append(item)
    return out


@dataclass
class Evaluation:
    """What :func:`evaluate` did: the plan, the estimate, the run and the results file."""

    tasks: list[PatchTask]
    estimate: CostEstimate
    run: JudgeRun | None = None
    results_path: Path | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    results_dir: str | Path,
    images_dir: str | Path,
    output_dir: str | Path,
    config: JudgeConfig,
    *,
    lens: str | None = None,
    model: str | None = None,
    encoder: Encoder | None = None,
    layers: Sequence[int] | None = None,
    patches_per_layer: int = 100,
    seed: int = 42,
    concurrency: int = 8,
    cache_path: str | Path | None = None,
    dry_run: bool = False,
    convention: Convention | None = None,
    seeding: Seeding = "per-layer",
    input_size: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Plan, judge and write ``<output_dir>/evaluation_results.json`` for one lens and model.

    ``lens`` and ``model`` default to the names of ``output_dir``'s parent and of
    ``output_dir`` (the ``<eval>/<lens>/<model>`` layout that :mod:`aggregate` reads); the
    encoder defaults to the one the model's name points to. With ``dry_run`` nothing is
    sent or written: only the plan and the cost estimate are returned. The patch rule
    (``convention``) defaults to the released evaluator's for the paper's models and to
    the encoder's input for others; ``seeding`` is ``"per-layer"`` (the paper: every layer
    judges the same patches) or ``"once"`` (the released script's single generator).
    """
    output_dir = Path(output_dir)
    lens = canonical_lens(lens or output_dir.parent.name)
    model = model or output_dir.name
    encoder = encoder or encoder_for_model(model)
    convention = convention or default_convention(model)  # type: ignore[assignment]
    cache_path = Path(cache_path) if cache_path is not None else output_dir / CACHE_FILE
    tasks = plan_tasks(
        results_dir,
        images_dir,
        lens=lens,
        model=model,
        encoder=encoder,
        layers=layers,
        patches_per_layer=patches_per_layer,
        seed=seed,
        convention=convention,
        seeding=seeding,
        input_size=input_size,
    )
    estimate = estimate_cost(tasks, config.model, cache_path, price=config.price)
    result = Evaluation(tasks, estimate)
    log.info("%s × %s: %d patches planned; %s", lens, model, len(tasks), estimate.describe())
    if dry_run:
        return result
    with JudgeClient(config) as client:
        result.run = judge_patches(
            tasks, client, cache_path, concurrency=concurrency, progress=progress
        )
    result.results = build_results(tasks, result.run.records, config.model)
    result.results_path = output_dir / RESULTS_FILE
    write_json(result.results_path, result.results)
    return result
