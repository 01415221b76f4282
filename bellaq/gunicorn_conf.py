"""gunicorn settings and hooks of ``bellaq serve`` (``--config python:bellaq.gunicorn_conf``); its
command line sets the rest (and wins over this module). gunicorn reads this module's names that
are settings or hooks."""

from __future__ import annotations

import os
from typing import Any

# Connections the kernel queues while every web process is busy, beyond gunicorn's 2048: a burst
# waits to be accepted (and then answered, if need be with a 503) instead of being refused. Linux
# caps it at net.core.somaxconn (4096 by default since 5.4).
backlog = 4096


def on_starting(server: Any) -> None:
    """Warn when a process could hold as many requests as it has connections: beyond
    ``worker_connections`` gevent stops accepting, so a new request would wait or be reset
    instead of being answered 503."""
    from bellaq.config import Settings

    held = Settings.from_env().max_held_requests
    connections = server.cfg.worker_connections
    if held <= 0 or held >= connections:
        server.log.warning("BELLAQ_MAX_HELD_REQUESTS=%s is not below --worker-connections %s: keep it lower, so "
                           "a full process still accepts connections and answers 503.", held, connections)


def child_exit(_server: Any, worker: Any) -> None:
    """A web worker exited: in Prometheus multiprocess mode, drop its live-gauge files (its
    counter files stay, so the host's totals keep what it counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
