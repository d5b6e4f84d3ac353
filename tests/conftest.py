"""Shared fixtures. Cluster tests bring the local environment up (idempotent, fast when running)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localenv.testing import Cluster


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster.up()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with cluster.namespace() as name:
        yield name
