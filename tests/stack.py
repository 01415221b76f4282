"""A real deployment in subprocesses for the end-to-end tests: the benchmarks' Stack (gunicorn with
gevent workers, Celery workers and beat, configured only through the environment), pointed at the
test suite's Redis and admin key."""

from __future__ import annotations

from pathlib import Path

from scripts.benchlib import Stack as _Stack
from tests.conftest import ADMIN_KEY, REDIS_URL


class Stack(_Stack):
    def __init__(self, tmp_path: Path, prefix: str, database_url: str, upstream: str, **env: str) -> None:
        super().__init__(tmp_path, prefix, database_url, upstream, redis_url=REDIS_URL, admin_key=ADMIN_KEY, **env)
