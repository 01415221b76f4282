"""End states of many tasks are claimed in one or two statements, and still each task ends once."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa

from bellaq import tasks as task_service
from bellaq.extensions import db
from bellaq.models import Task
from bellaq.models.tasks import TaskStatus
from bellaq.services import services

CHAT = "/v1/chat/completions"


def _add(app, n: int, prefix: str = "task_e") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    rows = [{"id": tid, "owner": "o", "batch_id": "", "endpoint": CHAT, "queue": "q", "level": 0, "data": "{}",
             "status": "queued", "response_mode": "callback", "callback_url": "", "timeout": 60, "instance_id": "",
             "start_time": 1, "expire_time": 60001, "attempts": 1} for tid in ids]
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(sa.insert(Task.__table__), rows)
    return ids


def _load(ids: list[str]) -> list[Task]:
    return list(db.session.execute(db.select(Task).where(Task.id.in_(ids))).scalars())


def test_only_open_tasks_are_claimed_each_with_its_status_and_result(app):
    ids = _add(app, 6)
    ended: list[tuple[str, str]] = []
    with app.app_context():
        services().on_task_end.append(lambda tasks: ended.extend((t.id, t.status) for t in tasks))
        db.session.execute(sa.update(Task).where(Task.id.in_(ids[:2])).values(status="cancelled"))
        db.session.commit()
        statuses = {tid: (TaskStatus.SUCCEEDED if i % 2 else TaskStatus.FAILED) for i, tid in enumerate(ids)}
        results = {tid: {"status_code": 200 if i % 2 else 500, "body": {"n": i}} for i, tid in enumerate(ids)}
        changed = task_service.write_end_states(_load(ids), statuses, results=results)
        assert sorted(t.id for t in changed) == ids[2:]
        assert all(t.status == statuses[t.id] and json.loads(t.result) == results[t.id] for t in changed)
        db.session.expire_all()
        rows = {t.id: t for t in _load(ids)}
    assert sorted(ended) == sorted((tid, statuses[tid]) for tid in ids[2:])
    assert [rows[tid].status for tid in ids[:2]] == ["cancelled", "cancelled"]
    assert all(rows[tid].result is None for tid in ids[:2])
    for tid in ids[2:]:
        assert rows[tid].status == statuses[tid] and json.loads(rows[tid].result) == results[tid]
        assert rows[tid].completed_time is not None


def test_a_group_is_claimed_in_at_most_two_statements(app):
    ids = _add(app, 40)
    seen: list[str] = []
    with app.app_context():
        tasks = _load(ids)
        sa.event.listen(db.engine, "before_cursor_execute", lambda _c, _cur, stmt, *_a: seen.append(stmt))
        changed = task_service.write_end_state(tasks, "succeeded", results={t: {"status_code": 200} for t in ids})
    assert len(changed) == 40
    claims = [s for s in seen if s.lstrip().upper().startswith(("UPDATE TASKS", "SELECT TASKS.ID"))]
    assert 1 <= len(claims) <= 2, claims


def test_a_lone_task_already_ended_is_not_claimed_again(app):
    [tid] = _add(app, 1, "task_lone")
    with app.app_context():
        [task] = _load([tid])
        assert task_service.write_end_state([task], "cancelled") == [task]
        [again] = _load([tid])
        assert task_service.write_end_state([again], "succeeded", {"status_code": 200}) == []
        db.session.expire_all()
        assert _load([tid])[0].status == "cancelled"


@pytest.mark.mysql
def test_concurrent_enders_of_overlapping_groups_end_each_task_once(tmp_path, redis_prefix, mysql_url):
    from tests.conftest import make_settings, running_app

    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app:
        ids = _add(app, 200)
        won: dict[str, list[str]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(3)

        def ender(name: str, mine: list[str]) -> None:
            with app.app_context():
                try:
                    tasks = _load(mine)
                    start.wait(10)
                    for lo in range(0, len(tasks), 20):
                        got = task_service.write_end_state(tasks[lo:lo + 20], "succeeded",
                                                           results={t: {"status_code": 200, "by": name} for t in mine})
                        won.setdefault(name, []).extend(t.id for t in got)
                except BaseException as err:  # noqa: BLE001 - asserted below
                    errors.append(err)

        threads = [threading.Thread(target=ender, args=("a", ids[:150])),
                   threading.Thread(target=ender, args=("b", ids[50:])),
                   threading.Thread(target=ender, args=("c", ids[::-1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        claimed = [tid for got in won.values() for tid in got]
        assert sorted(claimed) == ids  # every task ended, none twice
        with app.app_context():
            by = {t.id: json.loads(t.result)["by"] for t in _load(ids)}
        assert all(tid in won[by[tid]] for tid in ids)  # the row holds the winner's result
