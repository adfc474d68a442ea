"""The worker app of the pytest-celery image: pytest-celery's app template plus ``install``.

Not imported by a worker of yours. :class:`~celery_concurrent.testing.pytest_celery.
ConcurrentWorkerContainer` hands this module's source to pytest-celery, which writes it to the
container's ``/app/app.py`` (the worker runs ``celery -A app worker``) with its three
placeholder lines below replaced by the test's task and signal module imports, the test app's
name and the test app's configuration. (The placeholders must not appear in this docstring:
pytest-celery replaces text, not statements.) ``install(app)`` then selects ConcurrentPool and
TargetAutoscaler, as ``celery_concurrent.install`` does in production.
"""

from __future__ import annotations

import json

from celery import Celery

from celery_concurrent import install

imports = None

app = Celery("celery_test_app")
config = None

if config:
    app.config_from_object(config)
    print(f"Changed worker configuration: {json.dumps(config, indent=4)}")

install(app)

if __name__ == "__main__":
    app.start()
