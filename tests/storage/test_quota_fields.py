"""One list of quota limits (``QuotaLimits``' fields) and one list of counters (``bot.core.quotas.COUNTERS``):
the tables, the checks, the ledger's sums and the admin options follow them, and these tests say when they
disagree — a counter or a limit added without a migration fails here (and the migration tests compare the
tables with what the migrations make)."""

from __future__ import annotations

import pytest
import typer

from bot.cli.admin.quota import quota_app
from bot.core.config import QuotaLimits
from bot.core.quotas import COUNTER_NAMES, LIMITS, WINDOWS, limit_parts
from storage import UsageTotals
from storage.ledger import LEDGER_COUNTERS, QUOTA_LIMITS
from storage.tables import QuotaSetting, UsageEntry

FIELDS = list(QuotaLimits.model_fields)


def test_the_quota_table_columns_are_the_quota_limits_in_order():
    columns = [c.name for c in QuotaSetting.__table__.columns]
    assert [name for name in columns if name in QUOTA_LIMITS] == FIELDS
    assert list(QUOTA_LIMITS) == FIELDS  # storage derives its list from the table, not from bot/
    for name in FIELDS:
        column = QuotaSetting.__table__.columns[name]
        assert column.nullable, name  # NULL = the configured default


def test_every_limit_names_a_usage_counter_and_a_window():
    assert [limit_parts(name) for name in FIELDS] == [
        ("requests", "day"), ("requests", "month"), ("tokens", "day"), ("tokens", "month"), ("images", "day"),
    ]  # fmt: skip
    with pytest.raises(ValueError):
        limit_parts("pictures_per_week")
    assert all(QuotaLimits.model_fields[name].title for name in FIELDS)  # the admin tables' short column names


def test_quota_set_has_one_option_per_limit_before_config():
    command = typer.main.get_command(quota_app).commands["set"]  # type: ignore[attr-defined]
    options = [p.opts[0] for p in command.params if p.param_type_name == "option"]
    limits = ["--" + name.replace("_", "-") for name in FIELDS]
    assert options == ["--platform", "--workspace", "--user", *limits, "--config"]


def test_set_quota_accepts_exactly_the_limits(run_db):
    async def work(db):
        await db.set_quota("workspace", "slack", "T1", **dict.fromkeys(FIELDS, 7))
        with pytest.raises(ValueError, match="unknown quota field"):
            await db.set_quota("workspace", "slack", "T1", pictures_per_week=1)
        row = await db.quota_setting("workspace", "slack", "T1")
        return [getattr(row, name) for name in FIELDS]

    assert run_db(work) == [7] * len(FIELDS)


def test_the_counters_are_the_ledgers_columns_and_its_sums():
    table = UsageEntry.__table__
    columns = [c.name for c in table.columns if c.type.python_type is int and not c.primary_key and not c.foreign_keys]
    assert list(COUNTER_NAMES) == columns == list(LEDGER_COUNTERS)  # the core's list, the table, storage's sums
    assert list(UsageTotals.__dataclass_fields__) == list(COUNTER_NAMES)
    assert all(not table.columns[name].nullable for name in COUNTER_NAMES)


def test_every_limit_is_a_counter_per_window_of_the_quota_module():
    assert list(LIMITS) == FIELDS == list(QUOTA_LIMITS)  # the config model, the quota module, the table
    assert {counter for counter, _ in LIMITS.values()} <= set(COUNTER_NAMES)
    assert {window for _, window in LIMITS.values()} <= set(WINDOWS)
