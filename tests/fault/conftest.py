"""Fault injection: a PostgreSQL server of the fault tests' own, which they stop and start.

The session's shared cluster (``postgres_url`` in ``tests/conftest.py``) stays up for every other test;
this one is started once for ``tests/fault`` and its server process is stopped and started by the tests
(:meth:`tests.pg.PostgresCluster.stop_server` / ``start_server``: same data, same port), as an outage
or a restart of a real database would look to the bot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from storage.tables import Base
from tests.pg import PostgresCluster, PostgresUnavailable, create_database, create_schema, truncate_tables


@dataclass
class FaultyPostgres:
    """The fault tests' PostgreSQL: ``url`` of an emptied database with the schema; ``down()``/``up()``
    stop and start the server (async: they run ``pg_ctl`` off the event loop)."""

    cluster: PostgresCluster
    url: str

    async def down(self) -> None:
        await asyncio.to_thread(self.cluster.stop_server)

    async def up(self) -> None:
        await asyncio.to_thread(self.cluster.start_server)

    async def restart(self) -> None:
        await asyncio.to_thread(self.cluster.restart_server)


@pytest.fixture(scope="session")
def _fault_cluster() -> Iterator[tuple[PostgresCluster, str]]:
    try:
        cluster = PostgresCluster.launch()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        url = create_database(cluster.url(), "faults")
        create_schema(url)
        yield cluster, url
    finally:
        cluster.stop()


@pytest.fixture
def faulty_pg(_fault_cluster: tuple[PostgresCluster, str]) -> FaultyPostgres:
    """The fault tests' PostgreSQL, running (whatever the previous test left) and emptied."""
    cluster, url = _fault_cluster
    if not cluster.running:
        cluster.start_server()
    truncate_tables(url, [t.name for t in Base.metadata.sorted_tables])
    return FaultyPostgres(cluster, url)
