"""``bot.toml``: typed, validated configuration with one clear error per bad field.

The defaults here equal the documented ``bot.toml`` in the repository root (a test loads
that file and compares).  Secrets never live in this file: they come from the
environment.  Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.core.backend_api import BackendSettings
from bot.core.frontend_api import FrontEndSettings
from bot.core.plugins import BACKENDS, FRONTENDS, load_plugin, plugin_names
from model.settings import ModelSettings
from storage.url import (
    DATABASE_URL_ENV,
    DatabaseURLError,
    effective_database_url,
    has_password,
    hide_password,
    resolve_sqlite_path,
)
from storage.url import normalize_database_url as _normalize

__all__ = [
    "DATABASE_URL_ENV",
    "ConfigError",
    "DatabaseSettings",
    "EngineSettings",
    "GenerationSettings",
    "GroundingSettings",
    "ModelSettings",
    "RenderSettings",
    "Settings",
    "find_config",
    "load_settings",
]

CONFIG_ENV = "MINIGPT4_BOT_CONFIG"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationSettings(_Strict):
    """``[generation]``: answer defaults (the reference ``Chat`` defaults)."""

    max_new_tokens: int = Field(300, ge=1, le=8192)
    do_sample: bool = True
    num_beams: int = Field(1, ge=1, le=10)
    temperature: float = Field(1.0, gt=0, le=5)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.05, gt=0, le=10)
    min_length: int = Field(1, ge=0)
    max_length: int = Field(2000, ge=2)


class EngineSettings(_Strict):
    """``[engine]``: which generation backend answers, and the shared engine's limits.

    The limits are the engine's own configuration (``SchedulerConfig`` and ``EngineConfig`` take them by
    name, no field-by-field copy); a test keeps the names in step.
    """

    backend: str = Field("local", description="a registered generation backend (entry point minigpt4_bot.backends)")
    max_batch: int = Field(16, ge=1, le=512)
    max_prefills_per_step: int = Field(4, ge=1)
    max_queue: int = Field(256, ge=1)
    max_queued_per_user: int = Field(8, ge=1)
    max_running_per_user: int = Field(4, ge=1)
    max_wait_s: float = Field(30.0, gt=0)
    kv_budget_tokens: int = Field(65536, ge=256)
    image_cache_size: int = Field(256, ge=0)
    prefix_reuse: bool = True
    threads: int = Field(0, ge=0, le=1024)  # torch intra-op threads; 0 = usable cores - 1 (affinity, cgroup quota)
    request_timeout_s: float = Field(300.0, gt=0)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        installed = plugin_names(BACKENDS)
        if value not in installed:
            raise ValueError(f"no generation backend {value!r} is installed (installed: {', '.join(installed)})")
        return value


DEFAULT_PRESETS: dict[str, str] = {
    "describe": "Describe this image in detail.",
    "story": "Write a short story inspired by this image.",
    "poem": "Write a poem inspired by this image.",
    "recipe": "What can I cook with the food in this picture? Give a recipe with ingredients and steps.",
    "website": (
        "Write the HTML for the web page drawn in this hand-drawn sketch. "
        "Answer with the complete page in a single ```html code block."
    ),
    "solve": "Solve the problem shown in this picture. Explain each step.",
}


class PresetOverride(_Strict):
    """A preset prompt that differs in one workspace (and optionally one channel)."""

    name: str
    prompt: str
    workspace: str = ""
    channel: str = ""


class PresetSettings(_Strict):
    """``[presets]``: named prompts users can pick ("recipe", "poem" …)."""

    default: str = "describe"  # used when a picture arrives without a question
    prompts: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PRESETS))
    overrides: list[PresetOverride] = Field(default_factory=list)


class QuotaLimits(_Strict):
    """Limits for one scope; 0 means unlimited.

    The one list of quota limits (:data:`bot.core.quotas.LIMITS` is read from these fields): the quota
    checks, the admin commands' options and columns, and a test against the ``quota_settings`` table all
    follow them.  Each name is ``<counter>_per_<window>`` of :mod:`bot.core.quotas`' counters and windows
    (checked when that module is imported); the title is the short column name in admin tables.
    """

    requests_per_day: int = Field(0, ge=0, title="req/day")
    requests_per_month: int = Field(0, ge=0, title="req/month")
    tokens_per_day: int = Field(0, ge=0, title="tok/day")
    tokens_per_month: int = Field(0, ge=0, title="tok/month")
    images_per_day: int = Field(0, ge=0, title="img/day")


class QuotaSettings(_Strict):
    """``[quotas.user]`` / ``[quotas.workspace]``: defaults; ``minigpt4-bot admin quota set`` overrides them."""

    user: QuotaLimits = Field(default_factory=lambda: QuotaLimits(requests_per_day=200, images_per_day=100))
    workspace: QuotaLimits = Field(default_factory=QuotaLimits)


class ImageSettings(_Strict):
    """``[images]``: what pictures the bot accepts."""

    max_bytes: int = Field(20 * 2**20, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1)
    max_per_message: int = Field(4, ge=1)


class RenderSettings(_Strict):
    """``[render]``: previews of ``website`` answers, rendered in a sandboxed headless Chromium."""

    enabled: bool = True
    chromium_path: str = Field("", description="empty = chromium / chromium-browser / google-chrome on PATH")
    timeout_s: float = Field(15.0, gt=0, le=300)
    max_concurrent: int = Field(2, ge=1, le=32)
    max_html_bytes: int = Field(512 * 1024, ge=1024)
    max_height_px: int = Field(4000, ge=800, le=32000)


class GroundingSettings(_Strict):
    """``[grounding]``: boxes in an answer (MiniGPT-v2's grounding tasks) drawn on the user's picture."""

    enabled: bool = True
    long_side: int = Field(800, ge=128, le=4096, description="the annotated picture's long side, in pixels")


class DatabaseSettings(_Strict):
    """``[database]``: where conversations, usage and quotas live."""

    url: str = Field("", description="empty = SQLite file <data_dir>/minigpt4-bot.db")
    event_retention_days: int = Field(
        7, ge=1, description="how long platform event ids are kept to drop redeliveries (pruned daily)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value:
            return value
        _normalize(value)  # a DatabaseURLError (a ValueError) names what is accepted
        if has_password(value):
            raise ValueError(f"passwords do not belong in bot.toml: set {DATABASE_URL_ENV} in the environment instead")
        return value


class Settings(_Strict):
    """The whole ``bot.toml``.

    Besides the core's tables, each installed front end and generation backend (``bot.core.plugins``)
    owns one table named after it (``[web]``, ``[slack]``, ``[ray]`` …), validated by the plugin's own
    settings model: read it with :meth:`frontend` / :meth:`backend`.  Any other table is an error
    (reported by :func:`load_settings`).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    data_dir: str = "data"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text = rich on a terminal, else one line per record; json = one JSON object per line"
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    presets: PresetSettings = Field(default_factory=PresetSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    render: RenderSettings = Field(default_factory=RenderSettings)
    grounding: GroundingSettings = Field(default_factory=GroundingSettings)

    def frontend(self, name: str) -> FrontEndSettings[Any]:
        """The validated ``[name]`` table of an installed front end (its defaults when absent)."""
        return self._plugin_table(FRONTENDS, name)

    def backend(self, name: str | None = None) -> BackendSettings:
        """The validated table of an installed backend (default: ``[engine] backend``), defaults when absent."""
        return self._plugin_table(BACKENDS, name or self.engine.backend)

    def _plugin_table(self, group: str, name: str) -> Any:
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        value = extra.get(name)
        model = load_plugin(group, name).settings
        if isinstance(value, model):
            return value
        try:
            validated = model.model_validate(value or {})
        except ValidationError as exc:
            raise ConfigError(_format_errors(None, exc, prefix=name)) from None
        extra[name] = validated
        if self.__pydantic_extra__ is None:
            object.__setattr__(self, "__pydantic_extra__", extra)
        return validated

    @property
    def demo_weights_dir(self) -> Path:
        return Path(self.data_dir) / "demo-weights" / self.model.variant

    def database_url(self) -> str:
        """The effective async database URL: ``$MINIGPT4_BOT_DATABASE_URL``, else ``[database] url``,
        else the SQLite file ``<data_dir>/minigpt4-bot.db``.  Raises :class:`ConfigError` for a bad URL."""
        try:
            return effective_database_url(self.database.url, self.data_dir)
        except DatabaseURLError as exc:
            raise ConfigError(str(exc)) from None


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``--config`` if given, else ``$MINIGPT4_BOT_CONFIG``, else ``./bot.toml`` if it exists."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    default = Path("bot.toml")
    return default if default.is_file() else None


def _error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"])) or "(top level)"
        shown = hide_password(err["input"]) if isinstance(err.get("input"), str) else err.get("input")
        got = f" (got {shown!r})" if err["type"] != "missing" and "input" in err else ""
        lines.append(f"  {loc}: {err['msg']}{got}")
    return lines


def _format_errors(path: Path | None, exc: ValidationError | list[str], prefix: str = "") -> str:
    where = str(path) if path else "configuration"
    lines = exc if isinstance(exc, list) else _error_lines(exc, prefix)
    return "\n".join([f"{where}: {len(lines)} invalid setting(s)", *lines])


def _validate(data: dict[str, Any], path: Path | None) -> Settings:
    """The core's tables and every front end's and backend's table, all problems reported together."""
    lines: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines += _error_lines(exc)
    tables: dict[str, BaseModel] = {}
    frontends, backends = plugin_names(FRONTENDS), plugin_names(BACKENDS)
    for name in sorted(data.keys() - Settings.model_fields.keys()):
        group = FRONTENDS if name in frontends else BACKENDS if name in backends else None
        if group is None:
            lines.append(
                f"  {name}: unknown table or setting (front ends installed: {', '.join(frontends)}; "
                f"backends installed: {', '.join(backends)})"
            )
            continue
        try:
            tables[name] = load_plugin(group, name).settings.model_validate(data[name])
        except ValidationError as exc:
            lines += _error_lines(exc, name)
    if lines or settings is None:
        raise ConfigError(_format_errors(path, lines))
    for name, table in tables.items():
        settings.__pydantic_extra__[name] = table  # type: ignore[index]
    return settings


_PATH_KEYS = ("llm", "vit", "qformer", "projection")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the configuration (defaults if no file is found)."""
    config_path = find_config(path)
    data: dict[str, Any] = {}
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    settings = _validate(data, config_path)
    base = config_path.parent if config_path is not None else Path.cwd()
    for key in _PATH_KEYS:
        value = getattr(settings.model, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(settings.model, key, str(base / value))
    if not Path(settings.data_dir).expanduser().is_absolute():
        settings.data_dir = str(base / settings.data_dir)
    settings.database.url = resolve_sqlite_path(settings.database.url, base)
    return settings
