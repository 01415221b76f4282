"""HTTP API: one blueprint per resource."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from bellaq.api import batches, dashboard, docs, files, health, keys, metrics, queues, tasks

    for module in (health, metrics, keys, queues, tasks, files, batches, dashboard, docs):
        app.register_blueprint(module.bp)
