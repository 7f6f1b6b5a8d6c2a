"""What the ``storage.Database`` tests (test_db.py, test_db_accounting.py) share: a thread, usage rows, and
an admitted reservation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bot.core.requests import ThreadRef
from storage import Database, UsageTotals

KEY = ThreadRef("slack", "T1", "C1", "1700000000.0001")
NOW = datetime.now(UTC)  # only ever compared relative to itself


def usage(user: str = "U1", workspace: str = "T1", platform: str = "slack", **values: Any) -> dict[str, Any]:
    """The keyword arguments of ``Database.record_usage`` for one user (``values``: at, tokens, images …)."""
    return {"platform": platform, "workspace": workspace, "user_id": user, **values}


async def reserve(db: Database, user: str = "U1", workspace: str = "T1", images: int = 0) -> int:
    """A request's usage reservation, admitted with no quota check."""
    async with db.admission("slack", workspace, user, UsageTotals(requests=1, images=images)) as admission:
        pass
    return admission.usage_id
