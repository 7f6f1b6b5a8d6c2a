"""bot.toml is documented, validated, and its defaults equal the code's defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bot.core.config import ConfigError, Settings, load_settings
from bot.core.plugins import BACKENDS, FRONTENDS, load_plugin, plugin_names

ROOT = Path(__file__).resolve().parents[1]


def config_errors(path: Path, text: str, count: int, where: tuple[str, ...]) -> str:
    """Load ``text`` as bot.toml at ``path``: one ConfigError that counts ``count`` problems and names each
    of ``where`` (every bad value is reported at once, not the first only)."""
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"{count} invalid setting(s)" in message
    for name in where:
        assert name in message, name
    return message


def test_documented_bot_toml_equals_code_defaults():
    documented = load_settings(ROOT / "bot.toml")
    default = Settings()
    for name in Settings.model_fields:
        if name != "data_dir":  # load_settings resolves it against the file's folder
            assert getattr(documented, name) == getattr(default, name), name
    # Every installed front end's table is documented, with its defaults.
    tables = tomllib.loads((ROOT / "bot.toml").read_text())
    for name in plugin_names(FRONTENDS):
        assert name in tables, f"[{name}] is not documented in bot.toml"
        assert documented.frontend(name) == default.frontend(name), name
    # So is every installed backend's table that has settings.
    for name in plugin_names(BACKENDS):
        if load_plugin(BACKENDS, name).settings.model_fields:
            assert name in tables, f"[{name}] is not documented in bot.toml"
            assert documented.backend(name) == default.backend(name), name


def test_backend_tables_are_validated_by_their_backend_with_the_other_errors(tmp_path):
    """A backend owns its table like a front end: the core has no [ray] of its own, yet a bad [ray] value
    is reported in the same message as a bad core or front-end value."""
    assert "ray" not in Settings.model_fields
    path = tmp_path / "bot.toml"
    text = '[ray]\nnum_gpus = -1\nbogus = 1\n[web]\nport = 99999\n[model]\ndtype = "float64"\n[rey]\nx = 1\n'
    where = ("ray.num_gpus", "ray.bogus", "web.port", "model.dtype", "rey: unknown table")
    message = config_errors(path, text, 5, where)
    assert "backends installed: local, " in message
    path.write_text('[engine]\nbackend = "ray"\n[ray]\nreplicas = 3\n')
    settings = load_settings(path)
    assert settings.backend().replicas == 3 and settings.backend("ray") is settings.backend()
    assert load_settings(None).backend("ray").replicas == 1  # defaults when the table is absent
    assert type(load_settings(None).backend()).model_fields == {}  # local: no table of its own


def test_front_end_tables_are_validated_by_their_front_end(tmp_path):
    text = '[web]\nport = 99999\nbogus = 1\n[webb]\nenabled = true\n[model]\ndtype = "float64"\n'
    config_errors(tmp_path / "bot.toml", text, 4, ("web.port", "web.bogus", "webb: unknown table", "model.dtype"))
    assert load_settings(None).frontend("web").port == 8080


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param(
            '[engine]\nbackend = "quantum"\n',
            r"engine\.backend: .*no generation backend 'quantum'.*installed: local",
            id="the_engine_backend_must_be_installed",
        ),
        pytest.param(
            "[generation]\ntop_p = 1.5\nnum_beams = 0\n",
            r"generation\.top_p.*\n.*generation\.num_beams|generation\.num_beams",
            id="generation_ranges_are_validated",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(tmp_path, text: str, match: str):
    path = tmp_path / "bot.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(path)


def test_defaults_start_on_demo_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIGPT4_BOT_CONFIG", raising=False)
    settings = load_settings()
    assert settings.model.uses_demo_weights
    assert settings.demo_weights_dir == tmp_path / "data" / "demo-weights" / "vicuna0"


def test_every_bad_field_is_reported(tmp_path):
    text = '[model]\ndtype = "float64"\nquantization = "int3"\ndevice = "gpu0"\ncolour = 1\n'
    fields = ("model.dtype", "model.quantization", "model.device", "model.colour")
    message = config_errors(tmp_path / "bot.toml", text, 4, fields)
    assert "'float64'" in message


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "bot.toml").write_text('[model]\nllm = "weights/vicuna"\nvit = "/abs/eva.pth"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(folder / "bot.toml")
    assert settings.model.llm == str(folder / "weights/vicuna")
    assert settings.model.vit == "/abs/eva.pth"
    assert not settings.model.uses_demo_weights


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bot.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_config_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text('[model]\nvariant = "llama2"\n')
    monkeypatch.setenv("MINIGPT4_BOT_CONFIG", str(path))
    assert load_settings().model.variant == "llama2"


def test_loader_kwargs_cast_size_tables():
    settings = Settings.model_validate(
        {"model": {"vision": {"img_size": 56.0, "layer_norm_eps": 1e-6}, "qformer_dims": {"hidden": 32}}}
    )
    kwargs = settings.model.loader_kwargs()
    assert kwargs["vision"] == {"img_size": 56, "layer_norm_eps": 1e-6}
    assert isinstance(kwargs["vision"]["img_size"], int)
    assert kwargs["qformer_dims"] == {"hidden": 32}
    ratio = Settings.model_validate({"model": {"vision": {"mlp_ratio": 4.3637, "depth": 2.0}}}).model.loader_kwargs()
    assert ratio["vision"] == {"mlp_ratio": 4.3637, "depth": 2}  # ViT-g's ratio is not rounded to 4
    assert kwargs["qformer"] is None
