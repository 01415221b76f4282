"""``bellaq dev`` is safe to leave running: it binds loopback, keeps its instance folder private,
writes the admin key nowhere, and a SIGTERM or SIGHUP stops every process it started (and removes
the metrics folder its processes shared)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REDIS_URL, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_addresses(procs: list[psutil.Process], port: int) -> set[str]:
    found = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    found.add(conn.laddr.ip)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_bellaq_dev_is_private_and_stops_everything_on_a_signal(tmp_path: Path, redis_prefix: str, sig):
    instance, port = tmp_path / "instance", free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BELLAQ_ADMIN_KEY", "BELLAQ_DATABASE_URL", "BELLAQ_UPSTREAM_BASE_URL")}
    env.update(BELLAQ_INSTANCE_DIR=str(instance), BELLAQ_REDIS_URL=REDIS_URL, BELLAQ_REDIS_PREFIX=redis_prefix,
               PORT=str(port), WEB_CONCURRENCY="1")
    dev = subprocess.Popen([sys.executable, "-m", "workers.cli", "dev"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in dev.stdout], daemon=True).start()
    children: list[psutil.Process] = []
    try:
        output: list[str] = []

        def admin_key() -> str | None:
            while not lines.empty():
                output.append(lines.get())
                if output[-1].strip().startswith("admin key:"):
                    return output[-1].split(":", 1)[1].strip()
            assert dev.poll() is None, "".join(output)
            return None

        key = wait_for(admin_key, timeout=90, message="bellaq dev to print its admin key")
        assert f"base URL:   http://127.0.0.1:{port}/v1" in "".join(output)
        headers = {"Authorization": f"Bearer {key}"}
        assert requests.get(f"http://127.0.0.1:{port}/v1/keys", timeout=5, headers=headers).status_code == 200
        # The Celery worker ends the task; the web's /metrics counts it through the shared folder.
        put = requests.post(f"http://127.0.0.1:{port}/v1/queue/put", timeout=60, headers=headers, json={
            "endpoint": "/v1/chat/completions", "response_mode": "blocking", "timeout": 50,
            "data": {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}})
        assert put.status_code == 200, put.text
        # The held request is answered from the engine; the worker counts the end once its SQL
        # write follows, a moment later.
        def succeeded() -> float:
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10, headers=headers)
            return sum(s.value for f in text_string_to_metric_families(metrics.text) for s in f.samples
                       if s.name == "bellaq_tasks_ended_total" and s.labels["status"] == "succeeded")

        wait_for(lambda: succeeded() >= 1, timeout=30, interval=0.1, message="the end to be counted")
        assert succeeded() == 1
        assert (instance / "metrics").is_dir()
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 4  # mock upstream, gunicorn (master and worker), Celery worker, beat
        assert listening_addresses(children, port) == {"127.0.0.1"}
        assert stat.S_IMODE(instance.stat().st_mode) == 0o700
        for path in instance.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), f"the admin key is written to {path}"

        dev.send_signal(sig)
        assert dev.wait(timeout=60) is not None
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"still running after {sig.name}: {[p.cmdline() for p in alive]}"
        assert not (instance / "metrics").exists()
    finally:
        if dev.poll() is None:  # the test failed before it listed them
            children = children or psutil.Process(dev.pid).children(recursive=True)
        for proc in children:  # only if the test failed: leave nothing behind
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if dev.poll() is None:
            dev.kill()
        dev.wait(timeout=10)
