"""One list of quota limits: ``QuotaLimits``' fields.  The table, the checks and the admin options follow it."""

from __future__ import annotations

import pytest
import typer

from bot.cli.admin.quota import quota_app
from bot.core.config import QuotaLimits
from bot.core.quotas import limit_parts
from storage.db import QUOTA_LIMITS
from storage.tables import QuotaSetting

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
