"""Shared helpers of the benchmarks (and of the deployment tests): a real deployment in
subprocesses, the mock upstream and a callback sink as subprocesses, a throw-away SQL database,
a small keep-alive JSON client, percentiles, process-tree RSS/CPU, and a bare Celery app to
compare against.

    from scripts.benchlib import Stack, MockServer, database

``Stack`` starts gunicorn (gevent workers), Celery workers and beat exactly as production does:
configured only through ``BELLAQ_*`` environment variables. ``tests/stack.py`` can subclass it
(it only has to pass the tests' Redis URL and admin key).

Run as a script it serves small tools for the benchmarks' subprocesses:

    python scripts/benchlib.py sink --port N     # answers 200 to every request, GET /count
    python scripts/benchlib.py mock ARGS...      # bellaq.mock_upstream with TCP_NODELAY (see MockServer)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("BELLAQ_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_KEY = "bq-bench-admin-key"
PYTHON = sys.executable


# ------------------------------------------------------------------------------------------ basics

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def raise_nofile(wanted: int | None = None) -> int:
    """Raise this process's open-files soft limit (to the hard limit by default); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(max(wanted, soft), hard if hard != resource.RLIM_INFINITY else wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def unique_prefix(kind: str = "bqbench") -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every Redis key starting with ``prefix``; returns how many."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=2000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        return len(keys)
    finally:
        client.close()


@contextlib.contextmanager
def database(url: str | None, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty SQL database for one run, dropped afterwards.

    ``None`` or ``"sqlite"``: a SQLite file in ``tmp_path``. A ``mysql+pymysql://user@host:port[/x]``
    URL: a new database ``bq_bench_<hex>`` created on that server (the path part is ignored) and
    dropped at the end.
    """
    if not url or url == "sqlite":
        yield f"sqlite:///{tmp_path / 'bench.db'}"
        return
    if url.startswith("sqlite"):
        yield url
        return
    import pymysql

    parts = urlparse(url)
    name = f"bq_bench_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    auth = parts.username or "root"
    if parts.password:
        auth += f":{parts.password}"
    try:
        yield f"{parts.scheme}://{auth}@{parts.hostname or '127.0.0.1'}:{parts.port or 3306}/{name}?charset=utf8mb4"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of durations given in seconds, in milliseconds."""
    if not samples_s:
        return {"n": 0}
    ordered = sorted(samples_s)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[min(n - 1, max(0, int(round(p / 100 * n + 0.5)) - 1))] * 1000

    return {"n": n, "mean_ms": sum(ordered) / n * 1000, "p50_ms": rank(50), "p90_ms": rank(90),
            "p99_ms": rank(99), "max_ms": ordered[-1] * 1000}


def print_rows(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain text table; floats get thousands separators and sensible decimals."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if abs(value) >= 100:
                return f"{value:,.0f}"
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "" if value is None else str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for row in text:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


# ---------------------------------------------------------------------------------- process trees

def tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Resident set size, in bytes, of a process and all its descendants."""
    import psutil

    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += psutil.Process(p).memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its living descendants."""
    import psutil

    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = psutil.Process(p).cpu_times()
            total += t.user + t.system
    return total


def _spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    try:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()  # the child has its own copy


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a process started in its own session (and its whole group); kill it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # children that outlived their parent (a forked server's workers) go too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------- deployment

class Stack:
    """Web and worker processes sharing one SQL database and one Redis prefix, configured only
    through the environment, as in production.

    ``upstream`` is ``BELLAQ_UPSTREAM_BASE_URL``; ``env`` adds or overrides variables.
    """

    def __init__(self, tmp_path: Path, prefix: str, database_url: str, upstream: str, *,
                 redis_url: str = REDIS_URL, admin_key: str = ADMIN_KEY, **env: str) -> None:
        self.tmp_path = Path(tmp_path)
        self.prefix = prefix
        self.redis_url = redis_url
        self.admin_key = admin_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update({
            "BELLAQ_DATABASE_URL": database_url,
            "BELLAQ_REDIS_URL": redis_url,
            "BELLAQ_REDIS_PREFIX": prefix,
            "BELLAQ_ADMIN_KEY": admin_key,
            "BELLAQ_UPSTREAM_BASE_URL": upstream,
            "BELLAQ_CALLBACK_ALLOW_PRIVATE": "1",
            "BELLAQ_INSTANCE_DIR": str(self.tmp_path),
            "BELLAQ_FILES_DIR": str(self.tmp_path / "files"),
            "PYTHONUNBUFFERED": "1",
        })
        self.env.update(env)
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.web: subprocess.Popen | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = _spawn(argv, self.tmp_path / f"{name}-{len(self.procs)}.log", self.env)
        self.procs.append(proc)
        return proc

    def init_db(self) -> None:
        subprocess.run([PYTHON, "-m", "workers.cli", "db", "init"], env=self.env, check=True, capture_output=True,
                       cwd=ROOT)

    def start_web(self, workers: int = 2, worker_connections: int = 5000, backlog: int = 2048,
                  timeout: int = 120, extra_args: Sequence[str] = (),
                  app: str = "workers.wsgi:app") -> subprocess.Popen:
        """``bellaq db init``, then gunicorn with gevent workers; returns when /healthz answers."""
        self.init_db()
        self.web = self._spawn("web", [
            PYTHON, "-m", "gunicorn", app, "-k", "gevent", "-w", str(workers),
            "-b", f"127.0.0.1:{self.port}", "--worker-connections", str(worker_connections),
            "--backlog", str(backlog), "--timeout", str(timeout), "--log-level", "warning", *extra_args])
        self.wait_healthy()
        return self.web

    def start_worker(self, concurrency: int = 8, pool: str = "gevent", queues: str | None = None,
                     extra_args: Sequence[str] = ()) -> subprocess.Popen:
        argv = [PYTHON, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", pool,
                "-c", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "-n", f"w{len(self.workers)}-{self.prefix}@%h", *extra_args]
        if queues:
            argv += ["-Q", queues]
        proc = self._spawn("worker", argv)
        self.workers.append(proc)
        return proc

    def start_beat(self) -> subprocess.Popen:
        return self._spawn("beat", [PYTHON, "-m", "celery", "-A", "workers.celery_app", "beat",
                                    "--loglevel", "WARNING", "-s", str(self.tmp_path / "beat-schedule")])

    def wait_healthy(self, timeout: float = 30.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.web is not None and self.web.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"web did not become healthy; see {self.tmp_path}/web-*.log\n{self.logs()}")

    def stop_web(self, timeout: float = 15.0) -> None:
        if self.web is not None:
            stop_group(self.web, signal.SIGTERM, timeout)
            self.web = None

    def web_pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        return tree_pids(self.web.pid) if self.web is not None else []

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("*.log")))

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop_workers(self, timeout: float = 15.0) -> None:
        for proc in self.workers:
            stop_group(proc, signal.SIGTERM, timeout)
        self.workers = []

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(proc)


class MockServer:
    """``python -m bellaq.mock_upstream`` (gevent server) in a subprocess.

    ``nodelay`` (default): started through ``python scripts/benchlib.py mock``, which sets
    ``TCP_NODELAY`` on every accepted connection before handing over to the mock's own ``main``.
    Without it, gevent's pywsgi writes a keep-alive response's headers and body in two segments
    and Nagle holds the body until the client's delayed ACK: every non-streamed answer after the
    first on a connection then takes ~44 ms instead of ~1 ms, which real upstreams do not do.
    """

    def __init__(self, log_dir: Path, latency: float = 0.0, processes: int = 1, stream_chunk_delay: float = 0.0,
                 backlog: int = 4096, nodelay: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        head = [PYTHON, str(Path(__file__).resolve()), "mock"] if nodelay else [PYTHON, "-m", "bellaq.mock_upstream"]
        self.proc = _spawn([*head, "--port", str(self.port), "--latency", str(latency),
                            "--processes", str(processes), "--stream-chunk-delay", str(stream_chunk_delay),
                            "--backlog", str(backlog), *extra_args], Path(log_dir) / f"mock-{self.port}.log")
        wait_port(self.port, proc=self.proc)

    def __enter__(self) -> MockServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM, 10)


class Sink:
    """A callback receiver in a subprocess: 200 to every request; ``count()`` of those received."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/callback"
        self.proc = _spawn([PYTHON, str(Path(__file__).resolve()), "sink", "--port", str(self.port)],
                           Path(log_dir) / f"sink-{self.port}.log")
        wait_port(self.port, proc=self.proc)

    def count(self) -> int:
        with JsonClient(f"http://127.0.0.1:{self.port}") as client:
            return client.call("GET", "/count")[1]["count"]

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM, 10)



def _mock_main(argv: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    from bellaq.mock_upstream import main as mock_main  # serve() sets TCP_NODELAY

    mock_main(argv)


def _sink_main(port: int) -> None:
    from gevent import monkey

    monkey.patch_all()
    from bellaq.mock_upstream import nodelay_pywsgi
    nodelay_pywsgi()
    from gevent.pywsgi import WSGIServer

    count = 0

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        nonlocal count
        if environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/count":
            body = json.dumps({"count": count}).encode()
        else:
            environ["wsgi.input"].read()
            count += 1
            body = b"{}"
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    raise_nofile()
    WSGIServer(("127.0.0.1", port), app, log=None, backlog=4096).serve_forever()


# ------------------------------------------------------------------------------------------ client

class JsonClient:
    """One keep-alive HTTP/1.1 connection (``http.client``: far less client CPU than ``requests``,
    which matters when the client shares two cores with the server it measures)."""

    def __init__(self, base_url: str, key: str | None = None, timeout: float = 120.0) -> None:
        parts = urlparse(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def __enter__(self) -> JsonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # the server closed an idle keep-alive connection: reconnect once
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, payload = self.raw(method, path, body)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.call(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path} answered {status}: {payload}")
        return payload


def new_key(base_url: str, admin_key: str, role: str, name: str = "bench") -> str:
    with JsonClient(base_url, admin_key) as admin:
        return admin.ok("POST", "/v1/keys", {"name": f"{name}-{role}", "role": role})["key"]


# ------------------------------------------------------------------------------------ bare Celery

def _make_bare_celery() -> Any:
    """A minimal Celery app on the same Redis, default settings, to compare bellaq against.

    Broker and key prefix come from ``BENCH_BARE_BROKER`` and ``BENCH_BARE_PREFIX``, so a worker
    subprocess started with ``celery -A scripts.benchlib:bare_celery worker`` finds the same ones.
    """
    from celery import Celery

    broker = os.environ.get("BENCH_BARE_BROKER", REDIS_URL)
    prefix = os.environ.get("BENCH_BARE_PREFIX", "bqbench-bare:")
    app = Celery("bench_bare", broker=broker, backend=broker)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue="bench.bare",
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop", ignore_result=True)
    def noop() -> None:
        return None

    @app.task(name="bench.echo")
    def echo(value: Any) -> Any:
        return value

    return app


_bare: Any = None


def __getattr__(name: str) -> Any:
    global _bare
    if name == "bare_celery":
        if _bare is None:
            _bare = _make_bare_celery()
        return _bare
    raise AttributeError(name)


# ------------------------------------------------------------------------------------------ script

def main(argv: list[str] | None = None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock"]:
        _mock_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description="helper processes of the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sink = sub.add_parser("sink", help="a callback receiver answering 200")
    sink.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "sink":
        _sink_main(args.port)


if __name__ == "__main__":
    main()
