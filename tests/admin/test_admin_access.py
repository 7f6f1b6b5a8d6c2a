"""``admin allow`` / ``deny`` / ``list`` / ``remove`` and role rules."""

from __future__ import annotations

from admin_helpers import Env

# ---------------------------------------------------------------------------- access rules


def test_allow_deny_list_and_remove(env: Env):
    added = env.run("allow", "user", "U1", "--platform", "slack", "--note", "pilot [b]user[/b]")
    assert added.exit_code == 0 and "Added: allow user U1 on slack" in added.output
    duplicate = env.run("allow", "user", "U1", "--platform", "slack")
    assert duplicate.exit_code == 0 and "Already there" in duplicate.output
    assert env.run("deny", "channel", "C666", "-p", "slack").exit_code == 0
    assert env.run("deny", "workspace", "G9", "-p", "discord", "--note", "abuse").exit_code == 0

    listing = env.run("list")
    assert listing.exit_code == 0
    for text in ("U1", "pilot [b]user[/b]", "C666", "G9", "abuse"):  # stored text is shown as is, not as markup
        assert text in listing.output
    slack_only = env.run("list", "--platform", "slack")
    assert "G9" not in slack_only.output and "C666" in slack_only.output

    rules = env.db(lambda db: db.rules())
    assert sorted((r.action, r.target, r.platform, r.value, r.note) for r in rules) == [
        ("allow", "user", "slack", "U1", "pilot [b]user[/b]"),
        ("deny", "channel", "slack", "C666", None),
        ("deny", "workspace", "discord", "G9", "abuse"),
    ]

    removed = env.run("allow", "user", "U1", "--platform", "slack", "--remove")
    assert removed.exit_code == 0 and "Removed allow rule for user U1" in removed.output
    missing = env.run("deny", "user", "U1", "--platform", "slack", "--remove")
    assert missing.exit_code == 0 and "There was no deny rule" in missing.output
    assert len(env.db(lambda db: db.rules())) == 2

    wrong = env.run("allow", "team", "X", "--platform", "slack")
    assert wrong.exit_code == 2
    assert env.run("deny", "user", "U2").exit_code == 2  # --platform is required

    for rule in ("channel C666 -p slack", "workspace G9 -p discord"):
        target, value, _, platform = rule.split()
        env.run("deny", target, value, "-p", platform, "--remove")
    assert "No access rules" in env.run("list").output


def test_role_rules_add_list_and_remove(env: Env):
    added = env.run("allow", "role", "1122334455", "--platform", "discord", "--note", "ML team")
    assert added.exit_code == 0 and "Added: allow role 1122334455 on discord" in added.output
    assert "Already there" in env.run("allow", "role", "1122334455", "-p", "discord").output
    assert env.run("deny", "role", "9988776655", "-p", "discord", "--note", "Muted").exit_code == 0
    listing = env.run("list", "--platform", "discord")
    assert listing.exit_code == 0
    for text in ("role", "1122334455", "ML team", "9988776655", "Muted"):
        assert text in listing.output
    rules = env.db(lambda db: db.rules("discord"))
    assert sorted((r.action, r.target, r.value, r.note) for r in rules) == [
        ("allow", "role", "1122334455", "ML team"),
        ("deny", "role", "9988776655", "Muted"),
    ]

    removed = env.run("deny", "role", "9988776655", "-p", "discord", "--remove")
    assert removed.exit_code == 0 and "Removed deny rule for role 9988776655 on discord" in removed.output
    assert [(r.action, r.value) for r in env.db(lambda db: db.rules())] == [("allow", "1122334455")]

    help_text = " ".join(env.run("allow", "--help").output.replace("│", " ").split())  # unwrapped
    assert "workspace|role" in help_text and "Copy Role ID" in help_text and "DMs have no roles" in help_text

    wrong = env.run("deny", "group", "42", "-p", "discord")
    assert wrong.exit_code == 2
    assert "'group' is not one of" in wrong.output and "'role'" in wrong.output
    assert len(env.db(lambda db: db.rules())) == 1
