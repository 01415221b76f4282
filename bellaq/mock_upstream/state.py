"""The mock's run-time state: knobs, recorded requests, scripted statuses, outage, provider limits
and what it served (arrival time and tokens charged of every admitted request)."""

from __future__ import annotations

import math
import random
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bellaq.mock_upstream.limits import ProviderLimits, Refusal

# The completion budget charged (and the answer's cap) when a request sets no max_tokens.
DEFAULT_MAX_TOKENS = 256
DEFAULT_WINDOW = 60.0
# The knobs MockState.reset() restores to their constructor values.
KNOBS = ("latency", "error_rate", "error_status", "retry_after", "stream_chunk_delay", "default_max_tokens",
         "rpm", "tpm")


@dataclass
class RecordedRequest:
    """One request the mock received (kept only when recording is on)."""

    method: str
    path: str
    body: Any  # parsed JSON, or None when the body was not JSON
    headers: dict[str, str] = field(default_factory=dict)
    time: float = 0.0


@dataclass(frozen=True)
class Admission:
    """The outcome of :meth:`MockState.admit`: admitted (``refusal`` is None) or refused."""

    refusal: Refusal | None
    headers: list[tuple[str, str]]
    tokens: int = 0
    index: int = -1
    epoch: int = 0


def _max_in_window(times: array, weights: array | None, window: float) -> int:
    """The largest count (or sum of ``weights``) of entries whose ``times`` (ascending) fit in any
    half-open interval of ``window`` seconds."""
    best = total = start = 0
    for end, at in enumerate(times):
        total += weights[end] if weights is not None else 1
        while at - times[start] >= window:
            total -= weights[start] if weights is not None else 1
            start += 1
        best = max(best, total)
    return best


class MockState:
    """Run-time knobs and counters shared by the WSGI app and :class:`MockUpstream`.

    Knobs may be changed while the server runs (``state.latency = 0.5``); setting ``rpm`` or
    ``tpm`` starts the limits over with full buckets. ``clock`` (monotonic seconds) drives the
    limits, the outage and the served-request times.
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
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        outage_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.latency = float(latency)
        self.error_rate = float(error_rate)
        self.error_status = int(error_status)
        self.retry_after = retry_after
        self.stream_chunk_delay = float(stream_chunk_delay)
        self.default_max_tokens = int(default_max_tokens)
        self.record = record
        self.sleep = sleep
        self.clock = clock
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._script: deque[tuple[int, float | None]] = deque()
        self._requests: list[RecordedRequest] = []
        self._count = 0
        self._rpm, self._tpm = rpm, tpm
        self._limits = ProviderLimits(rpm, tpm, clock())
        self._outage: tuple[float, int | None, float | None] | None = None
        self._epoch = 0  # bumped by clear(), so a request admitted before it settles nothing after
        self._forget_served()
        self._initial = {name: getattr(self, name) for name in KNOBS}
        if outage_seconds > 0:
            self.start_outage(outage_seconds)

    def _forget_served(self) -> None:
        self._arrivals = array("d")
        self._charged = array("q")
        self._statuses: dict[int, int] = {}
        self._rate_limited = 0
        self._outage_answers = 0

    # -- limits

    @property
    def rpm(self) -> int | None:
        """Requests per minute (None: unlimited)."""
        return self._rpm

    @rpm.setter
    def rpm(self, value: int | None) -> None:
        self._set_limits(value, self._tpm)

    @property
    def tpm(self) -> int | None:
        """Tokens per minute (None: unlimited)."""
        return self._tpm

    @tpm.setter
    def tpm(self, value: int | None) -> None:
        self._set_limits(self._rpm, value)

    def _set_limits(self, rpm: int | None, tpm: int | None) -> None:
        with self._lock:
            self._rpm, self._tpm = rpm, tpm
            self._limits = ProviderLimits(rpm, tpm, self.clock())

    def admit(self, tokens: int) -> Admission:
        """Charge a request and its estimated ``tokens`` to the limits and record it as served, or
        refuse it (then it is counted as rate limited and charged nothing)."""
        with self._lock:
            now = self.clock()
            refusal = self._limits.admit(tokens, now)
            headers = self._limits.headers(now)
            if refusal is not None:
                self._rate_limited += 1
                return Admission(refusal, headers)
            self._arrivals.append(now)
            self._charged.append(tokens)
            return Admission(None, headers, tokens, len(self._arrivals) - 1, self._epoch)

    def settle(self, admission: Admission, used: int) -> list[tuple[str, str]]:
        """Correct an admitted request's charge to the tokens its answer reports; the limit headers
        as they now stand."""
        with self._lock:
            if admission.epoch == self._epoch:
                self._charged[admission.index] = used
                self._limits.refund(admission.tokens - used)
            return self._limits.headers(self.clock())

    # -- outage

    def start_outage(self, seconds: float, status: int | None = None, retry_after: float | None = None) -> None:
        """Answer every request of the next ``seconds`` with ``status`` (default: the
        ``error_status`` knob) and ``Retry-After`` (default: the ``retry_after`` knob, else the
        time left in the outage)."""
        with self._lock:
            self._outage = (self.clock() + seconds, status, retry_after)

    def outage(self) -> tuple[int, float] | None:
        """``(status, retry_after)`` while an outage lasts (and count the answer), else None."""
        with self._lock:
            if self._outage is None:
                return None
            until, status, retry_after = self._outage
            left = until - self.clock()
            if left <= 0:
                self._outage = None
                return None
            self._outage_answers += 1
        if retry_after is None:
            retry_after = self.retry_after if self.retry_after is not None else max(1, math.ceil(left))
        return (status or self.error_status), retry_after

    # -- scripted statuses

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

    # -- what was received and answered

    def note(self, method: str, path: str, body: Any, environ: dict[str, Any]) -> None:
        """Count a request, and record it when recording is on."""
        with self._lock:
            self._count += 1
            if self.record:
                headers = {k[5:].replace("_", "-").title(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
                self._requests.append(RecordedRequest(method, path, body, headers, time.time()))

    def answered(self, status: int) -> None:
        """Count an answer by status."""
        with self._lock:
            self._statuses[status] = self._statuses.get(status, 0) + 1

    @property
    def request_count(self) -> int:
        """Number of requests received (all paths but ``/mock/stats``)."""
        return self._count

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded requests (empty unless recording is on)."""
        with self._lock:
            return list(self._requests)

    @property
    def served_count(self) -> int:
        """Requests admitted by the outage and the limits (answered with whatever came next)."""
        return len(self._arrivals)

    @property
    def rate_limited_count(self) -> int:
        """Requests the limits refused with 429."""
        return self._rate_limited

    def max_requests_in_window(self, window: float = DEFAULT_WINDOW) -> int:
        """The most served requests that arrived within any ``window`` seconds."""
        with self._lock:
            return _max_in_window(self._arrivals, None, window)

    def max_tokens_in_window(self, window: float = DEFAULT_WINDOW) -> int:
        """The most tokens charged to served requests that arrived within any ``window`` seconds."""
        with self._lock:
            return _max_in_window(self._arrivals, self._charged, window)

    def stats(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        """Counts and window maxima, as ``GET /mock/stats`` answers them."""
        with self._lock:
            return {
                "requests": self._count,
                "served": len(self._arrivals),
                "rate_limited": self._rate_limited,
                "outage": self._outage_answers,
                "statuses": {str(status): n for status, n in sorted(self._statuses.items())},
                "tokens": sum(self._charged),
                "rpm": self._rpm,
                "tpm": self._tpm,
                "window_seconds": window,
                "max_requests_in_window": _max_in_window(self._arrivals, None, window),
                "max_tokens_in_window": _max_in_window(self._arrivals, self._charged, window),
            }

    def reset(self) -> None:
        """Restore the constructor's knobs, then :meth:`clear`."""
        for name, value in self._initial.items():
            setattr(self, name, value)
        self.clear()

    def clear(self) -> None:
        """Forget recorded requests, counts, served requests and any remaining script; end any
        outage; start the limits over with full buckets."""
        with self._lock:
            self._requests.clear()
            self._count = 0
            self._script.clear()
            self._outage = None
            self._limits = ProviderLimits(self._rpm, self._tpm, self.clock())
            self._epoch += 1
            self._forget_served()
