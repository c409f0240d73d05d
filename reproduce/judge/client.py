"""The judge's client: the official ``openai`` SDK (an optional extra), plus what it does not do.

Two APIs: the Responses API (OpenAI's GPT-5 as the paper called it: reasoning effort and
verbosity low) and Chat Completions (any OpenAI-compatible server: vLLM, llama.cpp, …).
The SDK sends, times out and retries (HTTP 408/409/429/5xx, time-outs and connection
errors, with exponential back-off and ``Retry-After``/``retry-after-ms`` honoured). Ours:
verdict parsing (an unusable reply is asked again, up to ``max_retries`` times), the
classification of failures (a wrong key, URL, model or an unsupported parameter stops the
whole run; a reply cut by the token limit fails that patch with a hint and is never
re-sent), exact request counts, and a stop switch that keeps every worker from sending
another request once it is set.

``pip install -e ".[judge]"`` installs the SDK.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-5"
PATCH_KEY_HEADER = "X-LatentLens-Patch-Key"  # ignored by real servers; the fake one counts by it
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_NO_KEY = "no-key"  # the SDK insists on a key; local servers started without one ignore it

Api = Literal["chat", "responses"]
APIS: tuple[Api, ...] = ("chat", "responses")

FailureKind = Literal[
    "rate_limit", "server", "timeout", "connection", "malformed", "http", "aborted", "length"
]
_WORD_LISTS = ("concrete_words", "abstract_words", "global_words")


class JudgeError(Exception):
    """Base class of the judge client's errors."""


class RetryableError(JudgeError):
    """A request that may succeed if sent again (rate limit, 5xx, time-out, bad reply)."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind = kind


class MalformedReply(RetryableError):
    """The reply holds no valid verdict."""

    def __init__(self, message: str):
        super().__init__("malformed", message)


class PermanentError(JudgeError):
    """This request cannot succeed (e.g. HTTP 400); it fails at once, the run goes on."""

    kind: FailureKind = "http"


class TruncatedReply(PermanentError):
    """The reply hit the token limit (``finish_reason == "length"``): re-sending it would
    be billed again and cut again, so the patch fails at once with a hint."""

    kind: FailureKind = "length"


class FatalJudgeError(JudgeError):
    """No request can succeed (wrong key, URL or model): the run must stop."""


class JudgeAborted(JudgeError):
    """The run was stopped while this request waited to be retried."""


class JudgeFailed(JudgeError):
    """A request that failed for good, after its retries.

    Attributes:
        kind: the last failure's kind. attempts: requests sent.
    """

    def __init__(self, kind: FailureKind, message: str, attempts: int):
        super().__init__(message)
        self.kind = kind
        self.attempts = attempts


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one patch.

    ``interpretable`` is ours: true when any of the three lists is non-empty. The judge's
    own ``interpretable`` field is kept (``judge_interpretable``) but never used.
    """

    concrete_words: tuple[str, ...]
    abstract_words: tuple[str, ...]
    global_words: tuple[str, ...]
    reasoning: str = ""
    judge_interpretable: bool | None = None

    @property
    def interpretable(self) -> bool:
        """Whether any candidate word is related to the region (in any of the three ways)."""
        return bool(self.concrete_words or self.abstract_words or self.global_words)

    def to_judgment(self) -> dict[str, Any]:
        """The verdict as the original evaluator stores it (``judgment`` of a patch)."""
        return {
            "reasoning": self.reasoning,
            "interpretable": self.judge_interpretable,
            "concrete_words": list(self.concrete_words),
            "abstract_words": list(self.abstract_words),
            "global_words": list(self.global_words),
        }


def parse_verdict(text: str) -> Verdict:
    """Read the verdict from a reply: the JSON between its first ``{`` and its last ``}``.

    The three word lists must be present and be lists of strings (``null`` counts as
    empty); ``reasoning`` must be a string when present.

    Raises:
        MalformedReply: no JSON object, invalid JSON, or a field of the wrong type.
    """
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        raise MalformedReply(f"no JSON object in the reply: {text[:200]!r}")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise MalformedReply(f"invalid JSON in the reply ({e}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise MalformedReply("the reply's JSON is not an object")
    lists: dict[str, tuple[str, ...]] = {}
    for name in _WORD_LISTS:
        if name not in obj:
            raise MalformedReply(f"the verdict has no {name!r}")
        value = obj[name] if obj[name] is not None else []
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            raise MalformedReply(f"{name!r} is not a list of strings: {value!r:.200}")
        lists[name] = tuple(value)
    reasoning = obj.get("reasoning", "")
    if not isinstance(reasoning, str):
        raise MalformedReply("'reasoning' is not a string")
    own = obj.get("interpretable")
    return Verdict(
        lists["concrete_words"],
        lists["abstract_words"],
        lists["global_words"],
        reasoning,
        own if isinstance(own, bool) else None,
    )


def default_api(base_url: str) -> Api:
    """``"responses"`` for OpenAI's own API (the paper's call), ``"chat"`` for any other server."""
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    return "responses" if host == "api.openai.com" else "chat"


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge.

    Attributes:
        base_url: API root (a local vLLM server: ``http://localhost:8000/v1``).
        model: the judge model's name.
        api: ``"responses"`` or ``"chat"``; ``None`` picks by ``base_url``
            (:func:`default_api`).
        api_key: sent as a bearer token; ``None`` sends a placeholder (servers started
            without a key ignore it).
        timeout: seconds per request (each phase of it).
        max_retries: further attempts after the first: the SDK's, for HTTP errors, time-outs
            and dropped connections; ours, for replies that hold no valid verdict.
        backoff_base, backoff_max: after an unusable reply, retry ``i`` (from 0) waits a
            jittered ``[0.5, 1] × min(backoff_max, backoff_base · 2^i)`` seconds (the SDK
            times its own retries: 0.5 s doubling to 8 s, or the server's ``Retry-After``).
        temperature, reasoning_effort, verbosity, max_completion_tokens: passed through
            when set (the paper's GPT-5 call: effort and verbosity ``low``);
            ``max_completion_tokens`` is sent as ``max_output_tokens`` to the Responses API.
        image_detail: the ``detail`` of the image parts (``low``/``high``/``auto``), if set.
        extra_body: more request fields, passed through unchanged.
        price: USD per million (input, output) tokens, for the dry run's cost estimate
            only (default: the model's list price, if known).
    """

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api: Api | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 5
    backoff_base: float = 2.0
    backoff_max: float = 60.0
    temperature: float | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    max_completion_tokens: int | None = None
    image_detail: str | None = None
    extra_body: Mapping[str, Any] | None = None
    price: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.api is not None and self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, not {self.api!r}")
        if self.max_retries < 0 or not self.timeout > 0:
            raise ValueError("max_retries must be >= 0 and timeout > 0")

    @classmethod
    def from_env(cls, *, api_key_env: str = "OPENAI_API_KEY", **overrides: Any) -> JudgeConfig:
        """A config whose unset fields come from the environment.

        ``base_url`` from ``OPENAI_BASE_URL``, ``model`` from ``LATENTLENS_JUDGE_MODEL``,
        ``api_key`` from the variable ``api_key_env``; ``None`` overrides are ignored.
        """
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        kwargs.setdefault("base_url", os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        kwargs.setdefault("model", os.environ.get("LATENTLENS_JUDGE_MODEL") or DEFAULT_MODEL)
        kwargs.setdefault("api_key", os.environ.get(api_key_env) or None)
        return cls(**kwargs)

    @property
    def resolved_api(self) -> Api:
        """The API actually called: ``api``, else the default for ``base_url``."""
        return self.api or default_api(self.base_url)

    @property
    def endpoint(self) -> str:
        """The URL the requests go to."""
        route = "/responses" if self.resolved_api == "responses" else "/chat/completions"
        return self.base_url.rstrip("/") + route


@dataclass(frozen=True)
class JudgeReply:
    """A parsed verdict with the raw reply text, the token usage and the requests it took."""

    verdict: Verdict
    text: str
    usage: dict[str, Any]
    attempts: int


_UNSUPPORTED = re.compile(
    r"unsupported (parameter|value)|not supported|unrecognized request argument|"
    r"unknown (parameter|field)|extra inputs are not permitted|extra_forbidden",
    re.IGNORECASE,
)
_TRUNCATED_HINT = (
    "a reasoning model may spend the whole budget thinking: raise --max-completion-tokens"
)


def _load_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError(
            'the judge talks to its server through the openai SDK: pip install -e ".[judge]"'
        ) from None
    return openai


class _Tally(threading.local):
    """Per worker thread: requests that left, and the run's stop switch."""

    sent = 0
    stop: threading.Event | None = None


def _make_transport(openai: Any, tally: _Tally, loopback: bool) -> Any:
    """An HTTP transport that counts each request and refuses to send once ``stop`` is set.

    The refusal is an ``openai.OpenAIError``: the SDK re-raises those at once, without a
    retry, so a worker waiting out a back-off sends nothing after the run was stopped.
    """
    # the SDK's HTTP library (httpx2 today, httpx in older SDKs)
    httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

    class Stopped(openai.OpenAIError):
        pass

    class Transport(httpx.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            if tally.stop is not None and tally.stop.is_set():
                raise Stopped("the run was stopped")
            tally.sent += 1
            return super().handle_request(request)

    # never route a local server through an environment proxy
    return openai.DefaultHttpxClient(transport=Transport(), trust_env=not loopback), Stopped


def _parts_for_responses(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages in the Responses API's ``input`` form."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for p in content:
            if p["type"] == "text":
                parts.append({"type": "input_text", "text": p["text"]})
            elif p["type"] == "image_url":
                parts.append(
                    {
                        "type": "input_image",
                        "image_url": p["image_url"]["url"],
                        "detail": p["image_url"].get("detail", "auto"),
                    }
                )
            else:
                raise ValueError(f"unknown content part type {p['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out


def _usage(obj: Any) -> dict[str, Any]:
    usage = getattr(obj, "usage", None)
    if usage is None:
        return {}
    data = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
    return {k: v for k, v in data.items() if v is not None}


class JudgeClient:
    """Sends judge requests through the ``openai`` SDK, to either API.

    Thread-safe: one client serves every worker thread.

    Raises:
        ImportError: the ``openai`` SDK is not installed (the ``judge`` extra).
    """

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.api: Api = config.resolved_api
        self._rng = random.Random()
        self._openai = _load_openai()
        self._tally = _Tally()
        host = urllib.parse.urlsplit(config.base_url).hostname or ""
        http_client, self._stopped = _make_transport(self._openai, self._tally, host in _LOOPBACK)
        self._sdk = self._openai.OpenAI(
            api_key=config.api_key or _NO_KEY,
            base_url=config.base_url,
            timeout=config.timeout,
            max_retries=config.max_retries,
            http_client=http_client,
        )

    def close(self) -> None:
        """Close the connections."""
        self._sdk.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_args(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The SDK call's arguments for these messages (``extra_body`` kept apart)."""
        cfg = self.config
        args: dict[str, Any] = {"model": cfg.model}
        if self.api == "responses":
            args["input"] = _parts_for_responses(messages)
            if cfg.reasoning_effort is not None:
                args["reasoning"] = {"effort": cfg.reasoning_effort}
            if cfg.verbosity is not None:
                args["text"] = {"verbosity": cfg.verbosity}
            if cfg.max_completion_tokens is not None:
                args["max_output_tokens"] = cfg.max_completion_tokens
        else:
            args["messages"] = list(messages)
            if cfg.reasoning_effort is not None:
                args["reasoning_effort"] = cfg.reasoning_effort
            if cfg.verbosity is not None:
                args["verbosity"] = cfg.verbosity
            if cfg.max_completion_tokens is not None:
                args["max_completion_tokens"] = cfg.max_completion_tokens
        if cfg.temperature is not None:
            args["temperature"] = cfg.temperature
        return args

    def payload(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The JSON body sent for these messages."""
        return {**self.request_args(messages), **(self.config.extra_body or {})}

    def send(
        self, messages: Sequence[Mapping[str, Any]], request_key: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """One SDK call (the SDK's own retries included): the reply text and its usage.

        Raises:
            RetryableError, PermanentError, FatalJudgeError: classified failures.
            JudgeAborted: the stop switch was set before a request could leave.
        """
        openai = self._openai
        extra: dict[str, Any] = {}
        if request_key:
            extra["extra_headers"] = {PATCH_KEY_HEADER: request_key}
        if self.config.extra_body:
            extra["extra_body"] = dict(self.config.extra_body)
        args = self.request_args(messages)
        try:
            if self.api == "responses":
                reply = self._sdk.responses.create(**args, **extra)
            else:
                reply = self._sdk.chat.completions.create(**args, **extra)
        except self._stopped:
            raise JudgeAborted("the run was stopped") from None
        except openai.APIStatusError as e:
            raise self._classify(e.status_code, _error_message(e), self.api) from None
        except openai.APITimeoutError as e:
            raise RetryableError("timeout", f"timed out: {e}") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            if isinstance(cause, self._stopped):  # SDKs that retry every exception
                raise JudgeAborted("the run was stopped") from None
            raise RetryableError(
                "connection", f"connection failed: {type(cause).__name__}: {cause}"
            ) from None
        except (openai.APIResponseValidationError, ValueError) as e:
            raise MalformedReply(f"the reply could not be read: {e}") from None
        if self.api == "responses":
            return _responses_text(reply), _usage(reply)
        return _chat_text(reply), _usage(reply)

    @staticmethod
    def _classify(status: int, detail: str, api: Api = "chat") -> JudgeError:
        message = f"HTTP {status}: {detail}".strip()
        if status == 429:
            return RetryableError("rate_limit", message)
        if status >= 500 or status in (408, 409, 425):
            return RetryableError("server", message)
        if status == 404 and api == "responses":
            return FatalJudgeError(
                f"{message} (check the base URL and judge model; a server without the "
                "Responses API answers 404 too: try --api chat)"
            )
        if status in (401, 403, 404):
            return FatalJudgeError(f"{message} (check the API key, base URL and judge model)")
        if status in (400, 422) and _UNSUPPORTED.search(detail):
            # every request carries the same parameters: none of them can succeed
            return FatalJudgeError(
                f"{message} (a request parameter is not supported by this judge model or "
                "API: drop or change it, e.g. --temperature, --reasoning-effort, --verbosity, "
                "or try --api chat)"
            )
        return PermanentError(message)

    def delay(self, retry: int) -> float:
        """Seconds to wait before asking again after unusable reply number ``retry`` (from 0)."""
        cfg = self.config
        return min(cfg.backoff_max, cfg.backoff_base * 2**retry) * self._rng.uniform(0.5, 1.0)

    def judge(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        request_key: str | None = None,
        stop: threading.Event | None = None,
    ) -> JudgeReply:
        """Ask for a verdict; the SDK retries transport failures, we retry unusable replies.

        Args:
            messages: the chat messages (see :func:`prompt.build_messages`).
            request_key: sent in a header so a test server can count requests per patch.
            stop: once set, no request leaves this call (:class:`JudgeAborted`).

        Raises:
            JudgeFailed: retries exhausted, or a non-retryable request error; ``attempts``
                counts the requests that left.
            FatalJudgeError: the run cannot succeed (authentication, URL, model, parameter).
            JudgeAborted: ``stop`` was set.
        """
        stop = stop or threading.Event()
        tally = self._tally
        tally.sent, tally.stop = 0, stop
        try:
            for retry in range(self.config.max_retries + 1):
                if stop.is_set():
                    raise JudgeAborted("the run was stopped")
                try:
                    text, usage = self.send(messages, request_key)
                    return JudgeReply(parse_verdict(text), text, usage, tally.sent)
                except PermanentError as e:
                    raise JudgeFailed(e.kind, str(e), tally.sent) from None
                except MalformedReply as e:
                    if retry == self.config.max_retries:
                        raise JudgeFailed(e.kind, str(e), tally.sent) from None
                    wait = self.delay(retry)
                    log.debug("unusable reply (%s); asking again in %.2fs", e, wait)
                    if stop.wait(wait):
                        raise JudgeAborted("the run was stopped") from None
                except RetryableError as e:  # the SDK's retries are spent
                    raise JudgeFailed(e.kind, str(e), tally.sent) from None
            raise AssertionError("unreachable")
        finally:
            tally.stop = None


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
        if isinstance(body.get("message"), str):
            return body["message"][:300]
    return str(getattr(e, "message", e))[:300]


def _chat_text(reply: Any) -> str:
    """The assistant's text of a chat completion."""
    choices = getattr(reply, "choices", None)
    if not choices:
        raise MalformedReply(f"not a chat-completions reply: {str(reply)[:200]!r}")
    choice = choices[0]
    if choice.finish_reason == "length":
        raise TruncatedReply(
            f"the reply was cut by the token limit (finish_reason 'length'); {_TRUNCATED_HINT}"
        )
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise MalformedReply("the reply has no text content")
    return content


def _responses_text(reply: Any) -> str:
    """The output text of a Responses API reply."""
    status = getattr(reply, "status", None)
    details = getattr(reply, "incomplete_details", None)
    if status == "incomplete" and getattr(details, "reason", None) == "max_output_tokens":
        raise TruncatedReply(
            f"the reply was cut by the token limit (status 'incomplete', "
            f"max_output_tokens); {_TRUNCATED_HINT}"
        )
    error = getattr(reply, "error", None)
    if status == "failed" or error is not None:
        raise MalformedReply(f"the response failed: {error}")
    try:
        text = reply.output_text
    except (AttributeError, TypeError):
        raise MalformedReply(f"not a Responses API reply: {str(reply)[:200]!r}") from None
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("the reply has no output text")
    return text
