"""The mock as a plain WSGI callable (no per-request framework overhead), driven by a MockState.

A model request goes through, in order: the outage, the provider limits (a refusal is a 429
with ``Retry-After``), the latency, scripted statuses and random errors, the checks of the body,
then the answer, whose tokens settle the charge. ``GET /mock/stats`` answers the counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from bellaq.errors import error_body
from bellaq.mock_upstream import answers
from bellaq.mock_upstream.answers import CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH
from bellaq.mock_upstream.limits import Refusal
from bellaq.mock_upstream.state import MockState

if TYPE_CHECKING:
    from flask import Flask

StartResponse = Callable[..., Any]

STATS_PATH = "/mock/stats"
DEFAULT_EMBEDDING_DIM = 8
MAX_EMBEDDING_DIM = 4096
MAX_BODY_BYTES = 32 * 1024 * 1024
EXTENSION_KEY = "bellaq_mock_upstream"

# status -> (type, code, default message), as OpenAI's servers spell them
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
_SERVER_ERROR = ("server_error", None, "mock error: the server had an error processing your request")
_OTHER_ERROR = ("invalid_request_error", None, "mock error")


@dataclass
class Reply:
    """An answer before it is sent: a JSON ``body``, or ``events`` to stream as SSE."""

    status: int
    body: Any = None
    events: Iterator[dict[str, Any]] | None = None
    used: int | None = None  # usage.total_tokens of an answer that settles its charge
    headers: list[tuple[str, str]] = field(default_factory=list)


def _retry_headers(seconds: float, whole: bool = False) -> list[tuple[str, str]]:
    """``Retry-After`` (whole seconds, at least 1, when ``whole``) and ``retry-after-ms``."""
    if whole:
        value = str(max(1, math.ceil(seconds)))
    else:
        value = str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))
    return [("Retry-After", value), ("retry-after-ms", str(max(1 if whole else 0, math.ceil(seconds * 1000))))]


def error(status: int, message: str | None = None, param: str | None = None,
          retry_after: float | None = None) -> Reply:
    """An error answer in the OpenAI envelope, typed as OpenAI types ``status``."""
    type_, code, default = _ERROR_KINDS.get(status, _SERVER_ERROR if status >= 500 else _OTHER_ERROR)
    headers = _retry_headers(retry_after) if retry_after is not None else []
    return Reply(status, error_body(message or default, type_, code, param), headers=headers)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _float_header(environ: dict[str, Any], key: str) -> float | None:
    try:
        value = float(environ[key])
    except (KeyError, ValueError):
        return None
    return value if value >= 0 else None


def _read_body(environ: dict[str, Any]) -> tuple[bytes, bool]:
    """The request body and whether it was over :data:`MAX_BODY_BYTES` (then it is not read)."""
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


class MockUpstreamApp:
    """The mock as a plain WSGI callable, driven by a :class:`MockState`."""

    def __init__(self, state: MockState | None = None) -> None:
        self.state = state or MockState()
        self._routes: dict[str, Callable[[dict[str, Any], bytes, str], Reply]] = {
            CHAT_PATH: self._complete_chat,
            COMPLETIONS_PATH: self._complete_text,
            EMBEDDINGS_PATH: self._embeddings,
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        if path == STATS_PATH:  # not a request to the model: neither recorded nor counted
            return self._send(environ, start_response, self._stats(method, environ))
        reply = self._handle(environ, method, path)
        self.state.answered(reply.status)
        return self._send(environ, start_response, reply)

    # -- sending

    def _send(self, environ: dict[str, Any], start_response: StartResponse, reply: Reply) -> Iterable[bytes]:
        headers = [("x-request-id", "req_" + os.urandom(12).hex()), *reply.headers]
        if reply.events is None:
            payload = _dumps(reply.body)
            start_response(_status_line(reply.status), [("Content-Type", "application/json"),
                                                        ("Content-Length", str(len(payload))), *headers])
            return [payload]
        delay = _float_header(environ, "HTTP_X_MOCK_CHUNK_DELAY")
        start_response(_status_line(reply.status), [("Content-Type", "text/event-stream; charset=utf-8"),
                                                    ("Cache-Control", "no-cache"), *headers])
        return self._sse_body(reply.events, self.state.stream_chunk_delay if delay is None else delay)

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

    def _stats(self, method: str, environ: dict[str, Any]) -> Reply:
        if method != "GET":
            return error(405, f"Method {method} is not allowed on {STATS_PATH}; use GET.")
        raw = parse_qs(environ.get("QUERY_STRING", "")).get("window", ["60"])[-1]
        try:
            window = float(raw)
        except ValueError:
            window = math.nan
        if not 0 < window < math.inf:
            return error(400, "'window' must be a positive number of seconds.", "window")
        return Reply(200, self.state.stats(window))

    def _handle(self, environ: dict[str, Any], method: str, path: str) -> Reply:
        state = self.state
        handler = self._routes.get(path)
        if handler is None or method != "POST":
            state.note(method, path, None, environ)
            if handler is None:
                return error(404, f"Unknown request URL: {method} {path}. Please check the URL for typos.")
            return error(405, f"Method {method} is not allowed on {path}; use POST.")
        raw, too_large = _read_body(environ)
        body: Any = None
        bad_json = False
        if not too_large:
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, RecursionError):  # not JSON, bad UTF-8, or nested too deep
                bad_json = True
        state.note(method, path, body, environ)

        outage = state.outage()
        if outage is not None:
            return error(outage[0], retry_after=outage[1])
        admission = state.admit(answers.estimate_tokens(path, body, state.default_max_tokens))
        if admission.refusal is not None:
            return self._refused(admission.refusal, admission.headers, body)
        reply = self._answer(environ, handler, raw, body, too_large, bad_json)
        settled = admission.headers if reply.used is None else state.settle(admission, reply.used)
        reply.headers.extend(settled)
        return reply

    @staticmethod
    def _refused(refusal: Refusal, limit_headers: list[tuple[str, str]], body: Any) -> Reply:
        model = body.get("model") if isinstance(body, dict) else None
        message = refusal.message(model if isinstance(model, str) and model else "this model")
        headers = list(limit_headers)
        if refusal.wait is not None:
            headers[:0] = _retry_headers(refusal.wait, whole=True)
        return Reply(429, error_body(message, refusal.kind, "rate_limit_exceeded"), headers=headers)

    def _answer(self, environ: dict[str, Any], handler: Callable[[dict[str, Any], bytes, str], Reply],
                raw: bytes, body: Any, too_large: bool, bad_json: bool) -> Reply:
        state = self.state
        latency = _float_header(environ, "HTTP_X_MOCK_LATENCY")
        latency = state.latency if latency is None else latency
        if latency > 0:
            state.sleep(latency)

        scripted = state.next_scripted()
        if scripted is not None:
            status, retry_after = scripted
            if status != 200:
                return error(status, retry_after=state.retry_after if retry_after is None else retry_after)
        elif state.error_rate > 0 and state.rng.random() < state.error_rate:
            return error(state.error_status, retry_after=state.retry_after)

        if too_large:
            return error(413, f"Request body larger than {MAX_BODY_BYTES} bytes.")
        if bad_json or not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request. The body must be a JSON object.")
        mock_status = body.get("mock_status")
        if isinstance(mock_status, int) and not isinstance(mock_status, bool) and mock_status != 200:
            return error(mock_status, retry_after=state.retry_after)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter (a string).", "model")
        return handler(body, raw, model)

    # -- endpoints

    def _complete_chat(self, body: dict[str, Any], raw: bytes, model: str) -> Reply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return error(400, "'messages' must be a non-empty array of message objects.", "messages")
        last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1])
        texts = [answers.text_of(last.get("content"))]
        return self._complete(answers.CHAT, body, raw, model, texts, answers.tokens_of_messages(messages))

    def _complete_text(self, body: dict[str, Any], raw: bytes, model: str) -> Reply:
        prompts = answers.prompts_of(body.get("prompt"))
        if prompts is None:
            return error(400, "'prompt' must be a string or a non-empty array of strings.", "prompt")
        texts = [answers.prompt_text(p) for p in prompts]
        return self._complete(answers.TEXT, body, raw, model, texts, answers.tokens_of_prompts(prompts))

    def _complete(self, flavour: answers.Flavour, body: dict[str, Any], raw: bytes, model: str,
                  texts: list[str], prompt_tokens: int) -> Reply:
        """One chat or text completion, whole or streamed: an echo of each text."""
        max_tokens = answers.budget(body, self.state.default_max_tokens)
        choices = [answers.echo_pieces(text, max_tokens) for text in texts]
        used = answers.usage(prompt_tokens, sum(len(pieces) for pieces, _ in choices))
        cid = flavour.id_prefix + _digest(raw)
        created = int(time.time())
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            events = answers.chunks(flavour, cid, created, model, choices, used, include_usage)
            return Reply(200, events=events, used=used["total_tokens"])
        return Reply(200, answers.completion(flavour, cid, created, model, choices, used), used=used["total_tokens"])

    def _embeddings(self, body: dict[str, Any], raw: bytes, model: str) -> Reply:
        inputs = answers.prompts_of(body.get("input"))
        if inputs is None:
            return error(400, "'input' must be a string, an array of strings or an array of token arrays.", "input")
        dim = body.get("dimensions", DEFAULT_EMBEDDING_DIM)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            return error(400, f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIM}.", "dimensions")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return error(400, "'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        data = []
        for index, text in enumerate(answers.prompt_text(p) for p in inputs):
            vector: Any = answers.embedding(text, dim)
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        used = answers.usage(answers.tokens_of_prompts(inputs))
        return Reply(200, {"object": "list", "data": data, "model": model, "usage": used}, used=used["total_tokens"])


def create_mock_app(**knobs: Any) -> Flask:
    """A Flask app serving the mock (``knobs``: keyword arguments of :class:`MockState`); its
    state is ``get_mock_state(app)``."""
    from flask import Flask

    state = MockState(**knobs)
    app = Flask("bellaq.mock_upstream")
    app.wsgi_app = MockUpstreamApp(state)  # type: ignore[method-assign]
    app.extensions[EXTENSION_KEY] = state
    return app


def get_mock_state(app: Flask) -> MockState:
    """The run-time knobs of an app made by :func:`create_mock_app`."""
    return app.extensions[EXTENSION_KEY]
