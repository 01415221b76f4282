"""The per-process services every part uses: settings, Redis, the queue engine, file storage."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from flask import current_app

from bellaq.config import Settings
from bellaq.ids import new_id
from bellaq.queue_engine import QueueEngine

if TYPE_CHECKING:
    from redis.client import Pipeline

    from bellaq.models import Task
    from bellaq.storage import Storage

TaskListener = Callable[[list["Task"]], None]
# (queue, level, count, lost, pipe): with a pipeline, the listener adds its commands to it and
# returns what to call with their answers once it has run; without, it makes its own round trip.
WorkListener = Callable[[str, int, int, bool, "Pipeline | None"], "Callable[[list[Any]], None] | None"]
BatchListener = Callable[[str], None]


class WorkRider:
    """Work-ready listeners' commands added to another pipeline (call it with the pipeline; call
    what it returns with the answers). What a listener raised afterwards is kept in ``error``:
    the tasks are takeable all the same."""

    def __init__(self, listeners: list[WorkListener], queue: str, level: int, count: int) -> None:
        self.listeners, self.queue, self.level, self.count = listeners, queue, level, count
        self.error: Exception | None = None

    def __call__(self, pipe: Pipeline) -> Callable[[list[Any]], None]:
        parts = []
        for listener in self.listeners:
            before = len(pipe)
            finish = listener(self.queue, self.level, self.count, False, pipe)
            parts.append((len(pipe) - before, finish))

        def finish_all(answers: list[Any]) -> None:
            at = 0
            for n, finish in parts:
                try:
                    if finish is not None:
                        finish(answers[at:at + n])
                except Exception as err:  # noqa: BLE001 - handed to the caller, as work_ready's
                    self.error = self.error or err
                at += n

        return finish_all


@dataclass
class Services:
    """What every part of a process shares, and the listeners through which the service hands
    work to whatever executes it (the Celery side adds them: ``workers.hooks.install``)."""

    settings: Settings
    redis: redis.Redis
    engine: QueueEngine
    instance_id: str
    # Called with tasks that just reached an end state (after the SQL commit).
    on_task_end: list[TaskListener] = field(default_factory=list)
    # Called with (queue, level, count, lost, pipe) when tasks become takeable on a built-in
    # queue; ``lost``: they were put back after their holder's lease ran out (it may have died).
    on_work_ready: list[WorkListener] = field(default_factory=list)
    # Called with the id of a batch just created (its input must be validated and ingested).
    on_batch_created: list[BatchListener] = field(default_factory=list)
    # Called with the id of a batch whose cancel began (its unfinished tasks must be ended).
    on_batch_ending: list[BatchListener] = field(default_factory=list)
    _storage: Any = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            from bellaq.storage import storage_from_settings

            self._storage = storage_from_settings(self.settings)
        return self._storage

    def task_ended(self, tasks: list[Task]) -> None:
        for listener in self.on_task_end:
            listener(tasks)

    def work_ready(self, queue: str, level: int, count: int = 1, *, lost: bool = False) -> None:
        for listener in self.on_work_ready:
            listener(queue, level, count, lost, None)

    def work_ready_rider(self, queue: str, level: int, count: int) -> WorkRider | None:
        """:meth:`work_ready` as commands riding on a pipeline of the caller's (the put group's
        enqueue), so the announcement costs no round trip of its own; None without listeners."""
        return WorkRider(self.on_work_ready, queue, level, count) if self.on_work_ready else None

    def batch_created(self, batch_id: str) -> None:
        for listener in self.on_batch_created:
            listener(batch_id)

    def batch_ending(self, batch_id: str) -> None:
        for listener in self.on_batch_ending:
            listener(batch_id)

    def engine_marker_present(self) -> bool:
        """False once Redis has lost its data (the marker is set after every recovery)."""
        return bool(self.redis.exists(self.key("engine", "seeded")))

    def set_engine_marker(self) -> None:
        self.redis.set(self.key("engine", "seeded"), "1")

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix (for things outside the engine)."""
        return ":".join((self.settings.redis_prefix, *parts))


def build_services(settings: Settings) -> Services:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
    instance_id = f"{socket.gethostname()}-{os.getpid()}-{new_id('', 4)}"
    return Services(
        settings=settings,
        redis=client,
        engine=QueueEngine(client, prefix=settings.redis_prefix),
        instance_id=instance_id,
    )


def services() -> Services:
    return current_app.extensions["bellaq"]
