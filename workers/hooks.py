"""Wiring of the Celery side into the service: announce work, deliver callbacks, move batches."""

from __future__ import annotations

import importlib.util

from flask import Flask


def install(app: Flask) -> None:
    from workers import callbacks, consumer

    svc = app.extensions["bellaq"]
    svc.on_work_ready.append(consumer.announce)
    svc.on_task_end.append(callbacks.schedule)
    if importlib.util.find_spec("workers.batches") is not None:
        from workers import batches

        svc.on_task_end.append(batches.on_tasks_ended)


