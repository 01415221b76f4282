"""The ``bellaq`` command's entry point (``python -m workers.cli``): :mod:`bellaq.cli` with the
Celery side wired into the app of every command."""

from __future__ import annotations

from bellaq import cli
from workers.hooks import install

cli.PLUGINS.append(install)
main = cli.main

if __name__ == "__main__":
    main()
