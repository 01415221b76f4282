"""OpenAI-compatible mock model server, for development, tests and benchmarks.

Endpoints (POST, JSON): ``/v1/chat/completions`` and ``/v1/completions`` (both also streaming)
and ``/v1/embeddings``; ``GET /mock/stats`` reports what it served. Answers are deterministic
functions of the request: the chat answer is ``"echo: " + <last user message, truncated to 200
chars>``, its ``usage`` counts prompt characters / 4 and answer words.

Knobs (keyword arguments of :class:`MockState`, settable while it runs):

* ``latency`` (seconds before answering; per request: header ``X-Mock-Latency``) and
  ``stream_chunk_delay`` (seconds between SSE chunks; per request: header ``X-Mock-Chunk-Delay``);
* ``error_rate`` / ``error_status`` / ``retry_after`` (random failures), a script of statuses for
  the next requests (:meth:`MockState.script`), and the body field ``"mock_status": <int>``;
* ``outage_seconds`` (or :meth:`MockState.start_outage`): every request of that time is answered
  ``error_status`` with ``Retry-After``;
* ``rpm`` / ``tpm``: provider rate limits as OpenAI enforces them (buckets refilled continuously,
  see :mod:`bellaq.mock_upstream.limits`): a 429 with ``Retry-After``, ``retry-after-ms`` and the
  ``x-ratelimit-*`` headers beyond them, those headers on every admitted answer. A request is
  charged its prompt tokens plus ``max_completion_tokens`` / ``max_tokens`` (or
  ``default_max_tokens``), corrected to its answer's ``usage.total_tokens``.

Modules: :mod:`~bellaq.mock_upstream.state` (knobs, records, counts), ``limits`` (the buckets),
``answers`` (texts, tokens, OpenAI objects), ``app`` (the WSGI app), ``server`` (:class:`MockUpstream`,
a werkzeug server in a thread for tests; :func:`serve` / :func:`main`, gevent's pywsgi for
benchmarks and ``python -m bellaq.mock_upstream``).
"""

from bellaq.mock_upstream.app import MockUpstreamApp, create_mock_app, get_mock_state
from bellaq.mock_upstream.server import MockUpstream, build_parser, main, nodelay_pywsgi, serve
from bellaq.mock_upstream.state import MockState, RecordedRequest

__all__ = [
    "MockState",
    "MockUpstream",
    "MockUpstreamApp",
    "RecordedRequest",
    "build_parser",
    "create_mock_app",
    "get_mock_state",
    "main",
    "nodelay_pywsgi",
    "serve",
]
