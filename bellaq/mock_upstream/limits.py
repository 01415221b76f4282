"""Provider rate limits as OpenAI's servers enforce them: requests and tokens per minute.

The model is the one OpenAI's headers describe: one bucket per limit, holding at most ``limit``
units and refilled continuously at ``limit / 60`` units a second. Under a 5,000 rpm limit, one
request leaves ``x-ratelimit-remaining-requests: 4999`` and ``x-ratelimit-reset-requests: 12ms``
(the time until the bucket is full again), and a refusal says "try again in" exactly the time the
missing units take to refill. A request needs one unit of the requests bucket and its estimated
tokens from the tokens bucket; it is admitted only when both hold enough, and then takes from both.

A full bucket lets a burst of ``limit`` through at once, so a 60 s window can see up to about
twice the limit (the burst plus a minute of refill); a client keeping a steady pace sees the limit.
A request that needs more tokens than the whole limit is refused for good (OpenAI's "Request too
large"), without a ``Retry-After``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Float refill arithmetic can leave a bucket a hair short after a client waited exactly as told.
_EPSILON = 1e-9


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format at millisecond precision: ``20ms``, ``1s``, ``1.5s``, ``6m0s``."""
    ms = max(0, math.ceil(seconds * 1000 - _EPSILON))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class Bucket:
    """``limit`` units a minute, refilled continuously; ``level`` is what is available at ``at``."""

    limit: int
    level: float
    at: float

    @classmethod
    def full(cls, limit: int, now: float) -> Bucket:
        return cls(limit, float(limit), now)

    @property
    def rate(self) -> float:
        """Units refilled per second."""
        return self.limit / 60.0

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(float(self.limit), self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, amount: int) -> float:
        """Seconds until ``amount`` units are available (0 when they are now)."""
        missing = amount - self.level
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def headers(self, kind: str) -> list[tuple[str, str]]:
        """The three ``x-ratelimit-*-<kind>`` headers (``kind`` is ``requests`` or ``tokens``)."""
        return [
            (f"x-ratelimit-limit-{kind}", str(self.limit)),
            (f"x-ratelimit-remaining-{kind}", str(max(0, math.floor(self.level + _EPSILON)))),
            (f"x-ratelimit-reset-{kind}", duration((self.limit - self.level) / self.rate)),
        ]


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted: the limit (``requests`` or ``tokens``) and when to retry."""

    kind: str
    limit: int
    used: int
    requested: int
    wait: float | None  # seconds until it would pass; None when it never can

    def message(self, model: str) -> str:
        """OpenAI's wording, so clients that parse it read it the same."""
        unit = "requests per min (RPM)" if self.kind == "requests" else "tokens per min (TPM)"
        if self.wait is None:
            return (f"Request too large for {model} on {unit}: Limit {self.limit}, Requested {self.requested}. "
                    "The input or output tokens must be reduced in order to run successfully.")
        return (f"Rate limit reached for {model} on {unit}: Limit {self.limit}, Used {self.used}, "
                f"Requested {self.requested}. Please try again in {duration(self.wait)}.")


class ProviderLimits:
    """Requests and tokens per minute (either may be None: not limited). Not thread-safe: the
    caller holds a lock."""

    def __init__(self, rpm: int | None, tpm: int | None, now: float) -> None:
        self.requests = Bucket.full(rpm, now) if rpm else None
        self.tokens = Bucket.full(tpm, now) if tpm else None

    def admit(self, tokens: int, now: float) -> Refusal | None:
        """Take one request and ``tokens`` tokens, or take nothing and say why."""
        for bucket, kind, amount in ((self.requests, "requests", 1), (self.tokens, "tokens", tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            if amount > bucket.limit:
                return Refusal(kind, bucket.limit, 0, amount, None)
            wait = bucket.wait(amount)
            if wait > 0:
                used = max(0, math.ceil(bucket.limit - bucket.level - _EPSILON))
                return Refusal(kind, bucket.limit, used, amount, wait)
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= tokens
        return None

    def refund(self, tokens: int) -> None:
        """Give back tokens charged but not used (negative: charge more)."""
        if self.tokens is not None:
            self.tokens.level = min(float(self.tokens.limit), self.tokens.level + tokens)

    def headers(self, now: float) -> list[tuple[str, str]]:
        """The ``x-ratelimit-*`` headers of every configured limit, as of ``now``."""
        out: list[tuple[str, str]] = []
        for bucket, kind in ((self.requests, "requests"), (self.tokens, "tokens")):
            if bucket is not None:
                bucket.refill(now)
                out.extend(bucket.headers(kind))
        return out
