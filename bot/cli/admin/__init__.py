"""``minigpt4-bot admin …``: quotas, usage reports, access rules, conversations and the database schema.

Every command works on the configured database (``[database] url`` in bot.toml, overridden by
``$MINIGPT4_BOT_DATABASE_URL``; SQLite ``<data_dir>/minigpt4-bot.db`` by default) — SQLite or
PostgreSQL alike.  Tables go to the terminal; ``--format csv|json`` output is plain text on stdout
for scripts.  Database problems (bad URL, server down, schema missing) print one clear line on
stderr and exit with status 1.

One module per job: :mod:`.quota`, :mod:`.usage`, :mod:`.access`, :mod:`.conversations`,
:mod:`.db`, :mod:`.keys`; the shared plumbing is in :mod:`._common`, and the reports themselves come from
:mod:`bot.core.reports`.  This module only assembles the command tree.
"""

from __future__ import annotations

import typer

from bot.cli.admin.access import ACTIONS, list_rules, rule_command
from bot.cli.admin.conversations import conversations_app
from bot.cli.admin.db import db_app
from bot.cli.admin.keys import keys_app
from bot.cli.admin.quota import quota_app
from bot.cli.admin.usage import usage

__all__ = ["admin_app"]

admin_app = typer.Typer(
    help="Administer the bot's database: quotas, usage, access rules, conversations, API keys, schema.",
    no_args_is_help=True,
)
admin_app.add_typer(quota_app, name="quota")
admin_app.command("usage")(usage)
for _action in ACTIONS:
    admin_app.command(_action)(rule_command(_action))
admin_app.command("list")(list_rules)
admin_app.add_typer(conversations_app, name="conversations")
admin_app.add_typer(db_app, name="db")
admin_app.add_typer(keys_app, name="keys")
