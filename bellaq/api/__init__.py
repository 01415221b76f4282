"""HTTP API: one blueprint per resource."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from bellaq.api import health, keys, queues, tasks

    for module in (health, keys, queues, tasks):
        app.register_blueprint(module.bp)
    for optional in ("files", "batches"):
        try:
            module = __import__(f"bellaq.api.{optional}", fromlist=["bp"])
        except ModuleNotFoundError:
            continue
        app.register_blueprint(module.bp)
