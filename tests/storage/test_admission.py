"""Usage admissions under concurrency, on SQLite and a real PostgreSQL.

Each "process" is its own :class:`storage.Database` (its own engine and connection pool) on one database,
so nothing is shared but SQL.  A check reads usage inside :meth:`~storage.Database.admission` and refuses
at a limit; however the admissions interleave, exactly ``limit`` reservations may survive.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from storage import Database, UsageTotals

LIMIT = 3
ONE_REQUEST = UsageTotals(requests=1)  # what a request without pictures reserves


async def _admit(db: Database, user: str, workspace: str = "T1", *, hold: float = 0.02) -> bool:
    """One admission with a request limit per user; ``hold`` widens the window between read and commit."""
    try:
        async with db.admission("slack", workspace, user, ONE_REQUEST) as admission:
            used = (await admission.usage_windows("slack", workspace, user, {"hour": db.now() - timedelta(hours=1)}))[
                "hour"
            ]
            await asyncio.sleep(hold)  # the other admissions run here: without the lock they read the same sum
            if used.requests + 1 > LIMIT:
                raise LookupError("over the limit")
    except LookupError:
        return False
    return True


@pytest.mark.parametrize("processes", [1, 2])
def test_simultaneous_admissions_count_exactly(db_url: str, processes: int) -> None:
    async def main() -> tuple[list[bool], list[bool], int, int]:
        dbs = [Database(db_url) for _ in range(processes)]
        try:
            alice = await asyncio.gather(*(_admit(dbs[i % processes], "alice") for i in range(10)))
            bob = await asyncio.gather(*(_admit(dbs[i % processes], "bob") for i in range(4)))
            since = dbs[0].now() - timedelta(hours=1)
            counted = (await dbs[0].usage_since("slack", "T1", "alice", since)).requests
            workspace = (await dbs[0].usage_since("slack", "T1", None, since)).requests
            return alice, bob, counted, workspace
        finally:
            for db in dbs:
                await db.dispose()

    alice, bob, counted, workspace = asyncio.run(main())
    assert alice.count(True) == LIMIT and bob.count(True) == LIMIT
    assert counted == LIMIT and workspace == 2 * LIMIT


def test_admissions_of_different_workspaces_do_not_wait_for_each_other(pg_url: str) -> None:
    """PostgreSQL serializes admissions per workspace only (SQLite has one writer at a time, whatever the table)."""
    db_url = pg_url

    async def main() -> tuple[bool, bool]:
        first, second = Database(db_url), Database(db_url)
        release = asyncio.Event()

        async def slow() -> None:
            async with first.admission("slack", "T1", "alice", ONE_REQUEST) as admission:
                await admission.usage_windows("slack", "T1", "alice", {"hour": first.now() - timedelta(hours=1)})
                await release.wait()

        try:
            held = asyncio.create_task(slow())
            await asyncio.sleep(0.2)  # T1's admission holds its lock now
            other = await asyncio.wait_for(_admit(second, "bob", "T2", hold=0), timeout=5)
            same = asyncio.create_task(_admit(second, "carol", "T1", hold=0))
            await asyncio.sleep(0.3)
            waited = not same.done()  # T1's next admission waits for the first to finish
            release.set()
            await held
            assert await same
            return other, waited
        finally:
            await first.dispose()
            await second.dispose()

    other, waited = asyncio.run(main())
    assert other and waited
