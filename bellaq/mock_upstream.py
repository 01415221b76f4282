"""OpenAI-compatible mock model server, for development, tests and benchmarks.

Endpoints (POST, JSON): ``/v1/chat/completions`` (also streaming), ``/v1/completions`` (also
streaming) and ``/v1/embeddings``. Answers are deterministic functions of the request: the chat
answer is ``"echo: " + <last user message, truncated to 200 chars>``.

Knobs: ``latency`` (seconds before answering; per request: header ``X-Mock-Latency``),
``error_rate`` / ``error_status`` / ``retry_after`` (random failures), ``stream_chunk_delay``
(seconds between SSE chunks; per request: header ``X-Mock-Chunk-Delay``), a script of statuses
for the next requests (:meth:`MockUpstream.script`), and the body field ``"mock_status": <int>``
(answer that status with an OpenAI error envelope).

Ways to run it:

* :class:`MockUpstream`: in a background thread of the current (not monkey-patched) process,
  with a threaded werkzeug server; for tests.
* :func:`serve` / :func:`main` (``python -m bellaq.mock_upstream --port N``): gevent
  ``pywsgi`` server, one greenlet per connection, for benchmarks (thousands of held requests).

The core is a plain WSGI callable (:class:`MockUpstreamApp`, no per-request framework overhead);
:func:`create_mock_app` wraps it in a Flask app.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

__all__ = [
    "MockState",
    "MockUpstream",
    "MockUpstreamApp",
    "RecordedRequest",
    "create_mock_app",
    "get_mock_state",
    "main",
    "serve",
]

StartResponse = Callable[..., Any]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
ECHO_PREFIX = "echo: "
ECHO_MAX_CHARS = 200
DEFAULT_EMBEDDING_DIM = 8
MAX_EMBEDDING_DIM = 4096
MAX_BODY_BYTES = 32 * 1024 * 1024
EXTENSION_KEY = "bellaq_mock_upstream"

_WORD_RE = re.compile(r"\S+\s*")
_JSON_HEADERS_BASE = [("Content-Type", "application/json")]


# --------------------------------------------------------------------------- state


@dataclass
class RecordedRequest:
    """One request the mock received (kept only when recording is on)."""

    method: str
    path: str
    body: Any  # parsed JSON, or None when the body was not JSON
    headers: dict[str, str] = field(default_factory=dict)
    time: float = 0.0


class MockState:
    """Run-time knobs and counters shared by the WSGI app and :class:`MockUpstream`.

    Attributes may be changed while the server runs (``state.latency = 0.5``).
    """

    def __init__(
        self,
        latency: float = 0.0,
        error_rate: float = 0.0,
        error_status: int = 500,
        retry_after: float | None = None,
        stream_chunk_delay: float = 0.0,
        seed: int | None = None,
        record: bool = False,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.latency = float(latency)
        self.error_rate = float(error_rate)
        self.error_status = int(error_status)
        self.retry_after = retry_after
        self.stream_chunk_delay = float(stream_chunk_delay)
        self.record = record
        self.sleep = sleep
        self.rng = random.Random(seed)
        self._script: deque[tuple[int, float | None]] = deque()
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._count = 0

    def script(self, statuses: Iterable[int], retry_after: float | None = None) -> None:
        """Answer the next requests, in order, with these statuses (200 = normal answer).

        Error answers carry ``Retry-After: <retry_after>`` (or the ``retry_after`` knob) when set.
        """
        with self._lock:
            self._script.extend((int(s), retry_after) for s in statuses)

    def next_scripted(self) -> tuple[int, float | None] | None:
        """Pop the next scripted status, if any."""
        try:
            return self._script.popleft()
        except IndexError:
            return None

    def note(self, method: str, path: str, body: Any, environ: dict[str, Any]) -> None:
        """Count a request, and record it when recording is on."""
        with self._lock:
            self._count += 1
            if self.record:
                headers = {k[5:].replace("_", "-").title(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
                self._requests.append(RecordedRequest(method, path, body, headers, time.time()))

    @property
    def request_count(self) -> int:
        """Number of requests received (all paths)."""
        return self._count

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded requests (empty unless recording is on)."""
        with self._lock:
            return list(self._requests)

    @property
    def pending_script(self) -> int:
        """How many scripted statuses are still to be used."""
        return len(self._script)

    def clear(self) -> None:
        """Forget recorded requests, the request count and any remaining script."""
        with self._lock:
            self._requests.clear()
            self._count = 0
            self._script.clear()


# --------------------------------------------------------------------------- helpers


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _request_id() -> str:
    return "req_" + os.urandom(12).hex()


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _float_header(environ: dict[str, Any], key: str) -> float | None:
    raw = environ.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _text_of(content: Any) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # tokens
        return " ".join(str(t) for t in prompt)
    return ""


def _count_words(text: str) -> int:
    return len(text.split())


def _echo(text: str) -> str:
    return ECHO_PREFIX + text[:ECHO_MAX_CHARS]


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _pieces(text: str, max_tokens: int | None) -> tuple[list[str], str]:
    """Split an answer into word tokens (their concatenation is the text), apply max_tokens."""
    pieces = _WORD_RE.findall(text)
    if max_tokens is not None and len(pieces) > max_tokens:
        return pieces[:max_tokens], "length"
    return pieces, "stop"


def _embedding(text: str, dim: int) -> list[float]:
    """A deterministic vector in [-1, 1] derived from the text."""
    data = b""
    counter = 0
    seed = text.encode("utf-8")
    while len(data) < dim * 2:
        data += hashlib.blake2b(seed + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    values = struct.unpack(f"<{dim}H", data[: dim * 2])
    return [round(v / 32767.5 - 1.0, 6) for v in values]


_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "mock error"),
    401: ("invalid_request_error", "invalid_api_key", "mock error: invalid API key"),
    403: ("invalid_request_error", None, "mock error: forbidden"),
    404: ("invalid_request_error", None, "mock error: not found"),
    408: ("timeout", None, "mock error: request timed out"),
    413: ("invalid_request_error", None, "mock error: request too large"),
    422: ("invalid_request_error", None, "mock error: unprocessable"),
    429: ("requests", "rate_limit_exceeded", "mock error: rate limit reached, retry later"),
}


def error_body(status: int, message: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope the mock answers with for ``status``."""
    if status in _ERROR_KINDS:
        type_, code, default = _ERROR_KINDS[status]
    elif status >= 500:
        type_, code, default = (
            "server_error",
            None,
            "mock error: the server had an error processing your request",
        )
    else:
        type_, code, default = "invalid_request_error", None, "mock error"
    return {"error": {"message": message or default, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- the app


class MockUpstreamApp:
    """The mock as a plain WSGI callable, driven by a :class:`MockState`."""

    def __init__(self, state: MockState | None = None) -> None:
        self.state = state or MockState()
        self._routes: dict[str, Callable[..., Iterable[bytes]]] = {
            CHAT_PATH: self._chat,
            COMPLETIONS_PATH: self._completions,
            EMBEDDINGS_PATH: self._embeddings,
        }

    # -- responses

    @staticmethod
    def _json(
        start_response: StartResponse, status: int, obj: Any, extra: list[tuple[str, str]] | None = None
    ) -> list[bytes]:
        payload = _dumps(obj)
        headers = [
            *_JSON_HEADERS_BASE,
            ("Content-Length", str(len(payload))),
            ("x-request-id", _request_id()),
        ]
        if extra:
            headers.extend(extra)
        start_response(_status_line(status), headers)
        return [payload]

    def _error(
        self,
        start_response: StartResponse,
        status: int,
        message: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> list[bytes]:
        extra = []
        if retry_after is not None:
            extra.append(("Retry-After", _format_seconds(retry_after)))
        return self._json(start_response, status, error_body(status, message, param), extra)

    def _sse(self, start_response: StartResponse, events: Iterator[dict[str, Any]], delay: float) -> Iterator[bytes]:
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/event-stream; charset=utf-8"),
                ("Cache-Control", "no-cache"),
                ("x-request-id", _request_id()),
            ],
        )
        return self._sse_body(events, delay)

    def _sse_body(self, events: Iterator[dict[str, Any]], delay: float) -> Iterator[bytes]:
        first = True
        for event in events:
            if not first and delay > 0:
                self.state.sleep(delay)
            first = False
            yield b"data: " + _dumps(event) + b"\n\n"
        if delay > 0:
            self.state.sleep(delay)
        yield b"data: [DONE]\n\n"

    # -- dispatch

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        state = self.state
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        handler = self._routes.get(path)
        if handler is None:
            state.note(method, path, None, environ)
            return self._error(
                start_response,
                404,
                f"Unknown request URL: {method} {path}. Please check the URL for typos.",
            )
        if method != "POST":
            state.note(method, path, None, environ)
            return self._error(start_response, 405, f"Method {method} is not allowed on {path}; use POST.")

        raw, too_large = self._read_body(environ)
        body: Any = None
        bad_json = False
        if not too_large:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                bad_json = True
        state.note(method, path, body, environ)

        latency = _float_header(environ, "HTTP_X_MOCK_LATENCY")
        if latency is None:
            latency = state.latency
        if latency > 0:
            state.sleep(latency)

        scripted = state.next_scripted()
        if scripted is not None:
            status, retry_after = scripted
            if status != 200:
                if retry_after is None:
                    retry_after = state.retry_after
                return self._error(start_response, status, retry_after=retry_after)
        elif state.error_rate > 0 and state.rng.random() < state.error_rate:
            return self._error(start_response, state.error_status, retry_after=state.retry_after)

        if too_large:
            return self._error(start_response, 413, f"Request body larger than {MAX_BODY_BYTES} bytes.")
        if bad_json or not isinstance(body, dict):
            return self._error(
                start_response,
                400,
                "We could not parse the JSON body of your request. The body must be a JSON object.",
            )
        mock_status = body.get("mock_status")
        if isinstance(mock_status, int) and not isinstance(mock_status, bool) and mock_status != 200:
            return self._error(start_response, mock_status, retry_after=state.retry_after)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._error(start_response, 400, "you must provide a model parameter (a string).", "model")
        delay = _float_header(environ, "HTTP_X_MOCK_CHUNK_DELAY")
        if delay is None:
            delay = state.stream_chunk_delay
        return handler(start_response, body, raw, model, delay)

    @staticmethod
    def _read_body(environ: dict[str, Any]) -> tuple[bytes, bool]:
        stream = environ.get("wsgi.input")
        if stream is None:
            return b"", False
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length > MAX_BODY_BYTES:
            return b"", True
        if length >= 0:
            return stream.read(length), False
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked or environ.get("wsgi.input_terminated"):
            data = stream.read(MAX_BODY_BYTES + 1)
            return (b"", True) if len(data) > MAX_BODY_BYTES else (data, False)
        return b"", False

    # -- endpoints

    def _chat(
        self, start_response: StartResponse, body: dict[str, Any], raw: bytes, model: str, delay: float
    ) -> Iterable[bytes]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self._error(
                start_response, 400, "'messages' must be a non-empty array of message objects.", "messages"
            )
        last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1])
        pieces, finish_reason = _pieces(_echo(_text_of(last.get("content"))), _max_tokens(body))
        content = "".join(pieces)
        prompt_tokens = max(1, sum(_count_words(_text_of(m.get("content"))) for m in messages))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        cid = "chatcmpl-" + _digest(raw)
        created = int(time.time())
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            events = self._chat_chunks(cid, created, model, pieces, finish_reason, usage, include_usage)
            return self._sse(start_response, events, delay)
        completion = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        return self._json(start_response, 200, completion)

    @staticmethod
    def _chat_chunks(
        cid: str,
        created: int,
        model: str,
        pieces: list[str],
        finish_reason: str,
        usage: dict[str, int],
        include_usage: bool,
    ) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return obj

        yield chunk({"role": "assistant", "content": ""}, None)
        for piece in pieces:
            yield chunk({"content": piece}, None)
        yield chunk({}, finish_reason)
        if include_usage:
            yield {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": usage,
            }

    def _completions(
        self, start_response: StartResponse, body: dict[str, Any], raw: bytes, model: str, delay: float
    ) -> Iterable[bytes]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            prompts = prompt
        else:
            return self._error(
                start_response, 400, "'prompt' must be a string or a non-empty array of strings.", "prompt"
            )
        max_tokens = _max_tokens(body)
        answers = [_pieces(_echo(_prompt_text(p)), max_tokens) for p in prompts]
        prompt_tokens = max(1, sum(_count_words(_prompt_text(p)) for p in prompts))
        completion_tokens = sum(len(p) for p, _ in answers)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cid = "cmpl-" + _digest(raw)
        created = int(time.time())
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            events = self._completion_chunks(cid, created, model, answers, usage, include_usage)
            return self._sse(start_response, events, delay)
        completion = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {"text": "".join(p), "index": i, "logprobs": None, "finish_reason": fr}
                for i, (p, fr) in enumerate(answers)
            ],
            "usage": usage,
        }
        return self._json(start_response, 200, completion)

    @staticmethod
    def _completion_chunks(
        cid: str,
        created: int,
        model: str,
        answers: list[tuple[list[str], str]],
        usage: dict[str, int],
        include_usage: bool,
    ) -> Iterator[dict[str, Any]]:
        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return obj

        for index, (pieces, finish_reason) in enumerate(answers):
            for piece in pieces:
                yield chunk(index, piece, None)
            yield chunk(index, "", finish_reason)
        if include_usage:
            yield {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [],
                "usage": usage,
            }

    def _embeddings(
        self, start_response: StartResponse, body: dict[str, Any], raw: bytes, model: str, delay: float
    ) -> Iterable[bytes]:
        value = body.get("input")
        inputs: list[str]
        if isinstance(value, str):
            inputs = [value]
        elif isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            inputs = [_prompt_text(value)]
        elif isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
            inputs = [_prompt_text(v) for v in value]
        else:
            return self._error(
                start_response,
                400,
                "'input' must be a string, an array of strings or an array of token arrays.",
                "input",
            )
        dim = body.get("dimensions", DEFAULT_EMBEDDING_DIM)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            return self._error(
                start_response,
                400,
                f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIM}.",
                "dimensions",
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return self._error(start_response, 400, "'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        data = []
        for index, text in enumerate(inputs):
            vector: Any = _embedding(text, dim)
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = max(1, sum(_count_words(t) for t in inputs))
        result = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(start_response, 200, result)


# --------------------------------------------------------------------------- Flask wrapper


def create_mock_app(
    latency: float = 0.0,
    error_rate: float = 0.0,
    error_status: int = 500,
    retry_after: float | None = None,
    stream_chunk_delay: float = 0.0,
    seed: int | None = None,
) -> Flask:
    """A Flask app serving the mock; its :class:`MockState` is ``get_mock_state(app)``."""
    from flask import Flask

    state = MockState(latency, error_rate, error_status, retry_after, stream_chunk_delay, seed)
    app = Flask("bellaq.mock_upstream")
    app.wsgi_app = MockUpstreamApp(state)  # type: ignore[method-assign]
    app.extensions[EXTENSION_KEY] = state
    return app


def get_mock_state(app: Flask) -> MockState:
    """The run-time knobs of an app made by :func:`create_mock_app`."""
    return app.extensions[EXTENSION_KEY]


# --------------------------------------------------------------------------- in-process server


def _knob(name: str) -> property:
    def fget(self: MockUpstream) -> Any:
        return getattr(self.state, name)

    def fset(self: MockUpstream, value: Any) -> None:
        setattr(self.state, name, value)

    return property(fget, fset, doc=f"Run-time knob ``{name}`` (settable while running).")


class MockUpstream:
    """The mock on 127.0.0.1 (free port) in a background thread; a context manager.

    ``base_url`` has no ``/v1`` (``http://127.0.0.1:PORT``): endpoints such as
    ``/v1/chat/completions`` are appended to it. Recording of requests is on.
    """

    latency = _knob("latency")
    error_rate = _knob("error_rate")
    error_status = _knob("error_status")
    retry_after = _knob("retry_after")
    stream_chunk_delay = _knob("stream_chunk_delay")

    def __init__(
        self,
        latency: float = 0.0,
        error_rate: float = 0.0,
        error_status: int = 500,
        retry_after: float | None = None,
        stream_chunk_delay: float = 0.0,
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._defaults = (latency, error_rate, error_status, retry_after, stream_chunk_delay)
        self.app = create_mock_app(latency, error_rate, error_status, retry_after, stream_chunk_delay, seed)
        self.state = get_mock_state(self.app)
        self.state.record = True
        self.host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> MockUpstream:
        """Start serving (idempotent)."""
        if self._server is not None:
            return self
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _QuietHandler(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = make_server(self.host, self._port, self.app, threaded=True, request_handler=_QuietHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mock-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._server is None:
            raise RuntimeError("MockUpstream is not running")
        return int(self._server.server_port)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """``base_url + path``."""
        return self.base_url + path

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far."""
        return self.state.requests

    @property
    def request_count(self) -> int:
        """How many requests were received so far."""
        return self.state.request_count

    def script(self, statuses: Iterable[int], retry_after: float | None = None) -> None:
        """Answer the next requests with these statuses, in order (200 = normal), then normally."""
        self.state.script(statuses, retry_after)

    def reset(self) -> None:
        """Restore the constructor's knobs; forget requests and any remaining script."""
        latency, error_rate, error_status, retry_after, stream_chunk_delay = self._defaults
        self.state.latency = latency
        self.state.error_rate = error_rate
        self.state.error_status = error_status
        self.state.retry_after = retry_after
        self.state.stream_chunk_delay = stream_chunk_delay
        self.state.clear()


# --------------------------------------------------------------------------- gevent server


def _raise_nofile_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _exit_when_orphaned(parent_pid: int) -> None:
    """In a forked server process: exit once the parent is gone."""
    import gevent

    while os.getppid() == parent_pid:
        gevent.sleep(1.0)
    os._exit(0)


def _serve_on(listener: Any, state: MockState, signals: tuple[int, ...]) -> None:
    import gevent
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(listener, MockUpstreamApp(state), log=None)
    in_main_thread = threading.current_thread() is threading.main_thread()
    for signum in signals if in_main_thread else ():  # stop gracefully, no KeyboardInterrupt in the hub
        gevent.signal_handler(signum, lambda: gevent.spawn(server.stop, 1))
    server.serve_forever()


def nodelay_pywsgi() -> None:
    """Set TCP_NODELAY on every connection gevent's pywsgi accepts: without it a keep-alive
    answer sent as headers then body waits ~40 ms for the client's delayed ACK."""
    from gevent import pywsgi

    original = pywsgi.WSGIHandler.__init__

    def init(self: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        original(self, sock, *args, **kwargs)

    pywsgi.WSGIHandler.__init__ = init  # type: ignore[method-assign]


def serve(
    port: int,
    host: str = "127.0.0.1",
    latency: float = 0.0,
    error_rate: float = 0.0,
    error_status: int = 500,
    retry_after: float | None = None,
    stream_chunk_delay: float = 0.0,
    seed: int | None = None,
    backlog: int = 4096,
    processes: int = 1,
) -> None:
    """Serve the mock with gevent's pywsgi until interrupted (one greenlet per connection).

    Sleeps use ``gevent.sleep``, so this works with or without monkey-patching. With
    ``processes > 1`` the listening socket is shared by that many forked processes (POSIX only);
    each has its own knobs and counters, and the children stop when the parent does.
    """
    import signal

    import gevent
    from gevent import socket as gsocket

    _raise_nofile_limit()
    nodelay_pywsgi()
    family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
    listener = gsocket.socket(family, gsocket.SOCK_STREAM)
    listener.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    bound_host, bound_port = listener.getsockname()[:2]
    print(
        f"bellaq mock upstream on http://{bound_host}:{bound_port} (pid {os.getpid()}, "
        f"processes={processes}, latency={latency}, error_rate={error_rate}, "
        f"error_status={error_status}, retry_after={retry_after})",
        file=sys.stderr,
        flush=True,
    )

    def make_state(index: int) -> MockState:
        return MockState(
            latency,
            error_rate,
            error_status,
            retry_after,
            stream_chunk_delay,
            None if seed is None else seed + index,
            sleep=gevent.sleep,
        )

    parent = os.getpid()
    children: list[int] = []
    for index in range(1, max(1, processes)):
        pid = gevent.fork()
        if pid == 0:
            code = 0
            try:
                gevent.spawn(_exit_when_orphaned, parent)
                _serve_on(listener, make_state(index), (signal.SIGINT,))
            except KeyboardInterrupt:
                pass
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    try:
        _serve_on(listener, make_state(0), (signal.SIGINT, signal.SIGTERM))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        listener.close()


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of :func:`main`."""
    p = argparse.ArgumentParser(prog="python -m bellaq.mock_upstream", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18999, help="port to listen on (default 18999)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait before answering")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with an error")
    p.add_argument("--error-status", type=int, default=500, help="status of those errors (e.g. 429, 500)")
    p.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds on error answers")
    p.add_argument("--stream-chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    p.add_argument("--seed", type=int, default=None, help="random seed for error_rate")
    p.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    p.add_argument("--processes", type=int, default=1, help="server processes sharing the port (default 1)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: monkey-patch with gevent, then :func:`serve`."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    args = build_parser().parse_args(argv)
    try:
        serve(
            args.port,
            host=args.host,
            latency=args.latency,
            error_rate=args.error_rate,
            error_status=args.error_status,
            retry_after=args.retry_after,
            stream_chunk_delay=args.stream_chunk_delay,
            seed=args.seed,
            backlog=args.backlog,
            processes=args.processes,
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
