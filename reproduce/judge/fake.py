"""A deterministic stand-in judge, and a real OpenAI-compatible HTTP server around it (loopback).

The server speaks both APIs the judge uses: ``POST /v1/chat/completions`` and ``POST
/v1/responses``. It is what the tests and the offline ``--tiny`` pipeline talk to. It
checks the request's shape (boxed image, instructions, crop), answers from the candidate
words in the prompt, and can misbehave on a schedule: 429 with ``Retry-After``, 5xx,
replies too slow for the client's time-out, replies that are not JSON or hold no valid
verdict, a dropped connection, a reply cut by the token limit, an unsupported parameter.
It counts, per patch key, the requests it received and the verdicts it delivered.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reproduce.judge.client import PATCH_KEY_HEADER
from reproduce.judge.prompt import parse_prompt_words

log = logging.getLogger(__name__)

FAULTS = (
    "ok",
    "429",
    "500",
    "503",
    "400",
    "401",
    "slow",
    "malformed",
    "badjson",
    "invalid",
    "disconnect",
    "length",
    "unsupported",
)
_KINDS = ("concrete", "abstract", "global")


_EXPECTED_TYPES = {
    "chat": ("image_url", "text", "image_url"),
    "responses": ("input_image", "input_text", "input_image"),
}
_USAGE = {"prompt_tokens": 800, "completion_tokens": 120, "total_tokens": 920}


def _request_parts(body: Mapping[str, Any], api: str) -> tuple[list[str], str, list[str]]:
    """The content part types, the text and the image URLs of a request (KeyError if none)."""
    content = body["messages" if api == "chat" else "input"][0]["content"]
    types = [p["type"] for p in content]
    if api == "chat":
        text = next(p["text"] for p in content if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
    else:
        text = next(p["text"] for p in content if p["type"] == "input_text")
        urls = [p["image_url"] for p in content if p["type"] == "input_image"]
    return types, text, urls


def _settings(body: Mapping[str, Any], api: str) -> dict[str, Any]:
    """The sampling settings a request carries, under the names of the chat API."""
    if api == "chat":
        names = ("reasoning_effort", "verbosity", "max_completion_tokens", "temperature")
        return {k: body[k] for k in names if k in body}
    out = {k: body[k] for k in ("temperature",) if k in body}
    if "reasoning" in body:
        out["reasoning_effort"] = body["reasoning"].get("effort")
    if "text" in body:
        out["verbosity"] = body["text"].get("verbosity")
    if "max_output_tokens" in body:
        out["max_completion_tokens"] = body["max_output_tokens"]
    return out


def _chat_reply(key: str, model: str, content: str, cut: bool) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{key[-8:]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length" if cut else "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": _USAGE,
    }


def _responses_reply(key: str, model: str, content: str, cut: bool) -> dict[str, Any]:
    output: list[dict[str, Any]] = [
        {"id": f"rs_{key[-8:]}", "type": "reasoning", "summary": []},
    ]
    if content:
        output.append(
            {
                "id": f"msg_{key[-8:]}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        )
    return {
        "id": f"resp_{key[-8:]}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": _USAGE["prompt_tokens"],
            "output_tokens": _USAGE["completion_tokens"],
            "total_tokens": _USAGE["total_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 64},
        },
    }


class FakeJudge:
    """Deterministic verdicts from candidate words alone.

    With a vocabulary, a word (case-insensitive, stripped) is related in the way the
    vocabulary says (an iterable of words means "concrete") and unrelated otherwise.
    Without one, a hash of the word decides: about 16% concrete, 6% abstract, 6% global.
    """

    def __init__(self, vocabulary: Mapping[str, str] | Iterable[str] | None = None):
        if vocabulary is None:
            self.vocabulary: dict[str, str] | None = None
        elif isinstance(vocabulary, Mapping):
            self.vocabulary = {k.strip().lower(): v for k, v in vocabulary.items()}
        else:
            self.vocabulary = {w.strip().lower(): "concrete" for w in vocabulary}

    def classify(self, word: str) -> str | None:
        """``"concrete"``, ``"abstract"``, ``"global"`` or ``None`` (unrelated)."""
        w = word.strip().lower()
        if self.vocabulary is not None:
            return self.vocabulary.get(w)
        b = hashlib.sha1(w.encode("utf-8")).digest()[0]
        return "concrete" if b < 40 else "abstract" if b < 56 else "global" if b < 72 else None

    def verdict(self, words: Iterable[str]) -> dict[str, Any]:
        """The JSON verdict a judge would give for these words."""
        lists: dict[str, list[str]] = {k: [] for k in _KINDS}
        for w in words:
            kind = self.classify(w)
            if kind is not None:
                lists[kind].append(w)
        related = any(lists.values())
        return {
            "reasoning": "concrete: {}; abstract: {}; global: {}.".format(
                *(", ".join(lists[k]) or "none" for k in _KINDS)
            ),
            "interpretable": related,
            **{f"{k}_words": v for k, v in lists.items()},
        }

    def reply(self, words: Iterable[str]) -> str:
        """A reply as a chat model writes it: some prose, then the JSON object."""
        return "Let me go through the three relations.\n" + json.dumps(self.verdict(words))


class _Gate:
    """Requests wait until ``open`` is set; ``drop`` then closes them unanswered."""

    def __init__(self, is_open: bool):
        self.open = threading.Event()
        self.drop = False
        if is_open:
            self.open.set()


class FakeJudgeServer:
    """A chat-completions server on ``127.0.0.1`` in a background thread.

    Args:
        judge: answers the requests (default: :class:`FakeJudge` without vocabulary).
        faults: a queue of behaviours (see ``FAULTS``), one popped per request; "ok"
            once empty.
        fault_for: ``(patch_key, attempt) → behaviour | None``, asked first (attempt
            counts from 1 per key); ``None`` falls back to the queue.
        retry_after: the ``Retry-After`` seconds sent with 429s.
        slow_seconds: how long a "slow" reply waits before answering.
        reply_delay: seconds every other reply waits (to keep a run busy for a while).
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.

    Attributes:
        successes: ``patch key → verdicts delivered`` (a "slow" answer is not counted).
        attempts: ``patch key → requests received``.
        served: ``behaviour → times``.
        log: one small dict per request (key, behaviour, model, content part types).
        inflight: requests being answered right now (held ones excluded).
    """

    def __init__(
        self,
        judge: FakeJudge | None = None,
        *,
        faults: Iterable[str] = (),
        fault_for: Callable[[str, int], str | None] | None = None,
        retry_after: float = 0.0,
        slow_seconds: float = 1.0,
        reply_delay: float = 0.0,
        api_key: str | None = None,
        port: int = 0,
    ):
        self.judge = judge or FakeJudge()
        self.faults = collections.deque(faults)
        bad = [f for f in self.faults if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; expected {FAULTS}")
        self.fault_for = fault_for
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.reply_delay = reply_delay
        self.api_key = api_key
        self.successes: collections.Counter[str] = collections.Counter()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.served: collections.Counter[str] = collections.Counter()
        self.log: list[dict[str, Any]] = []
        self.inflight = 0
        self._lock = threading.Lock()
        self._gate = _Gate(is_open=True)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API root to give a client (``http://127.0.0.1:<port>/v1``)."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeJudgeServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fake-judge", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (held requests are dropped)."""
        self.release(drop=True)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self) -> None:
        """Keep new requests waiting, unanswered and uncounted, until :meth:`release`."""
        with self._lock:
            if self._gate.open.is_set():
                self._gate = _Gate(is_open=False)

    def release(self, drop: bool = False) -> None:
        """Let held requests go on, or (``drop``) close them without an answer."""
        with self._lock:
            gate, self._gate = self._gate, _Gate(is_open=True)
        gate.drop = drop
        gate.open.set()

    def total_successes(self) -> int:
        """Verdicts delivered so far, over all keys."""
        with self._lock:
            return sum(self.successes.values())

    def _choose(self, key: str) -> str:
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        fault = self.fault_for(key, attempt) if self.fault_for else None
        if fault is None:
            with self._lock:
                fault = self.faults.popleft() if self.faults else "ok"
        return fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("fake judge: " + format, *args)

            def _send(
                self, status: int, body: bytes, headers: Mapping[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def _error(
                self, status: int, message: str, headers: Mapping[str, str] | None = None
            ) -> None:
                self._send(status, json.dumps({"error": {"message": message}}).encode(), headers)

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                route = self.path.rstrip("/")
                api = {"/v1/chat/completions": "chat", "/v1/responses": "responses"}.get(route)
                if api is None:
                    return self._error(404, f"no route {self.path}")
                if (
                    server.api_key
                    and self.headers.get("Authorization") != f"Bearer {server.api_key}"
                ):
                    return self._error(401, "invalid API key")
                try:
                    body = json.loads(raw)
                    types, text, urls = _request_parts(body, api)
                except (ValueError, KeyError, IndexError, TypeError, StopIteration):
                    return self._error(400, f"not a {api} request with text and images")
                words = parse_prompt_words(text)
                if (
                    types != list(_EXPECTED_TYPES[api])
                    or words is None
                    or not all(u.startswith("data:image/png;base64,") for u in urls)
                ):
                    return self._error(400, "expected [boxed image, prompt with words, crop]")
                key = self.headers.get(PATCH_KEY_HEADER) or hashlib.sha256(raw).hexdigest()
                gate = server._gate
                gate.open.wait()  # held requests are neither counted nor answered
                if gate.drop:
                    self.close_connection = True
                    return None
                with server._lock:
                    server.inflight += 1
                try:
                    fault = server._choose(key)
                    with server._lock:
                        server.served[fault] += 1
                        server.log.append(
                            {
                                "key": key,
                                "fault": fault,
                                "api": api,
                                "model": body.get("model"),
                                "types": types,
                                "words": words,
                                "settings": _settings(body, api),
                            }
                        )
                    self._respond(fault, key, api, body.get("model", ""), words)
                finally:
                    with server._lock:
                        server.inflight -= 1
                return None

            def _respond(
                self, fault: str, key: str, api: str, model: str, words: list[str]
            ) -> None:
                wait = {
                    "Retry-After": f"{math.ceil(server.retry_after)}",
                    "retry-after-ms": f"{server.retry_after * 1000:.0f}",
                }
                if fault == "429":
                    return self._error(429, "rate limited", wait)
                if fault in ("500", "503"):
                    return self._error(int(fault), f"fake {fault}", wait)
                if fault in ("400", "401"):
                    return self._error(int(fault), f"fake {fault}")
                if fault == "unsupported":  # what OpenAI answers for e.g. temperature on GPT-5
                    return self._error(
                        400,
                        "Unsupported parameter: 'temperature' is not supported with this model.",
                    )
                if fault == "disconnect":
                    self.close_connection = True
                    return None
                if fault == "badjson":
                    return self._send(200, b'{"choices": [oops')
                content = {
                    "malformed": "I would rather not answer in JSON.",
                    "invalid": json.dumps(
                        {
                            "reasoning": "",
                            "concrete_words": "all of them",
                            "abstract_words": [],
                            "global_words": [],
                        }
                    ),
                }.get(fault) or server.judge.reply(words)
                time.sleep(server.slow_seconds if fault == "slow" else server.reply_delay)
                cut = fault == "length"
                reply = (_chat_reply if api == "chat" else _responses_reply)(
                    key, model, "" if cut else content, cut
                )
                try:
                    self._send(200, json.dumps(reply).encode())
                except OSError:
                    return None  # the client is gone
                if fault == "ok":
                    with server._lock:
                        server.successes[key] += 1
                return None

        return Handler
