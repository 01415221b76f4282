"""What the queue engine's operations answer, and the input of ``complete_many``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TakenTask:
    """A task leased by ``take``."""

    queue: str
    level: int
    task_id: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class TakeResult:
    """What ``take_with_hint`` leased, and whether a limit held waiting work back."""

    tasks: list[TakenTask]
    retry_ms: int | None  # ms until a rate or pause limit that stopped the take may let work through
    limited: tuple[str, ...]  # 'paused', 'in_flight', 'rpm', 'tpm': the limits that stopped it


@dataclass(frozen=True)
class Completion:
    """One item of ``complete_many``."""

    queue: str
    level: int
    task_id: str
    failed: bool = False
    result: str | None = None  # recorded with the end state (see recorded_results)
    tokens: int | None = None  # tokens really used: corrects the queue's token bucket
    holder: str | None = None  # must match the lease's holder when given


@dataclass
class Extended:
    """What ``extend`` did: only the leases in ``renewed`` changed."""

    renewed: dict[str, int]  # task id -> lease deadline now in force (ms)
    not_leased: list[str]
    wrong_holder: list[str]


@dataclass
class ExpiredLeases:
    """What ``requeue_expired`` did with the leases that ran out and the delays that came due."""

    requeued: list[str]  # put back to waiting (attempts kept)
    failed: list[str]  # retries ran out: removed from the engine (counters.failed += 1)
    promoted: list[str] = field(default_factory=list)  # delayed tasks now due: back to waiting


@dataclass
class QueueStats:
    """Counts of one (queue, level)."""

    waiting: int
    running: int
    done: int
    failed: int
    cancelled: int
    oldest_age_ms: int  # age of the oldest waiting task, 0 if none
    delayed: int = 0
    next_due_in_ms: int | None = None  # until the earliest delayed task is due; None if none


@dataclass(frozen=True)
class LimitStats:
    """A queue's limits (None = not set) and how much of them is in use."""

    rpm: int | None
    tpm: int | None
    max_in_flight: int | None
    burst_ms: int | None
    in_flight: int  # leased tasks of the queue, every level
    paused_until: int  # ms since the epoch; 0 when not paused
    factor: float  # AIMD factor on the rates (1 = the configured rates)
    requests_available: float | None  # bucket levels now (negative: a debt)
    tokens_available: float | None
    window_start: int  # one-minute window (ms since the epoch) the counts below belong to
    window_requests: int
    window_tokens: int
