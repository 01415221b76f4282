"""Wiring of the Celery side into the service: the listeners through which the service hands
work to Celery (announce work, deliver callbacks, move batches). Entry points pass
:func:`install` to :func:`bellaq.create_app`."""

from __future__ import annotations

from flask import Flask

from bellaq.services import Services


def install(app: Flask) -> None:
    from workers import batches, callbacks, consumer

    svc: Services = app.extensions["bellaq"]
    svc.on_work_ready.append(consumer.announce)
    svc.on_task_end.append(callbacks.schedule)
    svc.on_task_end.append(batches.on_tasks_ended)
    svc.on_batch_created.append(batches.dispatch_ingest)
    svc.on_batch_ending.append(batches.dispatch_end)
