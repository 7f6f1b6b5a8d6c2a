"""The plugin registry: front ends and generation backends are found by name through entry points.

Entry points are the Python convention for plugins: a package declares, in its ``pyproject.toml``,

.. code-block:: toml

    [project.entry-points."minigpt4_bot.frontends"]
    discord = "my_package.discord:FRONT_END"        # a bot.core.frontend_api.FrontEndPlugin

    [project.entry-points."minigpt4_bot.backends"]
    ray = "my_package.ray_backend:BACKEND"           # a bot.core.backend_api.BackendPlugin

and ``bot.toml`` enables it by name (``[discord] enabled = true``, ``[engine] backend = "ray"``).  The
core never names a platform or a backend: it lists the names here and loads a plugin only when its
table or name is used, so a missing optional dependency only matters to whoever enables it.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

__all__ = ["BACKENDS", "FRONTENDS", "UnknownPlugin", "load_plugin", "plugin_names"]

FRONTENDS = "minigpt4_bot.frontends"
BACKENDS = "minigpt4_bot.backends"
_KINDS = {FRONTENDS: "front end", BACKENDS: "generation backend"}


class UnknownPlugin(LookupError):
    """No plugin of that name is installed; the message lists the ones that are."""


@functools.cache
def plugin_names(group: str) -> tuple[str, ...]:
    """The registered names in ``group``, sorted (reading metadata only: nothing is imported)."""
    return tuple(sorted({ep.name for ep in entry_points(group=group)}))


@functools.cache
def load_plugin(group: str, name: str) -> Any:
    """Import and return the object registered as ``name`` in ``group``."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        known = ", ".join(plugin_names(group)) or "none"
        raise UnknownPlugin(f"no {_KINDS.get(group, group)} named {name!r} is installed (installed: {known})")
    plugin = found[0].load()
    if getattr(plugin, "name", name) != name:
        raise UnknownPlugin(f"entry point {name!r} in {group} loads a plugin named {plugin.name!r}")
    return plugin
