"""A real deployment in subprocesses: gunicorn with gevent workers, and Celery worker processes,
configured only through the environment as in production."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import ADMIN_KEY, REDIS_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """Web and worker processes sharing one SQL database and one Redis prefix."""

    def __init__(self, tmp_path: Path, prefix: str, database_url: str, upstream: str, **env: str) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update({
            "BELLAQ_DATABASE_URL": database_url,
            "BELLAQ_REDIS_URL": REDIS_URL,
            "BELLAQ_REDIS_PREFIX": prefix,
            "BELLAQ_ADMIN_KEY": ADMIN_KEY,
            "BELLAQ_UPSTREAM_BASE_URL": upstream,
            "BELLAQ_CALLBACK_ALLOW_PRIVATE": "1",
            "BELLAQ_INSTANCE_DIR": str(tmp_path),
            "BELLAQ_FILES_DIR": str(tmp_path / "files"),
            "PYTHONUNBUFFERED": "1",
        })
        self.env.update(env)
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_web(self, workers: int = 2) -> None:
        subprocess.run([sys.executable, "-m", "bellaq.cli", "db", "init"], env=self.env, check=True,
                       capture_output=True)
        self._spawn("web", [sys.executable, "-m", "gunicorn", "bellaq.wsgi:app", "-k", "gevent",
                            "-w", str(workers), "-b", f"127.0.0.1:{self.port}", "--worker-connections", "5000",
                            "--timeout", "120", "--log-level", "warning"])
        self.wait_healthy()

    def start_worker(self, concurrency: int = 8, pool: str = "gevent", queues: str | None = None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", pool,
                "-c", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "-n", f"w{len(self.workers)}@%h"]
        if queues:
            argv += ["-Q", queues]
        proc = self._spawn("worker", argv)
        self.workers.append(proc)
        return proc

    def start_beat(self) -> subprocess.Popen:
        return self._spawn("beat", [sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                                    "--loglevel", "WARNING", "-s", str(self.tmp_path / "beat-schedule")])

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"web did not become healthy; see {self.tmp_path}/web-*.log")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("*.log")))

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(proc)
