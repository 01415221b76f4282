"""gunicorn hooks of ``bellaq serve`` (``--config python:bellaq.gunicorn_conf``); every other
setting is on its command line. gunicorn reads this module's hook names as settings."""

from __future__ import annotations

import os
from typing import Any


def child_exit(_server: Any, worker: Any) -> None:
    """A web worker exited: in Prometheus multiprocess mode, drop its live-gauge files (its
    counter files stay, so the host's totals keep what it counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
