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

__all__ = [
    "DATABASE_URL_ENV",
    "ConfigError",
    "DatabaseSettings",
    "EngineSettings",
    "GenerationSettings",
    "ModelSettings",
    "Settings",
    "SlackSettings",
    "find_config",
    "load_settings",
    "normalize_database_url",
]

CONFIG_ENV = "MINIGPT4_BOT_CONFIG"
DATABASE_URL_ENV = "MINIGPT4_BOT_DATABASE_URL"
SQLITE_FILE = "minigpt4-bot.db"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Strict):
    """``[model]``: which weights to load and how (paths to the original published files)."""

    variant: Literal["vicuna0", "llama2", "minigptv2"] = "vicuna0"
    llm: str = Field("", description="HF LLaMA/Vicuna directory; empty = demo weights")
    vit: str = Field("", description="LAVIS eva_vit_g.pth")
    qformer: str = Field("", description="BLIP-2 blip2_pretrained_flant5xxl.pth (vicuna0 only)")
    projection: str = Field("", description="stage-2 checkpoint (pretrained_minigpt4*.pth / MiniGPT-v2)")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "int8", "nf4"] = "none"
    vision: dict[str, float] | None = None
    qformer_dims: dict[str, float] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("use auto, cpu, cuda or cuda:N")

    @property
    def uses_demo_weights(self) -> bool:
        """No real weights configured: the bot starts on tiny random demo weights."""
        return not (self.llm or self.vit or self.projection)

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.load_minigpt4`` (paths as given, already resolved)."""
        ints = {k: (v if "eps" in k else int(v)) for k, v in (self.vision or {}).items()}
        qints = {k: (v if "eps" in k else int(v)) for k, v in (self.qformer_dims or {}).items()}
        return dict(
            variant=self.variant,
            llm=self.llm,
            vit=self.vit,
            qformer=self.qformer or None,
            projection=self.projection,
            device=self.device,
            dtype=self.dtype,
            quantization=self.quantization,
            vision=ints or None,
            qformer_dims=qints or None,
        )


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
    """``[engine]``: the shared inference engine's limits (continuous batching, caches, backpressure)."""

    max_batch: int = Field(16, ge=1, le=512)
    max_prefills_per_step: int = Field(4, ge=1)
    max_queue: int = Field(256, ge=1)
    max_queued_per_user: int = Field(8, ge=1)
    max_running_per_user: int = Field(4, ge=1)
    max_wait_s: float = Field(30.0, gt=0)
    kv_budget_tokens: int = Field(65536, ge=256)
    image_cache_size: int = Field(256, ge=0)
    prefix_reuse: bool = True
    request_timeout_s: float = Field(300.0, gt=0)


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
    """Limits for one scope; 0 means unlimited."""

    requests_per_day: int = Field(0, ge=0)
    requests_per_month: int = Field(0, ge=0)
    tokens_per_day: int = Field(0, ge=0)
    tokens_per_month: int = Field(0, ge=0)
    images_per_day: int = Field(0, ge=0)


class QuotaSettings(_Strict):
    """``[quotas.user]`` / ``[quotas.workspace]``: defaults; ``minigpt4-bot admin quota set`` overrides them."""

    user: QuotaLimits = Field(default_factory=lambda: QuotaLimits(requests_per_day=200, images_per_day=100))
    workspace: QuotaLimits = Field(default_factory=QuotaLimits)


class ImageSettings(_Strict):
    """``[images]``: what pictures the bot accepts."""

    max_bytes: int = Field(20 * 2**20, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1)
    max_per_message: int = Field(4, ge=1)


class WebSettings(_Strict):
    """``[web]``: the local web chat, health and metrics endpoints (loopback by default)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class SlackSettings(_Strict):
    """``[slack]``: the Slack front end (tokens come from the environment, never from this file)."""

    enabled: bool = False
    mode: Literal["socket", "http"] = "socket"
    api_url: str = "https://slack.com/api/"
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=0, le=65535)
    slash_command: str = "/minigpt4"
    max_image_bytes: int = Field(0, ge=0, description="0 = [images] max_bytes")
    update_interval_s: float = Field(1.0, ge=0)
    updates_per_minute: int = Field(45, ge=1, le=1000)
    max_message_chars: int = Field(3500, ge=200, le=4000)

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "use the Web API base URL, e.g. https://slack.com/api/ (GovSlack: https://slack-gov.com/api/)"
            )
        return value if value.endswith("/") else value + "/"

    @field_validator("slash_command")
    @classmethod
    def _slash_command(cls, value: str) -> str:
        if not value.startswith("/") or len(value) < 2 or any(c.isspace() or c.isupper() for c in value):
            raise ValueError("a slash command is '/' and a lowercase name without spaces, e.g. /minigpt4")
        return value


def normalize_database_url(url: str) -> str:
    """The async-driver form of a database URL (``postgresql://`` → asyncpg, ``sqlite:///`` → aiosqlite).

    Raises :class:`ConfigError` for anything that is not an SQLite or PostgreSQL URL.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ConfigError(f"not a database URL: {_hide_password(url)!r} (use sqlite:///PATH or postgresql://HOST/DB)")
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return f"postgresql+asyncpg://{rest}"
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise ConfigError(
        f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB "
        "(the bot uses the aiosqlite and asyncpg drivers)"
    )


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if sep and at and ":" in credentials:
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


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
        try:
            normalize_database_url(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        credentials = value.partition("://")[2].rpartition("@")[0]
        if ":" in credentials:
            raise ValueError(f"passwords do not belong in bot.toml: set {DATABASE_URL_ENV} in the environment instead")
        return value


class Settings(_Strict):
    """The whole ``bot.toml``."""

    data_dir: str = "data"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    presets: PresetSettings = Field(default_factory=PresetSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)

    @property
    def demo_weights_dir(self) -> Path:
        return Path(self.data_dir) / "demo-weights" / self.model.variant

    def database_url(self) -> str:
        """The effective async database URL: ``$MINIGPT4_BOT_DATABASE_URL``, else ``[database] url``,
        else the SQLite file ``<data_dir>/minigpt4-bot.db``.  Raises :class:`ConfigError` for a bad URL."""
        url = os.environ.get(DATABASE_URL_ENV, "").strip() or self.database.url
        if not url:
            return f"sqlite+aiosqlite:///{Path(self.data_dir).expanduser() / SQLITE_FILE}"
        return normalize_database_url(url)


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``--config`` if given, else ``$MINIGPT4_BOT_CONFIG``, else ``./bot.toml`` if it exists."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    default = Path("bot.toml")
    return default if default.is_file() else None


def _format_errors(path: Path | None, exc: ValidationError) -> str:
    where = str(path) if path else "configuration"
    lines = [f"{where}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        shown = _hide_password(err["input"]) if isinstance(err.get("input"), str) else err.get("input")
        got = f" (got {shown!r})" if err["type"] != "missing" and "input" in err else ""
        lines.append(f"  {loc}: {err['msg']}{got}")
    return "\n".join(lines)


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
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(config_path, exc)) from None
    base = config_path.parent if config_path is not None else Path.cwd()
    for key in _PATH_KEYS:
        value = getattr(settings.model, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(settings.model, key, str(base / value))
    if not Path(settings.data_dir).expanduser().is_absolute():
        settings.data_dir = str(base / settings.data_dir)
    settings.database.url = _resolve_sqlite_path(settings.database.url, base)
    return settings


def _resolve_sqlite_path(url: str, base: Path) -> str:
    """``sqlite:///relative.db`` in bot.toml is relative to the file's folder, like every other path."""
    scheme, sep, path = url.partition(":///")
    if not sep or not scheme.lower().startswith("sqlite") or not path or path.startswith(":memory:"):
        return url
    if Path(path).expanduser().is_absolute():
        return url
    return f"{scheme}:///{base / path}"
