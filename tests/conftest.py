"""Shared fixtures. Cluster tests bring the local environment up (idempotent, fast when running)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from localenv.cluster import build_binaries
from localenv.testing import Cluster

CHART_UNIT_TESTS = Path(__file__).parent / "unit" / "chart"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the Go binaries the selected tests need, and only those, before the first test:
    helm for the chart tests and the cluster tests (most render the chart), Kueue for the tests
    that start it. A cold build takes minutes (Kueue about 5 on 2 quiet cores) and would otherwise
    count against one test's timeout; once built this only re-links (tens of milliseconds)."""
    if session.config.option.collectonly:
        return
    needed: set[str] = set()
    for item in session.items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "cluster" in fixtures or CHART_UNIT_TESTS in item.path.parents:
            needed.add("helm")
        if "kueue" in fixtures:
            needed.add("kueue")
    if needed:
        capture = session.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # show build progress as it happens
            build_binaries(*sorted(needed))


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster.up()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with cluster.namespace() as name:
        yield name
