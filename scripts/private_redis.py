"""A private ``redis-server`` on a free port in its own directory, for drills and tests that stop,
restart or wipe Redis: the shared Redis on 6379 is never touched.

    with PrivateRedis(tmp_path) as r:
        stack = Stack(..., redis_url=r.url)
        r.stop(); ...; r.start()     # down, then back with its data (append-only file)
        r.flushall()                 # a Redis that lost everything
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from scripts.benchlib import free_port, wait_port

REDIS_SERVER = shutil.which("redis-server") or "redis-server"


class PrivateRedis:
    """``redis-server`` with an fsync-always append-only file: a stop and start keeps its data."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.dir = Path(directory) / "private-redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps its own copy
        try:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--maxclients", "10000",
                 "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        wait_port(self.port, timeout=30, proc=self.proc)

    def stop(self) -> None:
        """Stop the server (SIGTERM: it refuses connections from then on, keeping its data)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def client(self):  # noqa: ANN201 - redis.Redis, imported lazily
        import redis

        return redis.Redis.from_url(self.url)

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as client:
            client.flushall()
