"""The ``bellaq`` command: schema, keys, recovery, the dev stack, the mock upstream, batches."""

from __future__ import annotations

import json
import sys

import click
from flask import Flask

from bellaq import create_app

# What the app of every command is built with: the entry point (``workers.cli``) wires the Celery
# side in, so that bellaq itself never imports ``workers``.
PLUGINS: list = []


def _app() -> Flask:
    from bellaq.db import init_db

    app = create_app(plugins=tuple(PLUGINS))
    init_db(app)
    return app


@click.group()
def main() -> None:
    """bellaq: an AI task-queue engine."""


@main.group("db")
def db_group() -> None:
    """The SQL schema."""


@db_group.command("init")
def db_init() -> None:
    """Create every table that does not exist yet, and the event-bus Redis user (safe to run again)."""
    from bellaq.eventbus_access import prepare

    app = _app()
    click.echo("database ready")
    click.echo(prepare(app.config["BELLAQ"], app.extensions["bellaq"].redis))


@main.group("keys")
def keys_group() -> None:
    """API keys."""


@keys_group.command("create")
@click.option("--role", type=click.Choice(["admin", "worker", "user"]), required=True)
@click.option("--name", default="", help="A label for people.")
@click.option("--owner", default=None, help="Tenant; keys with one owner share their objects.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole key object as JSON.")
def keys_create(role: str, name: str, owner: str | None, as_json: bool) -> None:
    """Create a key and print it (it is shown only this once)."""
    from bellaq.keys import create_key, owner_secret

    with _app().app_context():
        row, raw = create_key(name, role, owner)
        if as_json:
            out = row.to_dict()
            out.update(key=raw, webhook_secret=owner_secret(row.owner))
            click.echo(json.dumps(out))
        else:
            click.echo(raw)


@main.command("recover")
def recover_cmd() -> None:
    """Re-seed the queue engine (and the open task counts) from SQL after Redis lost its data."""
    from bellaq.open_tasks import recount
    from bellaq.services import services
    from bellaq.tasks import recover

    with _app().app_context():
        click.echo(f"re-seeded {recover()} tasks")
        recount()
        services().set_engine_marker()


@main.command("reap")
def reap_cmd() -> None:
    """Requeue expired leases and time out overdue tasks once (beat does this every few seconds)."""
    from bellaq.tasks import reap

    with _app().app_context():
        click.echo(json.dumps(reap()))


@main.command("mock-upstream", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def mock_upstream(ctx: click.Context) -> None:
    """Run the OpenAI-compatible mock model server (see --help of it: --port, --latency, ...)."""
    from bellaq.mock_upstream import main as mock_main

    mock_main(list(ctx.args))


@main.command("dev")
@click.option("--port", type=int, default=None, help="Web port; defaults to $PORT or 8080.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the web process binds; 0.0.0.0 exposes it to the network.")
def dev(port: int | None, host: str) -> None:
    """Run everything on this machine (Redis, mock upstream, web, worker, beat) and print an admin key."""
    from bellaq.devstack import run

    run(port, host)


@main.command("metrics-exporter")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9464, show_default=True)
def metrics_exporter(host: str, port: int) -> None:
    """Serve this host's counts (PROMETHEUS_MULTIPROC_DIR) to Prometheus, on a host with no web process."""
    from bellaq.metrics import serve_folder

    serve_folder(host, port)


@main.command("serve")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=None, help="Defaults to $PORT or 8080.")
@click.option("--workers", type=int, default=None, help="Defaults to $WEB_CONCURRENCY or 2.")
def serve(host: str, port: int | None, workers: int | None) -> None:
    """Run the API with gunicorn and gevent workers (what the Procfile's web process runs)."""
    import os

    from bellaq.config import Settings

    settings = Settings.from_env()
    argv = [
        sys.executable, "-m", "gunicorn", "workers.wsgi:app",
        "--worker-class", "gevent",
        "--workers", str(workers or settings.web_concurrency),
        "--bind", f"[{host}]:{port or settings.port}" if ":" in host else f"{host}:{port or settings.port}",
        "--worker-connections", "20000",
        "--timeout", "120",
        "--graceful-timeout", "30",
        "--config", "python:bellaq.gunicorn_conf",
    ]
    os.execv(sys.executable, argv)


from bellaq.cli_batch import batch_group  # noqa: E402

main.add_command(batch_group)
