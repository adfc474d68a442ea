"""pytest-celery: its Docker worker, on ConcurrentPool.

For projects that test with `pytest-celery <https://docs.celeryq.dev/projects/pytest-celery/>`_
and Docker (``pip install 'celery-concurrent[pytest-celery]'``). Import the fixtures into your
``conftest.py``, as pytest-celery's own examples do::

    from celery_concurrent.testing.pytest_celery import *  # noqa: F403

They replace pytest-celery's default worker: ``celery_setup.worker`` then runs in the image of
``docker/pytest-celery/Dockerfile`` (the library installed, with pytest-celery), as
:class:`ConcurrentWorkerContainer` configures it: ``celery -A app worker -c 1``, where the
``app.py`` pytest-celery writes into the container calls ``celery_concurrent.install(app)``
(:mod:`celery_concurrent.testing.pytest_celery_app`), so the pool is ConcurrentPool and the
autoscaler TargetAutoscaler. Your task modules reach the container as pytest-celery sends them
(the ``default_worker_tasks`` fixture). The image is built from the repository checkout this
module belongs to; override ``concurrent_worker_image_context`` to build from elsewhere.

pytest-celery is optional: importing this module without it raises an :class:`ImportError`
that names the ``pip install`` command.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import celery
import pytest

INSTALL_HINT = "pip install 'celery-concurrent[pytest-celery]'"

try:
    from pytest_celery.vendors.worker.container import CeleryWorkerContainer
    from pytest_celery.vendors.worker.defaults import (
        DEFAULT_WORKER_CONTAINER_TIMEOUT,
        DEFAULT_WORKER_VOLUME,
    )
    from pytest_docker_tools import build, container, fxtr
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"celery_concurrent.testing.pytest_celery needs pytest-celery, which is not "
        f"installed ({exc}): {INSTALL_HINT}"
    ) from exc

__all__ = [
    "DOCKERFILE",
    "IMAGE_TAG",
    "ConcurrentWorkerContainer",
    "celery_base_worker_image",
    "concurrent_worker_image_context",
    "default_worker_container",
    "default_worker_container_cls",
    "default_worker_container_session_cls",
]

#: The image's Dockerfile, relative to the build context (the repository root).
DOCKERFILE = "docker/pytest-celery/Dockerfile"
IMAGE_TAG = "celery-concurrent/pytest-celery-worker:test"
_CHECKOUT = Path(__file__).resolve().parents[2]


class ConcurrentWorkerContainer(CeleryWorkerContainer):
    """pytest-celery's worker container for ``docker/pytest-celery/Dockerfile``.

    pytest-celery starts the container with :meth:`command` and :meth:`initial_env`, and fills
    its ``/app`` volume from :meth:`initial_content`; these class methods are its whole
    configuration, so subclass to change one (e.g. :meth:`pool_args` for more children).
    """

    @property
    def client(self) -> Any:
        return self

    @classmethod
    def version(cls) -> str:
        """The Celery version the image installs: the test process's own."""
        return str(celery.__version__)

    @classmethod
    def worker_name(cls) -> str:
        return "celery_concurrent_worker"

    @classmethod
    def pool_args(cls) -> tuple[str, ...]:
        """Worker arguments for the pool: one child (override, e.g. ``("--autoscale=4,1",)``).

        The pool and autoscaler themselves come from ``install(app)`` in the app module.
        """
        return ("-c", "1")

    @classmethod
    def command(
        cls,
        *args: str,
        debugpy: bool = False,
        wait_for_client: bool = True,
        **kwargs: dict[str, Any],
    ) -> list[str]:
        """pytest-celery's worker command line, then :meth:`pool_args`, then ``args``."""
        return list(
            super().command(
                *cls.pool_args(), *args, debugpy=debugpy, wait_for_client=wait_for_client
            )
        )

    @classmethod
    def app_module(cls) -> ModuleType:
        """pytest-celery's app template with ``celery_concurrent.install(app)`` added."""
        from . import pytest_celery_app

        return pytest_celery_app


@pytest.fixture(scope="session")
def concurrent_worker_image_context() -> str:
    """Build context of the worker image: the celery-concurrent checkout (override to move it)."""
    if not (_CHECKOUT / DOCKERFILE).is_file():
        raise pytest.UsageError(
            f"the celery-concurrent pytest-celery image is built from a checkout of the "
            f"repository, and {_CHECKOUT / DOCKERFILE} does not exist (celery-concurrent is "
            f"installed from a wheel?); override the concurrent_worker_image_context fixture "
            f"to return the path of a checkout"
        )
    return str(_CHECKOUT)


celery_base_worker_image = build(
    path=fxtr("concurrent_worker_image_context"),
    dockerfile=DOCKERFILE,
    tag=IMAGE_TAG,
    buildargs={
        "CELERY_VERSION": fxtr("default_worker_celery_version"),
        "CELERY_LOG_LEVEL": fxtr("default_worker_celery_log_level"),
        "CELERY_WORKER_NAME": fxtr("default_worker_celery_worker_name"),
        "CELERY_WORKER_QUEUE": fxtr("default_worker_celery_worker_queue"),
        "PYTEST_CELERY_PKG": fxtr("default_worker_pytest_celery_pkg"),
    },
)

default_worker_container = container(
    image="{celery_base_worker_image.id}",
    ports=fxtr("default_worker_ports"),
    environment=fxtr("default_worker_env"),
    network="{default_pytest_celery_network.name}",
    volumes={"{default_worker_volume.name}": DEFAULT_WORKER_VOLUME},
    wrapper_class=ConcurrentWorkerContainer,
    timeout=DEFAULT_WORKER_CONTAINER_TIMEOUT,
    command=fxtr("default_worker_command"),
)


@pytest.fixture
def default_worker_container_cls() -> type[CeleryWorkerContainer]:
    """pytest-celery's default worker, on ConcurrentPool."""
    return ConcurrentWorkerContainer


@pytest.fixture(scope="session")
def default_worker_container_session_cls() -> type[CeleryWorkerContainer]:
    """The same, for pytest-celery's session fixtures (the image's build arguments)."""
    return ConcurrentWorkerContainer
