"""``[web]`` in bot.toml: where the chat listens, which host names it answers and the auth proxy's header."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from adapters.shared_settings import Port, ServerSettings


class WebSettings(ServerSettings):
    """``[web]``: the local web chat, health and metrics endpoints (loopback by default)."""

    enabled: bool = True
    port: Port = 8080
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (name or name:port) the chat answers besides localhost, 127.0.0.1, [::1] and "
        "`host`: the public name behind a reverse proxy; '*' turns the check off",
    )
    user_header: str = Field(
        "",
        description="the request header a trusted auth proxy puts the signed-in user in (X-Forwarded-User); "
        "empty = every web message is the one local user",
        pattern=r"^[A-Za-z0-9-]*$",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        """A typo here would refuse every request at run time: say so when bot.toml is read."""
        for entry in hosts:
            if entry != "*" and _split_host(entry) is None:
                raise ValueError(f"{entry!r} is not a host name or name:port (e.g. chat.example.com)")
        return hosts


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` (a Host header, an allow-list entry, an Origin's netloc) as (lower-case name, port);
    ``None`` when it is not one (userinfo, a path, a bad port)."""
    value = value.strip()
    if not value or any(c in value for c in "/@?#\\ "):
        return None
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (name, port) if name else None
