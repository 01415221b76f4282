"""Group commit of puts: the puts that arrive in one process while a write is under way are
written together by the first of them: counted against their owners' open-task bounds in one
Redis round trip, written in one SQL transaction (one multi-row INSERT, one
commit), then handed to the engine in one round trip per queue level, then announced once per
queue level. Each put still answers only after its own task is committed and takeable, and
fails alone when its own part fails (the rows of a level whose enqueue failed are deleted, as a
single put's would be). A lone put costs what it always did; under load, the commit and the
Redis round trips are shared by every put waiting for them.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import delete, insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from bellaq import open_tasks
from bellaq.errors import Unavailable
from bellaq.extensions import db
from bellaq.models import Task
from bellaq.services import services
from bellaq.sql_retry import MAX_ATTEMPTS, is_deadlock

MAX_GROUP = 256
EXTENSION = "bellaq.put_group"


@dataclass
class PendingPut:
    """One put's task row and what the engine needs of it."""

    row: dict[str, Any]
    payload: str
    builtin: bool
    cost: int = 0  # tokens charged at take under a ``tpm`` limit
    score: int = field(default_factory=lambda: time.time_ns() // 1000)
    done: bool = False
    error: BaseException | None = None


class PutGroup:
    """Per process (and app): puts waiting to be written, and whether a write is under way."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[PendingPut] = []
        self._writing = False

    def submit(self, item: PendingPut) -> None:
        """Write ``item`` (with whatever else is waiting); raises what failed for it."""
        with self._cond:
            self._pending.append(item)
        while True:
            with self._cond:
                while not item.done and self._writing:
                    self._cond.wait()
                if item.done:
                    break
                group = self._pending[:MAX_GROUP]
                del self._pending[:MAX_GROUP]
                self._writing = True
            try:
                _write(group)
            except BaseException as err:  # noqa: BLE001 - handed to every put of the group
                for other in group:
                    other.error = other.error or err
            finally:
                with self._cond:
                    for other in group:
                        other.done = True
                    self._writing = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error


def put_group() -> PutGroup:
    group = current_app.extensions.get(EXTENSION)
    if group is None:
        group = current_app.extensions.setdefault(EXTENSION, PutGroup())
    return group


def _insert_rows(rows: list[dict[str, Any]]) -> None:
    """One INSERT and its commit, on a Core connection of its own (PyMySQL sends an executemany
    of an INSERT as one multi-row statement). An INSERT that wrote nothing is run again: one that
    InnoDB chose as a deadlock victim (it rolled the whole transaction back; the drains' locks on
    the same table's indexes meet the insert's), or one on a connection found dead (the server
    restarted or killed it: the next one is new)."""
    table = Task.__table__
    engine = current_app.extensions["bellaq.autocommit_engine"]  # one round trip on MySQL (bellaq.sql_pool)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with engine.connect() as conn:
            try:
                conn.execute(insert(table), rows)
                conn.commit()
                return
            except DBAPIError as err:
                retry = err.connection_invalidated or (isinstance(err, OperationalError) and is_deadlock(err))
                if attempt == MAX_ATTEMPTS or not retry:
                    raise


def _insert(group: list[PendingPut]) -> list[PendingPut]:
    """Commit the rows; returns the puts whose row was written (the rest carry their error)."""
    try:
        _insert_rows([p.row for p in group])
        return group
    except IntegrityError:
        if len(group) == 1:
            raise
    written = []
    for p in group:  # one bad row must not fail the others
        try:
            _insert_rows([p.row])
            written.append(p)
        except IntegrityError as err:
            p.error = err
    return written


def _admit(group: list[PendingPut]) -> list[PendingPut]:
    """Count the puts against their owners' open-task bounds; returns those admitted (the rest
    carry their 429)."""
    admitted = []
    for p, refusal in zip(group, open_tasks.admit_each([p.row["owner"] for p in group]), strict=True):
        if refusal is None:
            admitted.append(p)
        else:
            p.error = refusal
    return admitted


def _write(group: list[PendingPut]) -> None:
    svc = services()
    by_level: dict[tuple[str, int], list[PendingPut]] = defaultdict(list)
    group = _admit(group)
    if not group:
        return
    for p in _insert(group):
        by_level[(p.row["queue"], p.row["level"])].append(p)
    table = Task.__table__
    for (queue, level), puts in by_level.items():
        # The announcement rides on the enqueue's round trip.
        rider = svc.work_ready_rider(queue, level, len(puts)) if puts[0].builtin else None
        try:
            svc.engine.enqueue_many(queue, level, [(p.row["id"], p.payload, p.score) for p in puts],
                                    costs={p.row["id"]: p.cost for p in puts if p.cost}, rider=rider)
        except RedisError:
            # The engine never saw them: take the rows back so nothing half-written remains.
            with db.engine.begin() as conn:
                conn.execute(delete(table).where(table.c.id.in_([p.row["id"] for p in puts])))
            for p in puts:
                p.error = Unavailable("The queue engine (Redis) is unavailable; the task was not accepted.")
            continue
        if rider is not None and rider.error is not None:
            for p in puts:  # each put of the level answers it, as alone
                p.error = rider.error
