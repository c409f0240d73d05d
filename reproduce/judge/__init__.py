"""The LLM-judge evaluation (SPEC §7): patch sampling, judge client, verdict cache, aggregation.

The reproduce steps call it through ``python -m reproduce.judge judge|aggregate``.
"""

from __future__ import annotations

from reproduce.judge.aggregate import (
    aggregate,
    comparison_table,
    lens_means,
    load_evaluations,
    load_paper_results,
    model_means,
    plot_lens,
    plot_lenses,
    write_report,
)
from reproduce.judge.cache import JudgeCache, read_cache
from reproduce.judge.client import (
    FatalJudgeError,
    JudgeClient,
    JudgeConfig,
    JudgeFailed,
    MalformedReply,
    Verdict,
    parse_verdict,
)
from reproduce.judge.fake import FakeJudge, FakeJudgeServer
from reproduce.judge.judge import (
    CostEstimate,
    Evaluation,
    JudgeRun,
    build_results,
    estimate_cost,
    evaluate,
    judge_patches,
)
from reproduce.judge.plan import PatchTask, plan_tasks
from reproduce.judge.prompt import build_messages, build_prompt
from reproduce.judge.render import judge_views, region_box, render_view
from reproduce.judge.sampling import real_patch_mask, sample_centres, valid_windows
from reproduce.judge.words import candidate_words, expand_to_word
from reproduce.lens_files import load_lens_layer

__all__ = [
    "CostEstimate",
    "Evaluation",
    "FakeJudge",
    "FakeJudgeServer",
    "FatalJudgeError",
    "JudgeCache",
    "JudgeClient",
    "JudgeConfig",
    "JudgeFailed",
    "JudgeRun",
    "MalformedReply",
    "PatchTask",
    "Verdict",
    "aggregate",
    "build_messages",
    "build_prompt",
    "build_results",
    "candidate_words",
    "comparison_table",
    "estimate_cost",
    "evaluate",
    "expand_to_word",
    "judge_patches",
    "judge_views",
    "lens_means",
    "load_evaluations",
    "load_lens_layer",
    "load_paper_results",
    "model_means",
    "parse_verdict",
    "plan_tasks",
    "plot_lens",
    "plot_lenses",
    "read_cache",
    "real_patch_mask",
    "region_box",
    "render_view",
    "sample_centres",
    "valid_windows",
    "write_report",
]
