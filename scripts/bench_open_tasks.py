"""What the open-task bound (BELLAQ_MAX_OPEN_TASKS_PER_OWNER) costs, against the alternative.

    python scripts/bench_open_tasks.py [--open 100000] [--owners 10] [--database-url URL]

Fills a fresh database with ``--open`` open tasks spread over ``--owners`` owners (one of them
holding half), then times, with the app's own code:

- ``admit``: what a put pays, ``open_tasks.admit_each`` (one HINCRBY on Redis), then its undo;
- ``indexed_count``: the alternative, ``SELECT COUNT(*) ... WHERE owner = ? AND status IN (open)``
  for the biggest owner, on the ``owner`` index;
- ``recount``: beat's repair, ``open_tasks.recount`` (one GROUP BY over open tasks, one pipeline).

Redis at ``BELLAQ_REDIS_URL`` under a unique prefix, deleted at the end. Results go to
``bench/results/open_tasks.json`` (keyed by database kind).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchlib import REDIS_URL, database, percentiles  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "bench" / "results" / "open_tasks.json"


def timed(call, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def run(url: str, open_n: int, owners: int, n: int) -> dict:
    from sqlalchemy import insert

    from bellaq import create_app, open_tasks
    from bellaq.config import Settings
    from bellaq.db import init_db
    from bellaq.extensions import db
    from bellaq.models import Task
    from bellaq.models.tasks import OPEN_STATUSES, TaskStatus

    prefix = f"bqbench{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env().replace(database_url=url, redis_url=REDIS_URL, redis_prefix=prefix)
    app = create_app(settings)
    init_db(app)
    big = "owner-0"
    try:
        with app.app_context():
            rows = []
            for i in range(open_n):
                owner = big if i % 2 == 0 else f"owner-{1 + i % max(1, owners - 1)}"
                rows.append({"id": f"task_{i:024d}", "owner": owner, "batch_id": "", "endpoint": "/v1/chat/completions",
                             "queue": "q", "level": 0, "data": "{}", "status": TaskStatus.WAITING,
                             "response_mode": "callback",
                             "callback_url": "", "timeout": 300, "instance_id": "", "start_time": i,
                             "expire_time": i + 300_000, "attempts": 0})
                if len(rows) == 5000:
                    db.session.execute(insert(Task.__table__), rows)
                    rows = []
            if rows:
                db.session.execute(insert(Task.__table__), rows)
            db.session.commit()
            settings.max_open_tasks_per_owner = open_n * 2

            def admit() -> None:
                open_tasks.admit_each([big])
                open_tasks.added(big, -1)

            def indexed_count() -> None:
                db.session.execute(db.select(db.func.count()).select_from(Task)
                                   .where(Task.owner == big, Task.status.in_(OPEN_STATUSES))).scalar_one()
                db.session.rollback()

            counts = open_tasks.recount()
            assert counts[big] == (open_n + 1) // 2
            return {
                "open_tasks": open_n, "owners": owners, "biggest_owner_open": counts[big],
                "admit": timed(admit, n),
                "indexed_count": timed(indexed_count, max(5, n // 20)),
                "recount": timed(open_tasks.recount, 5),
            }
    finally:
        for key in app.extensions["bellaq"].redis.scan_iter(match=f"{prefix}*", count=1000):
            app.extensions["bellaq"].redis.delete(key)
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
            app.extensions["bellaq.autocommit_engine"].dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", type=int, default=100_000, help="open tasks in the database (default 100,000)")
    parser.add_argument("--owners", type=int, default=10)
    parser.add_argument("--n", type=int, default=2000, help="timed admits (default 2000)")
    parser.add_argument("--database-url", default=None, help="sqlite (default) or a mysql+pymysql:// URL")
    args = parser.parse_args()
    kind = "mysql" if args.database_url and args.database_url.startswith("mysql") else "sqlite"
    with tempfile.TemporaryDirectory() as tmp, database(args.database_url, Path(tmp)) as url:
        result = run(url, args.open, args.owners, args.n)
    result.update(database=kind, when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for name in ("admit", "indexed_count", "recount"):
        r = result[name]
        print(f"{name:14} p50 {r['p50_ms']:9.3f} ms   p99 {r['p99_ms']:9.3f} ms   (n={r['n']})")
    print(f"({result['open_tasks']:,} open tasks, biggest owner {result['biggest_owner_open']:,}, {kind})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    previous[kind] = result
    OUT.write_text(json.dumps(previous, indent=1) + "\n")
    print(f"written to {OUT.relative_to(OUT.parents[2])}")


if __name__ == "__main__":
    main()
