"""Quota admission: what checking and reserving in one serialized transaction costs.

Each request is admitted by :meth:`bot.core.quotas.QuotaPolicy.admit` — the quota check and the usage
reservation in one transaction, serialized per workspace (PostgreSQL advisory lock; SQLite write lock).
The baseline is the unserialized way it was done before: check with plain reads, then write the ledger row
(not exact: simultaneous requests all pass).  Per cell, ``--concurrency`` requests are sent at once, spread
over 1 or 8 workspaces (serialization is per workspace), for ``--rounds`` rounds, on a ledger pre-filled
with ``--rows`` rows of this month (the sums read real index ranges).  Limits are set high, so every
request passes and both ways do the same reads.

    python benchmarks/admission.py                 # SQLite and a throwaway PostgreSQL (needs initdb)
    python benchmarks/admission.py --rows 100000 --rounds 40

Prints admissions/s, latency p50/p95 per request, and the ratio of admissions/s to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _workload import pct  # noqa: E402

from bot.core.config import QuotaSettings  # noqa: E402
from bot.core.quotas import QuotaPolicy  # noqa: E402
from storage import Database, sqlite_url  # noqa: E402
from storage.migrate import upgrade_async  # noqa: E402
from storage.tables import UsageEntry  # noqa: E402

LIMITS = {"requests_per_day": 10**9, "images_per_day": 10**9}
QUOTAS = QuotaSettings.model_validate({"user": LIMITS, "workspace": {**LIMITS, "requests_per_month": 10**9}})


async def _prefill(db: Database, rows: int, workspaces: int) -> None:
    now = db.now()
    async with db.sessions.begin() as session:
        session.add_all(
            UsageEntry(
                at=now - timedelta(minutes=i % 600),
                platform="bench",
                workspace=f"W{i % workspaces}",
                user_id=f"U{i % 50}",
                requests=1,
                tokens=40,
                images=i % 2,
            )
            for i in range(rows)
        )


async def _baseline(policy: QuotaPolicy, workspace: str, user: str) -> None:
    await policy._check(policy.db, "bench", workspace, user, 1, policy.db.now())
    await policy.db.record_usage(platform="bench", workspace=workspace, user_id=user, requests=1, images=1)


async def _admit(policy: QuotaPolicy, workspace: str, user: str) -> None:
    await policy.admit("bench", workspace, user, 1)


async def _cell(url: str, way: str, workspaces: int, concurrency: int, rounds: int) -> dict[str, float]:
    db = Database(url)
    policy = QuotaPolicy(QUOTAS, db)
    call = _admit if way == "admit" else _baseline
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await call(policy, f"W{i % workspaces}", f"U{i % 50}")
        latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the pool
        latencies.clear()
        started = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await db.dispose()
    return {"per_s": len(latencies) / elapsed, "p50": pct(latencies, 0.5) * 1e3, "p95": pct(latencies, 0.95) * 1e3}


async def _run(name: str, url: str, args: argparse.Namespace) -> list[list[str]]:
    await upgrade_async(url)
    db = Database(url)
    await _prefill(db, args.rows, 8)
    await db.dispose()
    rows = []
    for workspaces in (1, 8):
        base = await _cell(url, "baseline", workspaces, args.concurrency, args.rounds)
        new = await _cell(url, "admit", workspaces, args.concurrency, args.rounds)
        for way, cell in (("check, then write (baseline, not exact)", base), ("admit (exact)", new)):
            rows.append([name, str(workspaces), way, f"{cell['per_s']:.0f}", f"{cell['p50']:.1f}",
                         f"{cell['p95']:.1f}", f"{cell['per_s'] / base['per_s']:.2f}×"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="ledger rows this month before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="requests sent at once")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()

    table: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        table += asyncio.run(_run("SQLite", sqlite_url(Path(tmp) / "bench.db"), args))
    if not args.no_postgres:
        from tests.pg import PostgresCluster, create_database

        with PostgresCluster() as cluster:
            url = create_database(cluster.url(), "admission_bench")
            table += asyncio.run(_run("PostgreSQL", url, args))

    head = ["database", "workspaces", "way", "admissions/s", "p50 ms", "p95 ms", "vs baseline"]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    print(f"\n{args.concurrency} requests at once × {args.rounds} rounds, {args.rows} ledger rows this month\n")
    for row in [head, ["-" * w for w in widths], *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"\nmedian of the admit/baseline ratios: {statistics.median(float(r[6][:-1]) for r in table[1::2]):.2f}")


if __name__ == "__main__":
    main()
