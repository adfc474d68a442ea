"""Packaging: one version, the declared licence, the kombu pin, the changelog."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import kombu
from packaging.requirements import Requirement
from packaging.version import Version

import celery_concurrent

ROOT = Path(__file__).resolve().parent.parent
DIST = "celery-concurrent"


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    for line in importlib.metadata.requires(DIST) or []:
        req = Requirement(line)
        if req.name == name and req.marker is None:
            return req
    raise AssertionError(f"{DIST} does not depend on {name}")


def test_package_version_and_metadata_agree():
    # If this fails after a version bump, the installed metadata is stale:
    # pip install -e '.[test]'
    assert importlib.metadata.version(DIST) == celery_concurrent.__version__
    Version(celery_concurrent.__version__)  # a valid PEP 440 version


def test_version_has_one_source():
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert "version" not in project, "pyproject.toml must not repeat the version"
    assert "version" in project["dynamic"]
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    assert tool["setuptools"]["dynamic"]["version"] == {"attr": "celery_concurrent.__version__"}


def test_licence_file_matches_the_declared_licence():
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == "BSD-3-Clause"
    assert importlib.metadata.metadata(DIST)["License-Expression"] == "BSD-3-Clause"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert re.search(r"Copyright \(c\) \d{4}, the celery-concurrent authors", text)
    assert "Neither the name of the copyright holder" in text  # clause 3


def test_kombu_is_pinned_to_the_minor_version_redis_acks_wraps():
    req = _requirement("kombu")
    installed = Version(kombu.__version__)
    assert installed.release[:2] == (5, 7), "redis_acks.py was checked on kombu 5.7 only"
    assert req.specifier.contains(installed)
    assert not req.specifier.contains("5.8.0"), "private kombu methods may change in 5.8"
    assert not req.specifier.contains("5.6.9")


def test_changelog_has_unreleased_and_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert headings[0] == "Unreleased"
    assert celery_concurrent.__version__ in headings
    unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    for expected in ("celery_concurrent.testing", "requires-python", "3.11", "kombu"):
        assert expected in unreleased, expected


def test_project_urls_and_classifiers():
    meta = importlib.metadata.metadata(DIST)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    classifiers = meta.get_all("Classifier") or []
    assert "Framework :: Celery" in classifiers
    assert "Typing :: Typed" in classifiers
    python = _pyproject()["project"]["requires-python"]  # type: ignore[index]
    assert python == ">=3.11"
    versions = [c.rsplit(" ", 1)[1] for c in classifiers if re.fullmatch(r".*:: 3\.\d+", c)]
    assert versions and min(versions, key=Version) == "3.11"
