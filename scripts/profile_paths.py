"""Flame graphs of the hot paths under load, recorded with ``py-spy`` (the ``dev`` extra).

    python scripts/profile_paths.py [--database-url URL] [--n 2000] [--rtt-n 300] [--tag before]

Starts one web host (gunicorn, one gevent worker), one Celery worker (gevent) and the
zero-latency mock (``scripts.benchlib``), then records, each while its load runs:

- ``put``: callback puts on 4 connections: the web worker (HTTP put) and the Celery worker
  (drain, bulk complete, first callback attempt);
- ``blocking``: sequential blocking puts: the web worker and the Celery worker.

SVGs go to ``bench/results/flames/<tag>-<database>-<path>-<process>.svg``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.benchlib import (  # noqa: E402
    REDIS_URL,
    JsonClient,
    MockServer,
    Sink,
    Stack,
    database,
    delete_prefix,
    new_key,
    raise_nofile,
    unique_prefix,
)

FLAMES = ROOT / "bench" / "results" / "flames"
CHAT = "/v1/chat/completions"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[dev]'")
    return found


def record(pids: dict[str, int], out: str, load: Any, raw: bool = False) -> None:
    """Record every pid while ``load()`` runs (``raw``: collapsed stacks as text, not an SVG)."""
    spies = []
    for name, pid in pids.items():
        svg = FLAMES / f"{out}-{name}.{'txt' if raw else 'svg'}"
        spies.append(subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--rate", "200",
                                       "--nonblocking", "--format", "raw" if raw else "flamegraph",
                                       "-o", str(svg)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(1.0)  # py-spy attaches
    try:
        load()
    finally:
        for spy in spies:
            spy.send_signal(2)
        for spy in spies:
            _out, err = spy.communicate(timeout=60)
            if spy.returncode not in (0, -2):
                print(err.decode(errors="replace"), file=sys.stderr)


def _puts(url: str, key: str, body: dict[str, Any], n: int, conns: int) -> None:
    def run(count: int) -> None:
        with JsonClient(url, key) as client:
            for i in range(count):
                client.ok("POST", "/v1/queue/put", dict(body, data={"model": "mock-1", "messages": [
                    {"role": "user", "content": f"t {i}"}]}))

    threads = [threading.Thread(target=run, args=(n // conns,)) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _wait_ended(admin: JsonClient, queue: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = admin.ok("GET", f"/v1/queue/{queue}:0/stats")
        if s["done"] + s["failed"] >= n:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{queue}: not every task ended within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--n", type=int, default=2000, help="callback puts (default 2000)")
    parser.add_argument("--rtt-n", type=int, default=300, help="sequential blocking puts (default 300)")
    parser.add_argument("--tag", default="now", help="file name prefix (default: now)")
    parser.add_argument("--raw", action="store_true", help="collapsed stacks (.txt) instead of SVGs")
    args = parser.parse_args()
    raise_nofile()
    FLAMES.mkdir(parents=True, exist_ok=True)
    db_name = "mariadb" if args.database_url else "sqlite"
    prefix = unique_prefix("bqprofile")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with database(args.database_url, tmp) as db_url, MockServer(tmp) as mock, Sink(tmp) as sink, \
                Stack(tmp, prefix, db_url, mock.base_url, redis_url=REDIS_URL) as stack:
            try:
                stack.start_web(workers=1)
                worker = stack.start_worker(concurrency=20, pool="gevent")
                user = new_key(stack.url, stack.admin_key, "user")
                admin = JsonClient(stack.url, stack.admin_key)
                for q in ("prof_cb", "prof_rtt"):
                    admin.ok("POST", "/v1/queue/register", {"queue": q, "endpoint": CHAT, "builtin": True,
                                                            "strategy": "fifo"})
                up = {"model": "mock-1", "messages": [{"role": "user", "content": "up"}]}
                with JsonClient(stack.url, user) as c:  # workers up
                    c.ok("POST", "/v1/queue/put", {"endpoint": CHAT, "queue": "prof_rtt", "response_mode": "blocking",
                                                   "data": up, "timeout": 60})
                pids = {"web": stack.web_pids()[1], "worker": worker.pid}
                cb = {"endpoint": CHAT, "queue": "prof_cb", "callback_url": sink.url}
                n = args.n - args.n % 4

                def put_load() -> None:
                    _puts(stack.url, user, cb, n, 4)
                    _wait_ended(admin, "prof_cb", n)

                record(pids, f"{args.tag}-{db_name}-put", put_load, args.raw)
                rtt = {"endpoint": CHAT, "queue": "prof_rtt", "response_mode": "blocking", "timeout": 60}
                record(pids, f"{args.tag}-{db_name}-blocking", lambda: _puts(stack.url, user, rtt, args.rtt_n, 1),
                       args.raw)
                admin.close()
            finally:
                delete_prefix(REDIS_URL, prefix)
    print(json.dumps(sorted(p.name for p in FLAMES.glob(f"{args.tag}-{db_name}-*.{'txt' if args.raw else 'svg'}"))))


if __name__ == "__main__":
    main()
