"""A client for any OpenAI-compatible ``/chat/completions`` API, with retries; verdict parsing.

Standard library only (``urllib``). What is retried, with exponential backoff and jitter
(``Retry-After`` honoured): HTTP 408/409/425/429 and 5xx, time-outs, connection errors,
replies that are not JSON or hold no parseable, valid verdict. What stops the whole run:
401/403/404 (a wrong key, URL or model). Any other 4xx fails that one request at once.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-5"
PATCH_KEY_HEADER = "X-LatentLens-Patch-Key"  # ignored by real servers; the fake one counts by it
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}

FailureKind = Literal[
    "rate_limit", "server", "timeout", "connection", "malformed", "http", "aborted", "length"
]
_WORD_LISTS = ("concrete_words", "abstract_words", "global_words")


class JudgeError(Exception):
    """Base class of the judge client's errors."""


class RetryableError(JudgeError):
    """A request that may succeed if sent again (rate limit, 5xx, time-out, bad reply)."""

    def __init__(self, kind: FailureKind, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


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


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge.

    Attributes:
        base_url: API root; ``/chat/completions`` is appended (a local vLLM server:
            ``http://localhost:8000/v1``).
        model: the judge model's name.
        api_key: sent as a bearer token; ``None`` sends no ``Authorization`` header.
        timeout: seconds per socket operation of one request.
        max_retries: further attempts after the first, for retryable failures.
        backoff_base, backoff_max: retry ``i`` (from 0) waits a uniformly jittered
            ``[0.5, 1] × min(backoff_max, backoff_base · 2^i)`` seconds, unless the server
            sent ``Retry-After`` (honoured up to ``max_retry_after``).
        temperature, reasoning_effort, verbosity, max_completion_tokens: passed through
            when set (the paper's GPT-5 call: effort and verbosity ``low``).
        image_detail: the ``detail`` of the image parts (``low``/``high``/``auto``), if set.
        extra_body: more request fields, passed through unchanged.
    """

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 5
    backoff_base: float = 2.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    temperature: float | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    max_completion_tokens: int | None = None
    image_detail: str | None = None
    extra_body: Mapping[str, Any] | None = None

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
    def endpoint(self) -> str:
        """The chat-completions URL."""
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class JudgeReply:
    """A parsed verdict with the raw reply text, the token usage and the attempts it took."""

    verdict: Verdict
    text: str
    usage: dict[str, Any]
    attempts: int


_UNSUPPORTED = re.compile(
    r"unsupported (parameter|value)|not supported|unrecognized request argument|"
    r"unknown (parameter|field)|extra inputs are not permitted",
    re.IGNORECASE,
)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reply_text(body: bytes) -> tuple[str, dict[str, Any]]:
    """The assistant's text and the usage block of a chat-completions reply."""
    try:
        data = json.loads(body)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise MalformedReply(f"not a chat-completions reply: {body[:200]!r}") from None
    if data["choices"][0].get("finish_reason") == "length":
        raise TruncatedReply(
            "the reply was cut by the token limit (finish_reason 'length'); a reasoning "
            "model may spend the whole budget thinking: raise --max-completion-tokens"
        )
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise MalformedReply("the reply has no text content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return content, usage


class JudgeClient:
    """Sends judge requests to an OpenAI-compatible chat-completions API.

    Thread-safe: one client serves every worker thread.
    """

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._rng = random.Random()
        host = urllib.parse.urlsplit(config.endpoint).hostname or ""
        handlers: list[urllib.request.BaseHandler] = []
        if host in _LOOPBACK:  # never route a local server through an environment proxy
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def payload(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The request body for these messages."""
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": list(messages)}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.reasoning_effort is not None:
            body["reasoning_effort"] = cfg.reasoning_effort
        if cfg.verbosity is not None:
            body["verbosity"] = cfg.verbosity
        if cfg.max_completion_tokens is not None:
            body["max_completion_tokens"] = cfg.max_completion_tokens
        body.update(cfg.extra_body or {})
        return body

    def send(
        self, messages: Sequence[Mapping[str, Any]], request_key: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """One request, no retry: the reply text and its usage.

        Raises:
            RetryableError, PermanentError, FatalJudgeError: classified failures.
        """
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        if request_key:
            headers[PATCH_KEY_HEADER] = request_key
        data = json.dumps(self.payload(messages)).encode("utf-8")
        req = urllib.request.Request(
            self.config.endpoint, data=data, headers=headers, method="POST"
        )
        try:
            with self._opener.open(req, timeout=self.config.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()[:300].decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                detail = ""
            retry_after = e.headers.get("Retry-After") if e.headers else None
            self._raise_for_status(e.code, detail, retry_after)
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise RetryableError("timeout", f"timed out: {e.reason}") from None
            raise RetryableError("connection", f"connection failed: {e.reason}") from None
        except TimeoutError as e:
            raise RetryableError("timeout", f"timed out: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise RetryableError(
                "connection", f"connection failed: {type(e).__name__}: {e}"
            ) from None
        return _reply_text(body)

    @staticmethod
    def _raise_for_status(status: int, detail: str, retry_after: str | None) -> NoReturn:
        message = f"HTTP {status}: {detail}".strip()
        if status == 429:
            raise RetryableError("rate_limit", message, _retry_after(retry_after))
        if status >= 500 or status in (408, 409, 425):
            raise RetryableError("server", message, _retry_after(retry_after))
        if status in (401, 403, 404):
            raise FatalJudgeError(f"{message} (check the API key, base URL and judge model)")
        if status == 400 and _UNSUPPORTED.search(detail):
            # every request carries the same parameters: none of them can succeed
            raise FatalJudgeError(
                f"{message} (a request parameter is not supported by this judge model: drop "
                "or change it, e.g. --temperature or --reasoning-effort)"
            )
        raise PermanentError(message)

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (from 0)."""
        cfg = self.config
        if retry_after is not None:
            return min(retry_after, cfg.max_retry_after) + self._rng.uniform(
                0, 0.1 * cfg.backoff_base
            )
        return min(cfg.backoff_max, cfg.backoff_base * 2**retry) * self._rng.uniform(0.5, 1.0)

    def judge(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        request_key: str | None = None,
        stop: threading.Event | None = None,
    ) -> JudgeReply:
        """Ask for a verdict, retrying retryable failures.

        Args:
            messages: the chat messages (see :func:`prompt.build_messages`).
            request_key: sent in a header so a test server can count requests per patch.
            stop: when set, waiting retries give up (:class:`JudgeAborted`).

        Raises:
            JudgeFailed: retries exhausted, or a non-retryable request error.
            FatalJudgeError: the run cannot succeed (authentication, URL, model).
            JudgeAborted: ``stop`` was set.
        """
        stop = stop or threading.Event()
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            if stop.is_set():
                raise JudgeAborted("the run was stopped")
            try:
                text, usage = self.send(messages, request_key)
                return JudgeReply(parse_verdict(text), text, usage, attempt + 1)
            except PermanentError as e:
                raise JudgeFailed(e.kind, str(e), attempt + 1) from None
            except RetryableError as e:
                if attempt + 1 == attempts:
                    raise JudgeFailed(e.kind, str(e), attempts) from None
                wait = self.delay(attempt, e.retry_after)
                log.debug("%s (%s); retry %d in %.2fs", e.kind, e, attempt + 1, wait)
                if stop.wait(wait):
                    raise JudgeAborted("the run was stopped") from None
        raise AssertionError("unreachable")
