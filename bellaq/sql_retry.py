"""Writes that MariaDB/MySQL may end with a deadlock (1213) or a lock wait timeout (1205): InnoDB
then rolls the whole transaction back, and the documented answer is to run it again. The hot
writes of many tasks at once (marking taken tasks, claiming end states) go through
:func:`retrying`; SQLite never raises these. A connection that turns out to be dead (the server
restarted or killed it: SQLAlchemy invalidates it) is retried the same way, on a new one; the
writes retried are idempotent, so one whose COMMIT was lost with its connection is harmless to
run again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from bellaq.extensions import db

T = TypeVar("T")
RETRIED_CODES = frozenset({1205, 1213})
MAX_ATTEMPTS = 4


def is_deadlock(err: OperationalError) -> bool:
    args = getattr(err.orig, "args", ())
    return bool(args) and args[0] in RETRIED_CODES


def retrying(work: Callable[[], T]) -> T:
    """Run ``work`` (statements of one transaction of ``db.session``) and, after a deadlock or on
    a dead connection, roll back and run it again, up to ``MAX_ATTEMPTS`` times in all."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return work()
        except OperationalError as err:
            db.session.rollback()
            if attempt == MAX_ATTEMPTS or not (is_deadlock(err) or err.connection_invalidated):
                raise
    raise AssertionError("unreachable")
