"""The deployable package, checked statically (images cannot be built here: no registry access for base images).

The Dockerfile: CPU and CUDA variants from one file (the torch index is a build argument), weights mounted
(not copied), a non-root user, a healthcheck on ``/healthz``, and an embedded default ``bot.toml`` that the
real loader accepts.  The compose file: bot + PostgreSQL (+ the optional Ray head), migrations once before
the bots, passwords from the environment, and embedded configs that load.  The ``ray`` extra and entry point.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web

from bot.core.config import load_settings
from bot.core.plugins import BACKENDS, plugin_names

ROOT = Path(__file__).resolve().parents[2]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, heredoc bodies skipped."""
    found: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        word, _, rest = line.strip().partition(" ")
        found.append((word.upper(), rest.strip()))
        if match := re.search(r"<<'?(\w+)'?", rest):
            for body in lines:
                if body == match.group(1):
                    break
    return found


def _heredoc(text: str, target: str) -> str:
    match = re.search(rf"COPY <<'?EOF'? {re.escape(target)}\n(.*?)\nEOF\n", text, re.S)
    assert match, f"no embedded {target}"
    return match.group(1)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_scale_dockerfile_runs_as_non_root_with_a_healthcheck_and_mounted_weights(dockerfile: str) -> None:
    steps = _instructions(dockerfile)
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]  # the runtime stage
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")  # numeric, so runAsNonRoot can verify it
    assert users[-1].split(":")[0].isdigit()
    uid = users[-1].split(":")[0]  # that uid exists and owns the state volume (SQLite, demo weights, files)
    (created,) = [rest for word, rest in final if word == "RUN" and "useradd" in rest]
    assert f"--uid {uid}" in created and re.search(r"chown \S+ /var/lib/minigpt4-bot", created)
    assert ("VOLUME", '["/var/lib/minigpt4-bot"]') in final
    assert final.index(("USER", users[-1])) < [w for w, _ in final].index("ENTRYPOINT")  # Chromium: not root
    (check,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "/healthz" in check and "--start-period=" in check  # liveness, after model loading
    assert "8080" in check and ("EXPOSE", "8080") in final
    assert not any(word in ("ADD", "COPY") and "weights" in rest for word, rest in steps)  # weights are mounted
    assert "/weights" in dockerfile and any(word == "VOLUME" for word, _ in final)
    assert any(word == "ENTRYPOINT" and "tini" in rest for word, rest in final)  # signals reach serve


def test_scale_dockerfile_has_cpu_and_cuda_variants_and_installs_the_ray_extra(dockerfile: str) -> None:
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') for word, rest in _instructions(dockerfile)
            if word == "ARG" and "=" in rest}  # fmt: skip
    assert args["TORCH_INDEX"].endswith("/whl/cpu")  # CPU by default; the header shows the cu128 build
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128" in dockerfile
    assert "ray" in args["EXTRAS"].split(",")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert args["TORCH_SPEC"] in setup  # the same torch as the tested one


def test_scale_the_image_s_default_config_loads(dockerfile: str, tmp_path: Path) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(_heredoc(dockerfile, "/etc/minigpt4-bot/bot.toml"))
    settings = load_settings(config)
    assert settings.data_dir == "/var/lib/minigpt4-bot" and settings.frontend("web").host == "0.0.0.0"
    assert settings.frontend("web").port == 8080 and not settings.frontend("terminal").enabled


def test_scale_compose_runs_the_bot_on_postgresql_with_an_optional_ray_head(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    assert {"postgres", "migrate", "bot", "ray-head", "bot-ray"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:") and "healthcheck" in services["postgres"]
    for name in ("bot", "bot-ray"):
        bot = services[name]
        assert bot["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        url = bot["environment"]["MINIGPT4_BOT_DATABASE_URL"]
        assert url.startswith("postgresql://") and "${POSTGRES_PASSWORD" in url  # from the environment
        assert any(v.endswith(":/weights:ro") for v in bot["volumes"])  # weights mounted read-only
    assert services["migrate"]["command"] == ["admin", "db", "upgrade"]
    assert services["ray-head"]["profiles"] == ["ray"] and services["bot-ray"]["profiles"] == ["ray"]
    assert "profiles" not in services["bot"]  # the plain bot starts by default
    assert "--head" in services["ray-head"]["command"]
    assert services["bot-ray"]["depends_on"]["ray-head"] == {"condition": "service_healthy"}

    configs = {}
    for name, config in compose["configs"].items():  # the embedded bot.toml files load as they are
        path = tmp_path / f"{name}.toml"
        path.write_text(config["content"])
        configs[name] = load_settings(path)
    assert configs["bot-local"].engine.backend == "local"
    assert configs["bot-ray"].engine.backend == "ray" and configs["bot-ray"].backend().address == "auto"
    for name in ("bot", "bot-ray"):
        (mounted,) = services[name]["configs"]
        assert mounted["target"] == "/etc/minigpt4-bot/bot.toml"  # where MINIGPT4_BOT_CONFIG points
    assert "MINIGPT4_BOT_CONFIG=/etc/minigpt4-bot/bot.toml" in (ROOT / "Dockerfile").read_text()


def test_scale_the_ray_extra_and_backend_entry_point_are_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    ray = [r for r in extras["ray"] if r.startswith("ray[serve]")]
    assert ray and ray[0] in extras["dev"]  # CI (setup.sh --dev) runs the Ray tests
    assert project["entry-points"]["minigpt4_bot.backends"]["ray"] == "bot.cli.ray_backend:RAY"
    assert "ray" in plugin_names(BACKENDS)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "weights", ".env"} <= set(ignored)


def test_scale_ray_settings_are_validated(tmp_path: Path) -> None:
    from bot.core.config import ConfigError

    path = tmp_path / "bot.toml"
    path.write_text('[ray]\naddress = "ray://head:10001"\nnum_gpus = -1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "2 invalid setting(s)" in message and "ray.address: " in message and "cannot stream" in message
    assert "ray.num_gpus" in message
    path.write_text("[ray]\nmin_replicas = 3\nmax_replicas = 2\n")
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) is above max_replicas \(2\)"):
        load_settings(path)


def test_scale_the_local_backend_needs_no_ray(tmp_path: Path) -> None:
    """Choosing a backend imports only that one: the core, the CLI and the local backend load no Ray."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import bot.cli.main, bot.cli.serve, bot.cli.backends, bot.cli.ray_backend, bot.core.config\n"
        "from bot.core.plugins import BACKENDS, load_plugin\n"
        "load_plugin(BACKENDS, 'local'); load_plugin(BACKENDS, 'ray')\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


RAY_PORTS = {6379, 8265, 10001, 52365, 8076, 8077, 8078, 8000, 9000}  # GCS, dashboard, client, agent, internals
"""Ports Ray listens on by default (``ray start --help``): none of them may leave the compose network."""


def _published(service: dict[str, Any]) -> list[int]:
    """The container ports a service publishes on the host (short ``[IP:]HOST:CONTAINER`` or long syntax)."""
    ports = []
    for entry in service.get("ports", []):
        target = entry.get("target") if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1].split("/")[0]
        ports.append(int(target))
    return ports


def test_scale_compose_publishes_only_the_web_chat_and_keeps_ray_s_dashboard_on_loopback(
    compose: dict[str, Any],
) -> None:
    """Ray has no authentication (its Jobs API runs whatever it is sent): issue 26, item 12."""
    services = compose["services"]
    published = {name: _published(service) for name, service in services.items() if _published(service)}
    assert published == {"bot": [8080]}  # the web chat; no Ray port, no PostgreSQL
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would put every port on the host"
        assert not RAY_PORTS & {int(str(p).split("/")[0]) for p in service.get("expose", [])}, name
        command = " ".join(map(str, service.get("command", [])))
        hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
        assert all(host in ("127.0.0.1", "localhost", "::1") for host in hosts), f"{name}: dashboard on {hosts}"
        if "ray start" in command.replace('"', "") and "--head" in command:
            assert hosts or "--include-dashboard=false" in command, f"{name}: say where the dashboard listens"


def test_scale_the_dashboard_forwarder_reaches_a_loopback_only_server() -> None:
    """scripts/ray_dashboard.py, the documented way in: a real HTTP server on loopback stands in for the
    dashboard, and the bridge runs under this Python instead of ``docker compose exec -T ray-head python``."""
    spec = importlib.util.spec_from_file_location("ray_dashboard", ROOT / "scripts" / "ray_dashboard.py")
    forwarder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forwarder)
    assert forwarder.bridge_command(forwarder.DEFAULT_EXEC)[:5] == ["docker", "compose", "exec", "-T", "ray-head"]

    async def main() -> None:
        page = "x" * 300_000  # larger than one pipe buffer, both ways
        app = web.Application()
        app.router.add_post("/api/jobs/", _echo)
        app.router.add_get("/", lambda _: _page(page))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        dashboard = runner.addresses[0][1]
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        command = [sys.executable, "-c", forwarder.BRIDGE.format(port=dashboard)]
        task = asyncio.create_task(forwarder.serve(0, command, ready))
        port = await ready
        try:
            async with ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200 and await response.text() == page
                async with http.post(f"http://127.0.0.1:{port}/api/jobs/", data=page) as response:
                    assert await response.text() == str(len(page))
        finally:
            task.cancel()
            await runner.cleanup()

    asyncio.run(main())


async def _page(text: str) -> web.Response:
    return web.Response(text=text)


async def _echo(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))
