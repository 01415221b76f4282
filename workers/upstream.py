"""HTTP client for the OpenAI-compatible upstream of built-in workers (SPEC section 5).

:class:`UpstreamClient` POSTs a task's ``data`` to ``<base_url><endpoint>`` through a urllib3
connection pool per upstream origin and process (:func:`get_pool`), retries connection errors,
timeouts, 429 and 5xx with exponential backoff and full jitter (honouring ``Retry-After``),
bounded by ``max_attempts`` and by a deadline, and reads streaming (SSE) answers chunk by chunk as
they arrive (:mod:`workers.sse`).

The pools are made as ``requests`` would connect: HTTPS verifies certificates against
``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` if set, else certifi's bundle; the environment's
proxies (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) are read once per pool. A
pool keeps up to ``BELLAQ_UPSTREAM_POOL_MAXSIZE`` idle connections and never blocks: a call that
finds none idle opens one more (closed after use if the pool is full), so the only bound on
concurrent calls is the caller's (the consumer's in-flight tasks), not a wait hidden in here.
Greenlets of a gevent worker share the pools like threads do.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Any, Literal

import certifi
import urllib3
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import HTTPError, LocationParseError
from urllib3.response import BaseHTTPResponse
from urllib3.util import parse_url

from workers.sse import aggregate_chunks, raw_blocks, sse_chunks, sse_data

__all__ = [
    "InvalidUpstreamURL",
    "StreamEvent",
    "UpstreamClient",
    "UpstreamResult",
    "aggregate_chunks",
    "duration_seconds",
    "get_pool",
    "limit_wait_seconds",
    "retry_after_seconds",
]

POOL_MAXSIZE = int(os.environ.get("BELLAQ_UPSTREAM_POOL_MAXSIZE", "512"))  # idle connections kept per upstream
CONNECT_TIMEOUT = 10.0
ERROR_SNIPPET_CHARS = 500
MAX_TARGETS = 256  # request targets a client remembers (one per endpoint it calls)
# what a call that got no answer may raise: urllib3's errors and what escapes its wrapping
TRANSPORT_ERRORS = (HTTPError, OSError, HTTPException)


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


def _result_from(resp: BaseHTTPResponse, content: bytes, attempts: int) -> UpstreamResult:
    """The result of a whole (non-streamed) answer, with the provider's signals."""
    return _signals(_answer_from(resp, content, attempts), resp.headers)


def _answer_from(resp: BaseHTTPResponse, content: bytes, attempts: int) -> UpstreamResult:
    """The result of a whole (non-streamed) answer.

    A 2xx SSE answer is aggregated like :meth:`UpstreamClient.stream` does; a 2xx answer that is
    not JSON becomes a 502 (the caller must not take an error page for a model answer).
    """
    request_id = resp.headers.get("x-request-id") or _new_request_id()
    status = resp.status
    if 200 <= status < 300:
        if "text/event-stream" in resp.headers.get("content-type", ""):
            return UpstreamResult(status, aggregate_chunks(sse_chunks(content)), request_id, attempts)
        try:
            return UpstreamResult(status, json.loads(content), request_id, attempts)
        except ValueError:
            snippet = content[:ERROR_SNIPPET_CHARS].decode("utf-8", errors="replace").strip()
            body = _error_envelope(f"upstream answered {status} with a body that is not JSON: {snippet!r}")
            return UpstreamResult(502, body, request_id, attempts)
    return UpstreamResult(status, _parse_body(content), request_id, attempts)


def _is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class InvalidUpstreamURL(ValueError):
    """A URL no request can be sent to (no http(s) scheme, no host, a bad port)."""


@dataclass(frozen=True)
class _Route:
    """How this process reaches one upstream origin."""

    pool: HTTPConnectionPool
    absolute: bool  # through an HTTP proxy: the request target is the whole URL


_routes: dict[tuple[int, str, str, int | None], _Route] = {}
_routes_lock = threading.Lock()


def _ca_bundle() -> str:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


def _proxy_url(scheme: str, host: str, port: int | None) -> str | None:
    """The environment's proxy for this origin, unless ``NO_PROXY`` exempts it."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return None
    netloc = f"{host}:{port}" if port is not None else host
    if urllib.request.proxy_bypass(netloc) or urllib.request.proxy_bypass(host):
        return None
    return proxy


def _new_route(scheme: str, host: str, port: int | None) -> _Route:
    options: dict[str, Any] = {"maxsize": POOL_MAXSIZE, "block": False, "retries": False}
    if scheme == "https":
        options.update(cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle())
    proxy = _proxy_url(scheme, host, port)
    if proxy is None:
        cls = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
        return _Route(cls(host, port, **options), absolute=False)
    manager = urllib3.ProxyManager(proxy, num_pools=1, **options)
    return _Route(manager.connection_from_host(host, port, scheme), absolute=scheme == "http")


def _origin(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, request target) of an upstream URL; dot segments are removed as any
    HTTP client does (``bellaq.upstream_rules`` refuses endpoints that have them)."""
    try:
        parsed = parse_url(url)
    except LocationParseError as exc:
        raise InvalidUpstreamURL(str(exc)) from exc
    scheme = parsed.scheme
    if scheme not in ("http", "https"):
        raise InvalidUpstreamURL("no scheme" if scheme is None else f"scheme {scheme!r} is not http or https")
    if not parsed.host:
        raise InvalidUpstreamURL("no host")
    return scheme, parsed.host, parsed.port, parsed.request_uri


def _route(scheme: str, host: str, port: int | None) -> _Route:
    key = (os.getpid(), scheme, host, port)
    route = _routes.get(key)
    if route is None:
        with _routes_lock:
            route = _routes.get(key)
            if route is None:
                route = _routes[key] = _new_route(scheme, host, port)
    return route


def get_pool(url: str) -> HTTPConnectionPool:
    """The connection pool of this process for ``url``'s origin (new after a fork; through the
    environment's proxy if one applies). Raises :class:`InvalidUpstreamURL`."""
    scheme, host, port, _ = _origin(url)
    return _route(scheme, host, port).pool


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
        self._targets: dict[str, tuple[str, str, int | None, str]] = {}
        self._headers = {stream: self._make_headers(stream) for stream in (False, True)}

    # -- plumbing

    def _make_headers(self, stream: bool) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _target(self, url: str) -> tuple[_Route, str]:
        """The route and request target of ``url`` (parsed once per endpoint)."""
        origin = self._targets.get(url)
        if origin is None:
            origin = _origin(url)
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[url] = origin
        scheme, host, port, target = origin
        route = _route(scheme, host, port)
        return route, url if route.absolute else target

    def _timeout(self, deadline: float | None) -> urllib3.Timeout:
        read = self.timeout
        if deadline is not None:
            read = max(0.001, min(read, deadline - time.monotonic()))
        return urllib3.Timeout(connect=min(CONNECT_TIMEOUT, read), read=read)

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
    ) -> tuple[BaseHTTPResponse | None, UpstreamResult | None, int, str]:
        """POST with the retry rule. Returns (streaming 2xx response, None, attempts, "") when a
        stream may start, else (None, final result or None, attempts, last error text)."""
        url = self.base_url + endpoint
        attempts = 0
        last: UpstreamResult | None = None
        reason = "no attempt was made"
        try:
            body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return None, None, attempts, f"the request cannot be sent as JSON: {exc}"
        headers = self._headers[stream]
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                if last is None:
                    reason = f"deadline passed ({reason})" if attempts else "deadline passed before the call"
                return None, last, attempts, reason
            attempts += 1
            retry_after: float | None = None
            try:
                route, target = self._target(url)
            except InvalidUpstreamURL as exc:
                return None, last, attempts, f"invalid upstream URL {url!r}: {exc}"
            try:
                resp = route.pool.urlopen(
                    "POST", target, body=body, headers=headers, retries=False, redirect=False,
                    assert_same_host=False, timeout=self._timeout(deadline), preload_content=not stream,
                )
                if stream:
                    if 200 <= resp.status < 300:
                        return resp, None, attempts, ""
                    content = _read_all(resp)
                else:
                    content = resp.data
            except TRANSPORT_ERRORS as exc:
                reason = f"{type(exc).__name__} calling {url}: {exc}"
            else:
                last = _result_from(resp, content, attempts)
                if not _is_retryable_status(resp.status):
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
                    result = _result_from(resp, _read_all(resp), attempts)
                except TRANSPORT_ERRORS as exc:
                    body = _error_envelope(f"upstream answer broke: {type(exc).__name__}: {exc}", "stream_broken")
                    result = UpstreamResult(502, body, request_id, attempts)
                yield StreamEvent(kind="done", result=result)
                return
            yield from self._read_sse(resp, request_id, attempts, deadline)
        finally:
            _release(resp)

    def _read_sse(
        self, resp: BaseHTTPResponse, request_id: str, attempts: int, deadline: float | None
    ) -> Iterator[StreamEvent]:
        chunks: list[dict[str, Any]] = []

        def failed(status: int, message: str, code: str) -> StreamEvent:
            body = _error_envelope(message, code)
            return StreamEvent(kind="done", result=UpstreamResult(status, body, request_id, attempts))

        got_done = False
        try:
            for payload in sse_data(raw_blocks(resp)):
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
        except TRANSPORT_ERRORS as exc:
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
        result = _signals(UpstreamResult(resp.status, body, request_id, attempts), resp.headers)
        yield StreamEvent(kind="done", result=result)


def _read_all(resp: BaseHTTPResponse) -> bytes:
    """The rest of a streamed answer (its connection released either way)."""
    try:
        return resp.read()
    finally:
        _release(resp)


def _release(resp: BaseHTTPResponse) -> None:
    """Give a streamed answer's connection back to its pool: as it is when the body was read to
    the end, else closed first (unread bytes would be taken for the next answer)."""
    if not resp.closed:
        resp.close()
    resp.release_conn()
