"""The WSGI entry point for gunicorn (``workers.wsgi:app``): the app with the Celery side wired in;
gevent patches before anything loads."""

from gevent import monkey

monkey.patch_all()

from bellaq import create_app  # noqa: E402
from bellaq.db import init_db  # noqa: E402
from bellaq.eventbus_access import prepare  # noqa: E402
from workers.hooks import install  # noqa: E402

app = create_app(plugins=(install,))
init_db(app)
prepare(app.config["BELLAQ"], app.extensions["bellaq"].redis)
