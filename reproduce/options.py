"""Options shared by the commands of `python -m reproduce` (defined once, used everywhere).

The judge's client options are taken by the pipeline's step 4 (`judge`) and by the
stand-alone `evaluate judge` command alike, and turned into one `JudgeConfig` by
`judge_config`, with the same defaults (reasoning effort and verbosity low for GPT-5
judges: the paper's call; the Responses API for api.openai.com, Chat Completions for any
other server).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import click

from reproduce.judge.client import JudgeConfig

F = Callable[..., Any]


def judge_client_options(fn: F) -> F:
    """The judge client's options: endpoint, model, key, retries, sampling settings."""
    options = [
        click.option(
            "--base-url",
            default=None,
            help="OpenAI-compatible API root [env OPENAI_BASE_URL, else api.openai.com/v1].",
        ),
        click.option(
            "--judge-model",
            "--model",
            "judge_model",
            default=None,
            help="Judge model [env LATENTLENS_JUDGE_MODEL, else gpt-5].",
        ),
        click.option(
            "--api",
            type=click.Choice(["chat", "responses"]),
            default=None,
            help="Chat Completions or the Responses API [default: responses for "
            "api.openai.com (the paper's GPT-5 call), chat for any other server].",
        ),
        click.option(
            "--api-key-env",
            default="OPENAI_API_KEY",
            show_default=True,
            help="Environment variable that holds the API key (unset: no key sent).",
        ),
        click.option(
            "--fake-judge", is_flag=True, help="Judge with the built-in fake judge on 127.0.0.1."
        ),
        click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1)),
        click.option("--max-retries", default=5, show_default=True, type=click.IntRange(0)),
        click.option("--timeout", default=120.0, show_default=True, help="Seconds per request."),
        click.option(
            "--backoff",
            default=2.0,
            show_default=True,
            help="First wait (s, doubling) before asking again after an unusable reply; "
            "HTTP errors are retried by the openai SDK (Retry-After honoured).",
        ),
        click.option(
            "--reasoning-effort",
            default=None,
            help="e.g. low [default: low for gpt-5 judges (the paper), else unset].",
        ),
        click.option(
            "--verbosity",
            type=click.Choice(["low", "medium", "high"]),
            default=None,
            help="Answer length [default: low for gpt-5 judges (the paper), else unset].",
        ),
        click.option("--temperature", type=float, default=None),
        click.option("--max-completion-tokens", type=int, default=None),
        click.option("--image-detail", type=click.Choice(["low", "high", "auto"]), default=None),
        click.option("--extra-body", default=None, help="JSON object merged into every request."),
        click.option(
            "--price",
            default=None,
            metavar="IN,OUT",
            help="USD per million input and output tokens, for --dry-run's cost estimate "
            "[default: the judge model's list price, if known].",
        ),
        click.option("--strict", is_flag=True, help="Exit with status 3 when some patches failed."),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Print the number of judge calls and a token estimate; send and write nothing.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(fn: F) -> F:
    """How the judged patches are drawn: the seed, and whether it is set per layer."""
    options = [
        click.option("--seed", default=42, show_default=True),
        click.option(
            "--seeding",
            type=click.Choice(["per-layer", "once"]),
            default="per-layer",
            show_default=True,
            help="per-layer: a fresh generator seeded --seed for each layer, so every layer "
            "judges the same patches (the paper); once: one generator through all layers "
            "(the released script's behaviour).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def judge_config(opts: dict[str, Any], fake_url: str | None = None) -> JudgeConfig:
    """The `JudgeConfig` of `judge_client_options` values (``fake_url``: the fake judge's)."""
    extra = json.loads(opts["extra_body"]) if opts.get("extra_body") else None
    if extra is not None and not isinstance(extra, dict):
        raise click.BadParameter("--extra-body must be a JSON object")
    model = opts["judge_model"] or ("fake-judge" if fake_url else None)
    price = None
    if opts.get("price"):
        try:
            price = tuple(float(x) for x in opts["price"].split(","))
        except ValueError:
            price = ()
        if len(price) != 2 or any(not x >= 0 for x in price):
            raise click.BadParameter("--price takes IN,OUT: two non-negative numbers")
    config = JudgeConfig.from_env(
        api_key_env=opts["api_key_env"],
        base_url=fake_url or opts["base_url"],
        model=model,
        api=opts.get("api"),
        timeout=opts["timeout"],
        max_retries=opts["max_retries"],
        backoff_base=opts["backoff"],
        temperature=opts["temperature"],
        max_completion_tokens=opts["max_completion_tokens"],
        image_detail=opts["image_detail"],
        extra_body=extra,
        price=price,
    )
    effort, verbosity = opts["reasoning_effort"], opts.get("verbosity")
    if config.model.startswith("gpt-5"):  # the paper's call: both low
        effort, verbosity = effort or "low", verbosity or "low"
    config = dataclasses.replace(config, reasoning_effort=effort, verbosity=verbosity)
    if fake_url:
        config = dataclasses.replace(config, api_key=None)
    return config
