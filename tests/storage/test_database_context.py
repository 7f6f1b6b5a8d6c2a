"""``async with Database(url) as db``: the engine is disposed on the way out, also when the work raised."""

from __future__ import annotations

import asyncio

import pytest

from storage import Database


def test_async_with_disposes_the_engine_after_the_work(db_url: str) -> None:
    async def main() -> tuple[int, int]:
        async with Database(db_url) as db:
            await db.ping()
            pooled = db.engine.pool.checkedin()
        return pooled, db.engine.pool.checkedin()

    pooled, after = asyncio.run(main())
    assert pooled == 1 and after == 0  # dispose() replaced the pool: its connection is closed


def test_async_with_disposes_the_engine_when_the_work_raises(db_url: str) -> None:
    seen: list[Database] = []

    async def main() -> None:
        async with Database(db_url) as db:
            seen.append(db)
            await db.ping()
            raise LookupError("the work failed")

    with pytest.raises(LookupError, match="the work failed"):
        asyncio.run(main())
    assert seen[0].engine.pool.checkedin() == 0
