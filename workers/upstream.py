"""HTTP client for the OpenAI-compatible upstream of built-in workers (SPEC section 5).

:class:`UpstreamClient` POSTs a task's ``data`` to ``<base_url><endpoint>`` with pooled
``requests`` sessions, retries connection errors, timeouts, 429 and 5xx with exponential backoff
and full jitter (honouring ``Retry-After``), bounded by ``max_attempts`` and by a deadline, and
reads streaming (SSE) answers chunk by chunk as they arrive.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter

__all__ = [
    "StreamEvent",
    "UpstreamClient",
    "UpstreamResult",
    "aggregate_chunks",
    "duration_seconds",
    "get_session",
    "limit_wait_seconds",
    "retry_after_seconds",
]

POOL_MAXSIZE = int(os.environ.get("BELLAQ_UPSTREAM_POOL_MAXSIZE", "512"))  # idle connections kept per upstream
CONNECT_TIMEOUT = 10.0
ERROR_SNIPPET_CHARS = 500
READ_BLOCK = 65536


@dataclass
class UpstreamResult:
    """The final answer of the upstream (or a synthesized 504 when it never answered)."""

    status_code: int
    body: Any  # parsed JSON; for a non-JSON answer an OpenAI error envelope with a text snippet
    request_id: str  # the upstream's x-request-id, or a generated "req_<hex>"
    attempts: int
    retry_after: float | None = None  # seconds, from Retry-After / retry-after-ms
    limit_wait: float | None = None  # seconds until an x-ratelimit-remaining-* that reached 0 frees a unit
    announced_rpm: int | None = None  # the provider's own limits: x-ratelimit-limit-requests / -tokens
    announced_tpm: int | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status_code < 300


@dataclass
class StreamEvent:
    """One event of :meth:`UpstreamClient.stream`: a ``"chunk"`` (``data``) or the final ``"done"``
    (``result``)."""

    kind: Literal["chunk", "done"]
    data: dict[str, Any] | None = None
    result: UpstreamResult | None = None


# --------------------------------------------------------------------------- helpers


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP-date), else None.

    Negative or past values give 0.0; unparsable values give None.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
            return None
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _retry_after_from_headers(headers: Any) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
            if value >= 0 and value == value:
                return value / 1000.0
        except ValueError:
            pass
    return retry_after_seconds(headers.get("retry-after"))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: str | None) -> float | None:
    """Seconds of an ``x-ratelimit-reset-*`` value (Go's duration format: ``12ms``, ``1.5s``,
    ``6m0s``; a bare number is seconds), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def limit_wait_seconds(headers: Any, tokens: int | None = None) -> float | None:
    """How long until a provider limit whose ``x-ratelimit-remaining-*`` reached 0 lets one more
    request through: the reset time (until the limit is whole again) scaled to one request, or to
    ``tokens`` tokens; None when no limit reached 0."""
    waits = []
    for kind, need in (("requests", 1), ("tokens", tokens or 1)):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        try:
            if remaining is None or float(remaining) > 0:
                continue
        except ValueError:
            continue
        reset = duration_seconds(headers.get(f"x-ratelimit-reset-{kind}"))
        if reset is None:
            continue
        try:
            limit = float(headers.get(f"x-ratelimit-limit-{kind}") or 0)
        except ValueError:
            limit = 0.0
        waits.append(reset * min(1.0, need / limit) if limit > 0 else reset)
    return max(waits) if waits else None


def _signals(result: UpstreamResult, headers: Any) -> UpstreamResult:
    """Note the provider's retry and rate-limit signals on ``result``."""
    result.retry_after = _retry_after_from_headers(headers)
    body = result.body if isinstance(result.body, dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    total = usage.get("total_tokens")
    result.limit_wait = limit_wait_seconds(headers, total if isinstance(total, int) else None)
    result.announced_rpm = _positive_int(headers.get("x-ratelimit-limit-requests"))
    result.announced_tpm = _positive_int(headers.get("x-ratelimit-limit-tokens"))
    return result


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def _new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _error_envelope(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}


def _parse_body(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        text = content[:ERROR_SNIPPET_CHARS].decode("utf-8", errors="replace").strip()
        return _error_envelope(text or "the upstream answered with an empty, non-JSON body")


def _result_from(resp: requests.Response, content: bytes, attempts: int) -> UpstreamResult:
    """The result of a whole (non-streamed) answer, with the provider's signals."""
    return _signals(_answer_from(resp, content, attempts), resp.headers)


def _answer_from(resp: requests.Response, content: bytes, attempts: int) -> UpstreamResult:
    """The result of a whole (non-streamed) answer.

    A 2xx SSE answer is aggregated like :meth:`UpstreamClient.stream` does; a 2xx answer that is
    not JSON becomes a 502 (the caller must not take an error page for a model answer).
    """
    request_id = resp.headers.get("x-request-id") or _new_request_id()
    status = resp.status_code
    if 200 <= status < 300:
        if "text/event-stream" in resp.headers.get("content-type", ""):
            chunks = []
            for payload in _sse_data(iter([content])):
                if payload.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(chunk, dict):
                    chunks.append(chunk)
            return UpstreamResult(status, aggregate_chunks(chunks), request_id, attempts)
        try:
            return UpstreamResult(status, json.loads(content), request_id, attempts)
        except ValueError:
            snippet = content[:ERROR_SNIPPET_CHARS].decode("utf-8", errors="replace").strip()
            body = _error_envelope(f"upstream answered {status} with a body that is not JSON: {snippet!r}")
            return UpstreamResult(502, body, request_id, attempts)
    return UpstreamResult(status, _parse_body(content), request_id, attempts)


def _is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


_sessions: dict[tuple[int, str], requests.Session] = {}
_sessions_lock = threading.Lock()


def get_session(base_url: str) -> requests.Session:
    """The pooled session of this process for ``base_url`` (new after a fork)."""
    key = (os.getpid(), base_url)
    session = _sessions.get(key)
    if session is None:
        with _sessions_lock:
            session = _sessions.get(key)
            if session is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_MAXSIZE, max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                _sessions[key] = session
    return session


def _merge_tool_calls(target: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", len(target))
        while len(target) <= index:
            target.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call = target[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        fn = delta.get("function")
        if isinstance(fn, dict):
            if fn.get("name"):
                call["function"]["name"] += fn["name"]
            if fn.get("arguments"):
                call["function"]["arguments"] += fn["arguments"]


def aggregate_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the non-streaming object from streamed chunks.

    ``chat.completion.chunk`` chunks give a ``chat.completion`` (content, refusal, tool calls and
    logprobs concatenated per choice, last ``finish_reason``, ``usage`` if sent); ``text_completion``
    chunks give a ``text_completion``.
    """
    first = chunks[0] if chunks else {}
    is_text = first.get("object") == "text_completion"
    result: dict[str, Any] = {
        "id": first.get("id"),
        "object": "text_completion" if is_text else "chat.completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model"),
    }
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    fingerprint = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("system_fingerprint"):
            fingerprint = chunk["system_fingerprint"]
        for c in chunk.get("choices") or []:
            if not isinstance(c, dict):
                continue
            index = c.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                if is_text:
                    choice = {"text": "", "index": index, "logprobs": None, "finish_reason": None}
                else:
                    choice = {
                        "index": index,
                        "message": {"role": "assistant", "content": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                choices[index] = choice
            if c.get("finish_reason") is not None:
                choice["finish_reason"] = c["finish_reason"]
            if is_text:
                choice["text"] += c.get("text") or ""
                continue
            delta = c.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if delta.get("content") is not None:
                message["content"] = (message["content"] or "") + delta["content"]
            if delta.get("refusal") is not None:
                message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
            if delta.get("tool_calls"):
                _merge_tool_calls(message.setdefault("tool_calls", []), delta["tool_calls"])
            logprobs = c.get("logprobs")
            if isinstance(logprobs, dict):
                target = choice["logprobs"] or {"content": None, "refusal": None}
                for key in ("content", "refusal"):
                    if logprobs.get(key):
                        target[key] = (target.get(key) or []) + list(logprobs[key])
                choice["logprobs"] = target
    if fingerprint is not None:
        result["system_fingerprint"] = fingerprint
    result["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        result["usage"] = usage
    return result


# --------------------------------------------------------------------------- client


class UpstreamClient:
    """Calls one OpenAI-compatible upstream, with retries (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.session = get_session(self.base_url)

    # -- plumbing

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        headers["Accept"] = "text/event-stream" if stream else "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _timeout(self, deadline: float | None) -> tuple[float, float]:
        read = self.timeout
        if deadline is not None:
            read = max(0.001, min(read, deadline - time.monotonic()))
        return (min(CONNECT_TIMEOUT, read), read)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return random.uniform(0.0, ceiling)

    def _wait(self, attempt: int, retry_after: float | None, deadline: float | None) -> bool:
        """Sleep before the next attempt; False when no attempt may follow (limit or deadline)."""
        if attempt >= self.max_attempts:
            return False
        delay = self._backoff(attempt, retry_after)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return False
        if delay > 0:
            time.sleep(delay)
        return True

    def _no_answer(self, attempts: int, reason: str) -> UpstreamResult:
        return UpstreamResult(
            status_code=504,
            body=_error_envelope(f"upstream did not answer: {reason}", "upstream_unavailable"),
            request_id=_new_request_id(),
            attempts=attempts,
        )

    def _send(
        self, endpoint: str, data: dict[str, Any], deadline: float | None, stream: bool
    ) -> tuple[requests.Response | None, UpstreamResult | None, int, str]:
        """POST with the retry rule. Returns (streaming 2xx response, None, attempts, "") when a
        stream may start, else (None, final result or None, attempts, last error text)."""
        url = self.base_url + endpoint
        attempts = 0
        last: UpstreamResult | None = None
        reason = "no attempt was made"
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                if last is None:
                    reason = f"deadline passed ({reason})" if attempts else "deadline passed before the call"
                return None, last, attempts, reason
            attempts += 1
            retry_after: float | None = None
            try:
                resp = self.session.post(
                    url,
                    json=data,
                    headers=self._headers(stream),
                    timeout=self._timeout(deadline),
                    stream=stream,
                )
                if stream and 200 <= resp.status_code < 300:
                    return resp, None, attempts, ""
                try:
                    content = resp.content
                finally:
                    resp.close()
            except (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
            ) as exc:
                return None, last, attempts, f"invalid upstream URL {url!r}: {exc}"
            except requests.exceptions.RequestException as exc:
                reason = f"{type(exc).__name__} calling {url}: {exc}"
            else:
                last = _result_from(resp, content, attempts)
                if not _is_retryable_status(resp.status_code):
                    return None, last, attempts, ""
                retry_after = _retry_after_from_headers(resp.headers)
            if not self._wait(attempts, retry_after, deadline):
                # out of attempts or time: the last answer we got (if any) is the result
                return None, last, attempts, reason

    def _final(self, result: UpstreamResult | None, attempts: int, reason: str) -> UpstreamResult:
        if result is None:
            return self._no_answer(attempts, reason)
        result.attempts = attempts
        return result

    # -- public API

    def call(self, endpoint: str, data: dict[str, Any], deadline: float | None = None) -> UpstreamResult:
        """POST ``data`` to ``base_url + endpoint`` and return the final answer.

        Retries connection errors, timeouts, 429 and 5xx (backoff with full jitter, or the
        ``Retry-After`` capped at ``backoff_max``), at most ``max_attempts`` times and never
        sleeping past ``deadline`` (a ``time.monotonic()`` value). Other 4xx are returned at
        once. Without any answer: status 504 and an ``upstream_error`` envelope.
        """
        _, result, attempts, reason = self._send(endpoint, data, deadline, stream=False)
        return self._final(result, attempts, reason)

    def stream(self, endpoint: str, data: dict[str, Any], deadline: float | None = None) -> Iterator[StreamEvent]:
        """POST a streaming request; yield a ``chunk`` event per SSE ``data:`` object as it
        arrives, then one ``done`` event whose result body is the aggregated object.

        The initial response follows the retry rule of :meth:`call`; a non-2xx final answer
        gives a single ``done`` event with it. A stream that breaks (or passes ``deadline``)
        after chunks were sent ends with a ``done`` event of status 502 (504 for the deadline).
        """
        resp, result, attempts, reason = self._send(endpoint, data, deadline, stream=True)
        if resp is None:
            yield StreamEvent(kind="done", result=self._final(result, attempts, reason))
            return
        request_id = resp.headers.get("x-request-id") or _new_request_id()
        try:
            content_type = resp.headers.get("content-type", "")
            if "text/event-stream" not in content_type:
                # the upstream ignored "stream": answer with what it sent
                try:
                    result = _result_from(resp, resp.content, attempts)
                except requests.exceptions.RequestException as exc:
                    body = _error_envelope(f"upstream answer broke: {type(exc).__name__}: {exc}", "stream_broken")
                    result = UpstreamResult(502, body, request_id, attempts)
                yield StreamEvent(kind="done", result=result)
                return
            yield from self._read_sse(resp, request_id, attempts, deadline)
        finally:
            resp.close()

    def _read_sse(
        self, resp: requests.Response, request_id: str, attempts: int, deadline: float | None
    ) -> Iterator[StreamEvent]:
        chunks: list[dict[str, Any]] = []

        def failed(status: int, message: str, code: str) -> StreamEvent:
            body = _error_envelope(message, code)
            return StreamEvent(kind="done", result=UpstreamResult(status, body, request_id, attempts))

        got_done = False
        try:
            for payload in _sse_data(_raw_blocks(resp)):
                if payload.strip() == "[DONE]":
                    got_done = True
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    yield failed(502, f"upstream sent a non-JSON stream event: {payload[:200]!r}", "bad_stream")
                    return
                if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                    body = chunk if isinstance(chunk.get("error"), dict) else _error_envelope(str(chunk))
                    yield StreamEvent(kind="done", result=UpstreamResult(502, body, request_id, attempts))
                    return
                if not isinstance(chunk, dict):
                    continue
                chunks.append(chunk)
                yield StreamEvent(kind="chunk", data=chunk)
                if deadline is not None and time.monotonic() >= deadline:
                    yield failed(504, "deadline passed while the upstream was streaming", "deadline_exceeded")
                    return
        except requests.exceptions.RequestException as exc:
            if deadline is not None and time.monotonic() >= deadline:
                yield failed(504, "deadline passed while the upstream was streaming", "deadline_exceeded")
                return
            yield failed(
                502,
                f"upstream stream broke after {len(chunks)} chunks: {type(exc).__name__}: {exc}",
                "stream_broken",
            )
            return
        finished = any(c.get("finish_reason") is not None for chunk in chunks for c in (chunk.get("choices") or []))
        if not got_done and not finished:
            yield failed(502, f"upstream stream ended early, after {len(chunks)} chunks", "stream_broken")
            return
        body = aggregate_chunks(chunks)
        result = _signals(UpstreamResult(resp.status_code, body, request_id, attempts), resp.headers)
        yield StreamEvent(kind="done", result=result)


def _raw_blocks(resp: requests.Response) -> Iterator[bytes]:
    """Bytes of the body as soon as they arrive (no waiting for a full buffer)."""
    raw = resp.raw
    if getattr(raw, "chunked", False):
        yield from resp.iter_content(chunk_size=None)
        return
    read1 = getattr(raw, "read1", None)
    if read1 is None:
        yield from resp.iter_content(chunk_size=1024)
        return
    try:
        while True:
            block = read1(READ_BLOCK)
            if not block:
                return
            yield block
    except Exception as exc:  # urllib3 errors -> requests errors, as iter_content does
        raise requests.exceptions.ChunkedEncodingError(exc) from exc


def _sse_data(blocks: Iterator[bytes]) -> Iterator[str]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines)."""
    buffer = b""
    data_lines: list[str] = []
    for block in blocks:
        buffer += block
        while True:
            nl = buffer.find(b"\n")
            if nl < 0:
                break
            line = buffer[:nl].rstrip(b"\r").decode("utf-8", errors="replace")
            buffer = buffer[nl + 1 :]
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data_lines.append(value)
    tail = buffer.rstrip(b"\r").decode("utf-8", errors="replace")
    if tail.startswith("data:"):
        value = tail[5:]
        data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield "\n".join(data_lines)
