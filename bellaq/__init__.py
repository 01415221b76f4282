"""bellaq: an AI task-queue engine with OpenAI-compatible batches, single tasks and named queues."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flask import Flask

from bellaq.config import Settings

__version__ = "0.1.0"

Plugin = Callable[[Flask], None]


def create_app(settings: Settings | None = None, plugins: Iterable[Plugin] = ()) -> Flask:
    """The application factory: one Flask app per process (web or worker).

    ``plugins`` are called with the app once it is built; the entry points that run with the
    Celery side (``workers.wsgi``, the CLI, ``workers.celery_app``) pass ``workers.hooks.install``,
    which adds the listeners that hand work to Celery (see :class:`bellaq.services.Services`).
    """
    from bellaq import metrics, open_tasks
    from bellaq.api import register_blueprints
    from bellaq.errors import register_error_handlers
    from bellaq.event_completions import completer
    from bellaq.eventbus import EventBus
    from bellaq.extensions import db
    from bellaq.online import publish_completions
    from bellaq.services import build_services
    from bellaq.sql_pool import autocommit_twin, engine_options, install
    from bellaq.validation import check_path_values

    settings = settings or Settings.from_env()
    app = Flask(__name__, instance_path=str(settings.instance_dir.resolve()), static_folder=None)  # no /static route
    app.config.update(
        BELLAQ=settings,
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(settings.database_url),
        MAX_CONTENT_LENGTH=settings.max_json_bytes,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.json.compact = True
    if settings.database_url.startswith("sqlite:///"):
        settings.instance_dir.mkdir(parents=True, exist_ok=True)
    db.init_app(app)
    with app.app_context():
        install(db.engine)
        app.extensions["bellaq.autocommit_engine"] = autocommit_twin(db.engine)
    svc = build_services(settings)
    app.extensions["bellaq"] = svc
    bus = app.extensions["bellaq.eventbus"] = EventBus(svc.redis, settings.redis_prefix, svc.instance_id)
    bus.on_completion = completer(app, bus)
    svc.on_task_end.append(publish_completions)
    svc.on_task_end.append(metrics.tasks_ended)
    svc.on_task_end.append(open_tasks.tasks_ended)
    register_error_handlers(app)
    app.url_value_preprocessor(check_path_values)
    register_blueprints(app)
    for plugin in plugins:
        plugin(app)
    return app
