"""Fault drills against a running stack: gunicorn (gevent), two Celery workers (gevent), beat,
SQLite (or MariaDB), the mock upstream, and a private ``redis-server`` (the shared Redis is never touched).

Each drill starts a fresh stack, runs a batch (3,000 lines by default), injects one fault while
it runs, and waits for the batch to end. It prints, per drill: when the fault hit, how long until
the batch moved again (its completed count grew after the fault, or after Redis came back), how
long until it ended, lines lost, lines duplicated, lines in the error file (with their codes) and
what the clients saw. Results go to ``bench/results/faults.json``.

    .venv/bin/python scripts/drill_faults.py                    # all drills
    .venv/bin/python scripts/drill_faults.py --only worker_kill --lines 1000

Drills:
  worker_kill      kill -9 of a worker holding leases mid-batch, the other worker alive
  complete_gap     a worker exits between the engine's complete and the SQL write
  redis_flushall   Redis loses every key mid-batch
  web_restart      the web server restarts with 300 blocking requests in flight
  redis_down       Redis stopped for 10 s mid-ingest; a batch create is tried while it is down
  beat_kill        kill -9 of beat mid-batch (restarted 5 s later)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from scripts.benchlib import (  # noqa: E402
    ADMIN_KEY,
    MockServer,
    Stack,
    database,
    print_rows,
    raise_nofile,
    unique_prefix,
)
from scripts.private_redis import PrivateRedis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Drill:
    """One running drill: the stack, its Redis, the batch, and what the clients saw."""

    stack: Stack
    redis: PrivateRedis
    user: dict[str, str]
    lines: int
    batch_id: str = ""
    seen: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    recovered_at: float | None = None  # when the fault was over (Redis back); None: at once
    spare_file: str = ""  # a second input file, for a create tried during the fault
    second: str | None = None  # the batch that create made, if it answered 200
    victim: int = 0  # pid of a killed worker, whose leases are watched until they are back

    def victim_leases(self) -> int:
        return self.leases_of(self.victim)

    def leases_of(self, pid: int) -> int:
        """Leases held by worker process ``pid`` (its holder names its pid)."""
        client = self.redis.client()
        try:
            return sum(1 for key in client.scan_iter(match="*:leaseinfo")
                       for holder in client.hvals(key) if f":{pid}:".encode() in holder)
        finally:
            client.close()

    def get(self, path: str, timeout: float = 5) -> Any:
        try:
            resp = requests.get(self.stack.url + path, headers=self.user, timeout=timeout)
        except requests.RequestException as err:
            self.seen[f"GET {type(err).__name__}"] += 1
            return None
        self.seen[f"GET {resp.status_code}"] += 1
        return resp.json() if resp.status_code == 200 else None

    def batch(self) -> dict | None:
        return self.get(f"/v1/batches/{self.batch_id}")

    def completed(self) -> int:
        batch = self.batch()
        return -1 if batch is None else batch["request_counts"]["completed"] + batch["request_counts"]["failed"]

    def wait_completed(self, fraction: float, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.completed() < self.lines * fraction:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the batch did not reach {fraction:.0%} in {timeout} s")
            time.sleep(0.1)


def _post(url: str, headers: dict[str, str], path: str, body: Any = None, files: Any = None,
          timeout: float = 60) -> requests.Response:
    return requests.post(url + path, headers=headers, json=body, files=files, timeout=timeout)


def _lines(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": {
        "model": "mock-model", "messages": [{"role": "user", "content": f"line {i}"}]}}).encode() + b"\n"
        for i in range(n))


def _upload(drill: Drill) -> str:
    resp = _post(drill.stack.url, drill.user, "/v1/files", files={
        "file": ("drill.jsonl", _lines(drill.lines)), "purpose": (None, "batch")})
    resp.raise_for_status()
    return resp.json()["id"]


def _create(drill: Drill, file_id: str) -> requests.Response:
    return _post(drill.stack.url, drill.user, "/v1/batches", {"input_file_id": file_id, "endpoint": CHAT,
                                                              "completion_window": "24h"})


# ------------------------------------------------------------------------------------------ faults

def worker_kill(drill: Drill) -> None:
    drill.wait_completed(0.3)
    deadline = time.monotonic() + 60
    while True:  # the worker holding the most leases right now
        held, victim = max((drill.leases_of(w.pid), i, w) for i, w in enumerate(drill.stack.workers))[::2]
        if held or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    drill.victim = victim.pid
    drill.stack.kill(victim, signal.SIGKILL)
    drill.notes.append(f"killed a worker holding {held} leases")


def complete_gap(drill: Drill) -> None:
    victim = drill.stack.workers[0]
    victim.wait(timeout=300)
    drill.notes.append(f"worker exited with {victim.returncode} after the engine's complete")


def redis_flushall(drill: Drill) -> None:
    drill.wait_completed(0.3)
    drill.redis.flushall()
    drill.notes.append("FLUSHALL")


def web_restart(drill: Drill) -> None:
    slow = MockServer(drill.stack.tmp_path, latency=3.0)  # online answers take 3 s: in flight at the restart
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    _post(drill.stack.url, admin, "/v1/queue/register", {
        "queue": "slow", "endpoint": CHAT, "builtin": True, "upstream": {"base_url": slow.base_url}}).raise_for_status()
    drill.wait_completed(0.2)
    answers: Counter = Counter()

    def blocking(n: int) -> None:
        try:
            resp = requests.post(drill.stack.url + "/v1/queue/put", headers=drill.user, timeout=120, json={
                "endpoint": CHAT, "queue": "slow", "response_mode": "blocking", "timeout": 60,
                "data": {"model": "mock-model", "messages": [{"role": "user", "content": f"online {n}"}]}})
            answers[f"put {resp.status_code}"] += 1
        except requests.RequestException as err:
            answers[f"put {type(err).__name__}"] += 1

    try:
        with ThreadPoolExecutor(300) as pool:
            futures = [pool.submit(blocking, n) for n in range(300)]
            time.sleep(1.5)  # the requests are in flight
            drill.stack.stop_web()
            drill.stack.start_web(workers=2)
            drill.recovered_at = time.monotonic()
            for future in futures:
                future.result()
    finally:
        slow.stop()
    drill.seen.update(answers)
    drill.notes.append("web stopped (SIGTERM) and started with 300 blocking puts in flight (3 s answers)")


def redis_down(drill: Drill) -> None:
    deadline = time.monotonic() + 120
    while (batch := drill.batch()) is None or batch["status"] == "validating":  # in_progress: first chunk in
        if time.monotonic() > deadline:
            raise RuntimeError("ingest did not start")
        time.sleep(0.02)
    drill.redis.stop()
    down = time.monotonic()
    try:
        created = _create(drill, drill.spare_file)
        drill.seen[f"create {created.status_code}"] += 1
        drill.notes.append(f"the create answered {created.status_code} in {time.monotonic() - down:.1f} s")
        if created.status_code == 200:
            drill.second = created.json()["id"]
    except requests.RequestException as err:
        drill.seen[f"create {type(err).__name__}"] += 1
    time.sleep(max(0.0, 10 - (time.monotonic() - down)))  # the outage lasts 10 s
    drill.redis.start()
    drill.recovered_at = time.monotonic()
    drill.notes.append("Redis stopped 10 s mid-ingest; POST /v1/batches while down")


def beat_kill(drill: Drill) -> None:
    drill.wait_completed(0.3)
    beat = next(p for p in drill.stack.procs if "beat" in " ".join(map(str, p.args)))
    drill.stack.kill(beat, signal.SIGKILL)
    time.sleep(5)  # beat stays dead for 5 s
    drill.stack.start_beat()
    drill.recovered_at = time.monotonic()
    drill.notes.append("beat killed, restarted 5 s later")


DRILLS: dict[str, tuple[str, Callable[[Drill], None]]] = {
    "worker_kill": ("kill -9 of a worker holding leases", worker_kill),
    "complete_gap": ("worker exit between engine complete and SQL write", complete_gap),
    "redis_flushall": ("Redis FLUSHALL mid-batch", redis_flushall),
    "web_restart": ("web restart, 300 blocking requests in flight", web_restart),
    "redis_down": ("Redis down 10 s mid-ingest (+ a create)", redis_down),
    "beat_kill": ("kill -9 of beat", beat_kill),
}


# ------------------------------------------------------------------------------------------- drill

def run_drill(name: str, lines: int, latency: float, lease: float, workdir: Path,
              database_url: str | None = None) -> dict[str, Any]:
    title, fault = DRILLS[name]
    tmp = workdir / name
    tmp.mkdir(parents=True)
    with PrivateRedis(tmp) as private, MockServer(tmp, latency=latency) as mock, \
            database(database_url, tmp) as sql_url:
        env = {"BELLAQ_BROKER_URL": private.url, "BELLAQ_WORKER_LEASE": str(lease),
               "BELLAQ_WORKER_LEASE_RENEW": str(max(0.5, lease / 3)), "BELLAQ_LOST_COMPLETION_GRACE": "2"}
        if name == "redis_down":
            env["BELLAQ_BATCH_CHUNK_SIZE"] = "100"
        stack = Stack(tmp, unique_prefix("drill"), sql_url, mock.base_url,
                      redis_url=private.url, admin_key=ADMIN_KEY, **env)
        try:
            stack.start_web(workers=2)
            if name == "complete_gap":
                stack.env["BELLAQ_FAULT_EXIT_AT"] = "after_engine_complete"
                stack.start_worker(concurrency=16)
                del stack.env["BELLAQ_FAULT_EXIT_AT"]
            else:
                stack.start_worker(concurrency=16)
            stack.start_worker(concurrency=16)
            stack.start_beat()
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            key = _post(stack.url, admin, "/v1/keys", {"name": "drill", "role": "user"}).json()["key"]
            drill = Drill(stack, private, {"Authorization": f"Bearer {key}"}, lines)
            file_id = _upload(drill)
            if name == "redis_down":
                drill.spare_file = _upload(drill)
            created = _create(drill, file_id)
            created.raise_for_status()
            drill.batch_id = created.json()["id"]
            started = time.monotonic()
            before = max(0, drill.completed())
            fault(drill)
            hit = time.monotonic()
            since = drill.recovered_at or hit
            moved_at = ended_at = back_at = None
            base = max(before, drill.completed()) if drill.recovered_at is None else -1
            deadline = time.monotonic() + 600
            batch: dict | None = None
            while time.monotonic() < deadline:
                if drill.victim and back_at is None and drill.victim_leases() == 0:
                    back_at = time.monotonic()
                batch = drill.batch()
                if batch is not None:
                    done = batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
                    if base < 0:
                        base = done
                    if moved_at is None and (done > base or batch["status"] in FINAL):
                        moved_at = time.monotonic()
                    if batch["status"] in FINAL:
                        ended_at = time.monotonic()
                        break
                time.sleep(0.1)
            out, err = _results(drill, batch)
            ids = Counter(line["custom_id"] for line in out + err)
            expected = {f"c{i}" for i in range(lines)}
            extra = ""
            if name == "redis_down":
                listed = drill.get("/v1/batches?limit=100") or {"data": []}
                extra = (f"; batches after: {len(listed['data'])} "
                         f"(the create during the outage was {'kept' if drill.second else 'refused'})")
            return {
                "drill": name, "fault": title, "lines": lines,
                "status": batch["status"] if batch else None,
                "fault_at_s": round(hit - started, 1),
                "moved_again_s": None if moved_at is None else round(moved_at - since, 1),
                "ended_after_s": None if ended_at is None else round(ended_at - since, 1),
                "dead_leases_back_s": None if back_at is None else round(back_at - since, 1),
                "lost": len(expected - set(ids)),
                "duplicated": sum(1 for n in ids.values() if n > 1),
                "error_lines": len(err),
                "error_codes": dict(Counter(_code(line) for line in err)),
                "clients_saw": dict(sorted(drill.seen.items())),
                "notes": "; ".join(drill.notes) + extra,
            }
        finally:
            stack.stop()


def _code(line: dict) -> str:
    error = line.get("error") or ((line.get("response") or {}).get("body") or {}).get("error") or {}
    return str(error.get("code") or error.get("type") or (line.get("response") or {}).get("status_code"))


def _results(drill: Drill, batch: dict | None) -> tuple[list[dict], list[dict]]:
    def content(file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        resp = requests.get(f"{drill.stack.url}/v1/files/{file_id}/content", headers=drill.user, timeout=60)
        resp.raise_for_status()
        return [json.loads(x) for x in resp.content.splitlines() if x.strip()]

    if batch is None:
        return [], []
    return content(batch.get("output_file_id")), content(batch.get("error_file_id"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.05, help="mock upstream latency, seconds")
    parser.add_argument("--lease", type=float, default=30.0, help="BELLAQ_WORKER_LEASE of the stack, seconds")
    parser.add_argument("--only", action="append", choices=sorted(DRILLS), help="run only these drills")
    parser.add_argument("--database", default="sqlite",
                        help="sqlite (default) or a mysql+pymysql:// server URL (a fresh database per drill)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = parser.parse_args(argv)
    raise_nofile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bq-drill-") as workdir:
        for name in args.only or list(DRILLS):
            print(f"-- {name}", flush=True)
            row = run_drill(name, args.lines, args.latency, args.lease, Path(workdir), args.database)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print_rows(["fault", "moved again (s)", "ended (s)", "lost", "duplicated", "error file", "clients saw"],
               [[r["fault"], r["moved_again_s"], r["ended_after_s"], r["lost"], r["duplicated"],
                 f"{r['error_lines']} {r['error_codes'] or ''}".strip(),
                 ", ".join(f"{k}: {v}" for k, v in r["clients_saw"].items())] for r in rows])
    result = {"lines": args.lines, "latency_s": args.latency, "worker_lease_s": args.lease,
              "database": "sqlite" if args.database == "sqlite" else "mysql",
              "stack": "gunicorn 2 gevent workers, 2 Celery gevent workers -c 16, beat, private redis-server",
              "machine": "shared: 2 cores used by several engineers at once",
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "drills": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
