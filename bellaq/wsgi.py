"""The WSGI entry point for gunicorn (``bellaq.wsgi:app``); gevent patches before anything loads."""

from gevent import monkey

monkey.patch_all()

from bellaq import create_app  # noqa: E402
from bellaq.db import init_db  # noqa: E402

app = create_app()
init_db(app)
