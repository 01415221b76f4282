"""The Celery app: per-priority queues on the Redis broker, tasks run inside the Flask app.

Start a worker with ``celery -A workers.celery_app worker -Q bellaq.l0,bellaq.l1,...,bellaq.control``
(the Procfile does). Worker processes need only the Redis and SQL URLs of the environment.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, Task
from flask import Flask
from kombu import Queue

from bellaq.config import Settings

LEVELS = range(10)
CONTROL_QUEUE = "bellaq.control"
TASK_MODULES = ["workers.consumer", "workers.callbacks", "workers.maintenance", "workers.batches"]


def level_queue(level: int) -> str:
    """The Celery queue of a priority level: ``bellaq.l0`` (online) ... ``bellaq.l9``."""
    return f"bellaq.l{min(max(level, 0), LEVELS[-1])}"


ALL_QUEUES = [CONTROL_QUEUE] + [level_queue(level) for level in LEVELS]  # control first: never starved


class FlaskTask(Task):
    """Runs every task inside an app context of the process's Flask app."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flask_app = get_flask_app()
        with flask_app.app_context():
            try:
                return self.run(*args, **kwargs)
            finally:
                from bellaq.extensions import db

                db.session.remove()


celery = Celery("bellaq", task_cls=FlaskTask)
_flask_app: Flask | None = None


def broker_prefix(settings: Settings) -> str:
    """The prefix of the broker's Redis keys: a Celery queue ``Q`` is the list ``<prefix>Q``."""
    return f"{settings.redis_prefix}:celery:"


def configure(settings: Settings) -> None:
    """Point Celery at the settings' broker; per-deployment key prefix keeps deployments apart."""
    transport = {
        # Strict order: a message in bellaq.l0 is always received before one in bellaq.l1.
        "queue_order_strategy": "priority",
        "visibility_timeout": 3600,
        "global_keyprefix": broker_prefix(settings),
        # gevent workers publish and ack from many greenlets: kombu's default of 10 connections
        # makes acks fail with "Too many connections" (and late acks then redeliver).
        "max_connections": 1000,
    }
    celery.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        broker_transport_options=transport,
        result_backend_transport_options={"global_keyprefix": broker_prefix(settings)},
        result_expires=3600,
        task_queues=[Queue(name) for name in ALL_QUEUES],
        task_default_queue=CONTROL_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=3600,
        task_time_limit=3700,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_pool_limit=100,
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(),
        include=TASK_MODULES,
    )


def beat_schedule() -> dict[str, dict]:
    return {
        "reap-leases": {"task": "bellaq.reap", "schedule": 2.0, "options": {"queue": CONTROL_QUEUE}},
        "check-engine": {"task": "bellaq.check_engine", "schedule": 15.0, "options": {"queue": CONTROL_QUEUE}},
        "expire-batches": {"task": "bellaq.expire_batches", "schedule": 10.0, "options": {"queue": CONTROL_QUEUE}},
        "sweep-callbacks": {"task": "bellaq.sweep_callbacks", "schedule": 5.0, "options": {"queue": CONTROL_QUEUE}},
        "sweep-eventbus": {"task": "bellaq.sweep_eventbus", "schedule": 5.0, "options": {"queue": CONTROL_QUEUE}},
        "purge-idempotency": {"task": "bellaq.purge_idempotency", "schedule": 300.0,
                              "options": {"queue": CONTROL_QUEUE}},
    }


def bind(flask_app: Flask) -> None:
    """Use this Flask app for tasks run in this process (tests bind theirs)."""
    global _flask_app
    _flask_app = flask_app
    configure(flask_app.config["BELLAQ"])
    # Connections made under other settings must not be reused.
    celery._pool = None
    celery.__dict__.get("amqp") and setattr(celery.amqp, "_producer_pool", None)
    celery._backend_cache = None
    celery._local = threading.local()


def get_flask_app() -> Flask:
    global _flask_app
    if _flask_app is None:
        from bellaq import create_app
        from bellaq.db import init_db
        from workers.hooks import install

        app = create_app(plugins=(install,))
        init_db(app)
        bind(app)
    assert _flask_app is not None
    return _flask_app


# Configured from the environment at import, so `celery -A workers.celery_app` works as is.
configure(Settings.from_env())
