"""Imports run one way: ``workers`` depends on ``bellaq``, never the reverse (the entry points that
wire the Celery side in, ``workers.wsgi`` and ``workers.cli``, live in ``workers``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_every_bellaq_module_imports_without_workers() -> None:
    script = textwrap.dedent("""
        import importlib, importlib.abc, pkgutil, sys

        class NoWorkers(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "workers" or name.startswith("workers."):
                    raise ImportError(f"bellaq must not import {name}")
                return None

        sys.meta_path.insert(0, NoWorkers())
        import bellaq
        names = [m.name for m in pkgutil.walk_packages(bellaq.__path__, "bellaq.")
                 if not m.name.endswith("__main__")]
        for name in names:
            importlib.import_module(name)
        assert not any(n == "workers" or n.startswith("workers.") for n in sys.modules)
        print(len(names))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 20  # every module was really walked


def test_the_app_builds_without_the_celery_side(settings) -> None:
    from bellaq import create_app

    app = create_app(settings)
    svc = app.extensions["bellaq"]
    assert svc.on_work_ready == [] and svc.on_batch_created == [] and svc.on_batch_ending == []
    assert {"batches.create", "files.create", "tasks.put"} <= set(app.view_functions)
