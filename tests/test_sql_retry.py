"""A write that InnoDB picks as a deadlock's victim runs again (real MariaDB, two sessions)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from bellaq import sql_retry
from bellaq.extensions import db
from tests.conftest import make_settings, running_app

pytestmark = pytest.mark.mysql


def test_the_victim_of_a_real_deadlock_runs_again_and_both_writes_land(tmp_path, redis_prefix, mysql_url):
    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app, app.app_context():
        db.session.execute(sa.text("CREATE TABLE pair (id INT PRIMARY KEY, v INT) ENGINE=InnoDB"))
        db.session.execute(sa.text("INSERT INTO pair VALUES (1, 0), (2, 0)"))
        db.session.execute(sa.text("CREATE TABLE ballast (id INT PRIMARY KEY) ENGINE=InnoDB"))
        db.session.commit()
        other = sa.create_engine(mysql_url)
        holds_two, runs = threading.Event(), []

        def rival() -> None:  # locks row 2, then wants row 1; the heavier transaction, so not the victim
            with other.begin() as conn:
                conn.execute(sa.text("INSERT INTO ballast VALUES " + ", ".join(f"({i})" for i in range(200))))
                conn.execute(sa.text("UPDATE pair SET v = v + 10 WHERE id = 2"))
                holds_two.set()
                conn.execute(sa.text("UPDATE pair SET v = v + 10 WHERE id = 1"))

        def work() -> None:  # locks row 1, then wants row 2: one of the two is the victim
            runs.append(1)
            db.session.execute(sa.text("UPDATE pair SET v = v + 1 WHERE id = 1"))
            if len(runs) == 1:
                thread.start()
                assert holds_two.wait(10)
            db.session.execute(sa.text("UPDATE pair SET v = v + 1 WHERE id = 2"))
            db.session.commit()

        thread = threading.Thread(target=rival)
        errors: list[BaseException] = []
        try:
            sql_retry.retrying(work)
        except BaseException as err:  # noqa: BLE001 - asserted below, after the rival ended
            errors.append(err)
        thread.join(30)
        values = dict(db.session.execute(sa.text("SELECT id, v FROM pair")).all())
        other.dispose()
        assert errors == []
        assert len(runs) == 2, "InnoDB did not pick this side as the victim"
        assert values == {1: 11, 2: 11}  # both writes landed, the retried one once


def test_other_errors_are_not_retried(app):
    runs = []

    def work() -> None:
        runs.append(1)
        db.session.execute(sa.text("SELECT * FROM no_such_table"))

    with app.app_context(), pytest.raises(sa.exc.OperationalError if app.config["SQLALCHEMY_DATABASE_URI"]
                                          .startswith("sqlite") else sa.exc.ProgrammingError):
        sql_retry.retrying(work)
    assert runs == [1]


def _task_row(task_id: str) -> dict:
    return {"id": task_id, "owner": "key_x", "batch_id": "", "endpoint": "/v1/chat/completions", "queue": "q",
            "level": 0, "data": "{}", "status": "waiting", "response_mode": "callback", "callback_url": "",
            "timeout": 300, "instance_id": "", "start_time": 0, "expire_time": 1, "attempts": 0}


def test_a_put_insert_chosen_as_a_deadlock_victim_runs_again(tmp_path, redis_prefix, mysql_url):
    """A multi-row INSERT of puts holds its first row and waits for a gap a drain has locked; the
    drain then wants that first row. InnoDB rolls the INSERT back; it is written on the retry."""
    from bellaq import put_group

    with running_app(make_settings(tmp_path, redis_prefix, mysql_url)) as app, app.app_context():
        db.session.execute(sa.text("CREATE TABLE ballast (id INT PRIMARY KEY) ENGINE=InnoDB"))
        db.session.commit()
        put_group._insert_rows([_task_row("task_c"), _task_row("task_z")])  # bound the gap locked below
        other = sa.create_engine(mysql_url)
        waits = "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
        errors: list[BaseException] = []

        def insert() -> None:
            try:
                with app.app_context():
                    put_group._insert_rows([_task_row("task_a"), _task_row("task_m")])
            except BaseException as err:  # noqa: BLE001 - asserted below
                errors.append(err)

        thread = threading.Thread(target=insert)
        with other.begin() as conn:  # the heavier transaction, so not the victim
            conn.execute(sa.text("INSERT INTO ballast VALUES " + ", ".join(f"({i})" for i in range(200))))
            conn.execute(sa.text("SELECT id FROM tasks WHERE id BETWEEN 'task_l' AND 'task_n' FOR UPDATE"))
            thread.start()
            with other.connect() as probe:
                deadline = time.monotonic() + 10
                while probe.execute(sa.text(waits)).scalar_one() == 0:  # the INSERT waits for the gap
                    assert time.monotonic() < deadline, "the INSERT never waited for the locked gap"
                    probe.rollback()
                    time.sleep(0.01)
            conn.execute(sa.text("SELECT id FROM tasks WHERE id = 'task_a' FOR UPDATE"))  # the deadlock
        thread.join(30)
        ids = db.session.execute(sa.text("SELECT id FROM tasks ORDER BY id")).scalars().all()
        other.dispose()
        assert errors == []
        assert ids == ["task_a", "task_c", "task_m", "task_z"]
