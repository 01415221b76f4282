"""A write that InnoDB picks as a deadlock's victim runs again (real MariaDB, two sessions)."""

from __future__ import annotations

import threading

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
