"""``minigpt4-bot weights download`` against a fake Hugging Face hub and a fake file server on loopback.

The command runs in its own process with ``HF_ENDPOINT`` pointing at the fake hub (huggingface_hub reads
it at import), on tiny demo weights served in the original layouts; the last step, ``weights check``,
loads what was fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fake_hub import Repo, Servers, folder_files

from model.demo_weights import write_demo_weights
from tests.demo_helpers import shape_lines

ROOT = Path(__file__).resolve().parents[2]
VICUNA = "Vision-CAIR/vicuna-7b"
LLAMA2 = "meta-llama/Llama-2-7b-chat-hf"
DRIVE_7B = "https://drive.google.com/file/d/1RY9jV0dyqLX-o38LrumkKRh6Jtaop58R/view"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_weights(tmp_path_factory.mktemp("served"), "vicuna0")


@pytest.fixture
def servers(demo):
    llm = folder_files(demo.llm)
    with Servers(
        repos={VICUNA: Repo(dict(llm)), LLAMA2: Repo(dict(llm), gated=True)},
        files={"eva_vit_g.pth": demo.vit.read_bytes(), "blip2_pretrained_flant5xxl.pth": demo.qformer.read_bytes()},
    ) as s:
        yield s


@pytest.fixture
def drive(demo, tmp_path) -> Path:
    """What a person saved from Google Drive by hand."""
    folder = tmp_path / "from-drive"
    folder.mkdir()
    shutil.copy(demo.projection, folder / "prerained_minigpt4_7b.pth")
    return folder


def _config(tmp_path: Path, demo) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(f'data_dir = "{tmp_path / "state"}"\n\n[model]\ndevice = "cpu"  # the CPU\n' + shape_lines(demo))
    return path


def _run(servers: Servers, tmp_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MINIGPT4_BOT"))}
    env |= {"HF_ENDPOINT": servers.hub_url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "bot.cli", "weights", "download", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _files(servers: Servers) -> list[str]:
    return [
        "--source", f"vit={servers.files_url}/eva_vit_g.pth",
        "--source", f"qformer={servers.files_url}/blip2_pretrained_flant5xxl.pth",
    ]  # fmt: skip


def _downloads(servers: Servers) -> int:
    return sum(s.method == "GET" and ("/resolve/" in s.path or "/files/" in s.path) for s in servers.seen)


def _flat(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_full_fetch_checks_the_files_and_writes_the_model_table(servers, demo, drive, tmp_path):
    out, config = tmp_path / "weights", _config(tmp_path, demo)
    args = ["--out", str(out), "--from", str(drive), "-c", str(config), "--write-config", str(config)]
    result = _run(servers, tmp_path, *args, *_files(servers))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, data in folder_files(demo.llm).items():
        assert (out / "vicuna-7b" / name).read_bytes() == data
    assert (out / "eva_vit_g.pth").read_bytes() == demo.vit.read_bytes()
    assert not list(out.glob("*.incomplete"))
    text = _flat(result)
    assert "memory:" in text and "weights OK" in text and "test image answer" in text
    model = tomllib.loads(config.read_text())["model"]
    assert model["llm"] == str(out / "vicuna-7b") and model["vit"] == str(out / "eva_vit_g.pth")
    assert model["projection"] == str(drive / "prerained_minigpt4_7b.pth") and model["variant"] == "vicuna0"
    assert "# the CPU" in config.read_text()  # the table is edited in place, comments kept
    # A second run fetches nothing again: every file is there.
    before = _downloads(servers)
    again = _run(servers, tmp_path, "--out", str(out), "--from", str(drive), "--no-check", *_files(servers))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f'llm = "{out / "vicuna-7b"}"' in again.stdout
    assert _downloads(servers) == before


def test_resume_after_a_cut_connection_and_after_an_interrupted_run(servers, demo, drive, tmp_path):
    """Files larger than huggingface_hub's 10 MB write chunk, cut at 12 MB: the retry asks for the rest."""
    big = os.urandom(24 * 2**20)
    servers.repos[VICUNA].files["model.safetensors"] = big  # not loaded here (--no-check)
    servers.files["eva_vit_g.pth"] = big[::-1]
    servers.cut_once |= {"hub:model.safetensors", "file:eva_vit_g.pth"}
    out = tmp_path / "weights"
    out.mkdir()
    blip2 = demo.qformer.read_bytes()
    (out / "blip2_pretrained_flant5xxl.pth.incomplete").write_bytes(blip2[:1000])  # an earlier run's Ctrl-C
    result = _run(servers, tmp_path, "--out", str(out), "--from", str(drive), "--no-check", *_files(servers))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "vicuna-7b" / "model.safetensors").read_bytes() == big
    assert (out / "eva_vit_g.pth").read_bytes() == big[::-1]
    assert (out / "blip2_pretrained_flant5xxl.pth").read_bytes() == blip2
    chunk = f"bytes={10 * 2**20}-"  # what was written before the cut is kept
    assert servers.ranges("/model.safetensors") == [chunk]
    assert servers.ranges("/eva_vit_g.pth") == [chunk]
    assert servers.ranges("/blip2_pretrained_flant5xxl.pth") == ["bytes=1000-"]


@pytest.mark.parametrize("token", [None, "hf_not_granted_yet"])
def test_gated_repo_without_access_is_one_clear_line(servers, drive, tmp_path, token):
    out = tmp_path / "weights"
    args = ["--variant", "llama2", "--out", str(out), "--from", str(drive), "--no-check"]
    result = _run(servers, tmp_path, *args, "--source", f"vit={servers.files_url}/eva_vit_g.pth", token=token)
    assert result.returncode == 1
    text = _flat(result)
    assert f"{LLAMA2} is gated" in text and f"https://huggingface.co/{LLAMA2}" in text
    assert ("has no access yet" in text) if token else ("set HF_TOKEN" in text)
    assert "Traceback" not in result.stderr and (token is None or token not in text)
    assert not (out / "Llama-2-7b-chat-hf" / "model.safetensors").exists()


def test_gated_repo_with_a_granted_token(servers, demo, tmp_path):
    out = tmp_path / "weights"
    (out / "x").mkdir(parents=True)
    shutil.copy(demo.projection, out / "pretrained_minigpt4_llama2_7b.pth")  # saved from Drive into --out
    args = ["--variant", "llama2", "--out", str(out), "--no-check"]
    result = _run(servers, tmp_path, *args, "--source", f"vit={servers.files_url}/eva_vit_g.pth", token=servers.token)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "Llama-2-7b-chat-hf" / "config.json").is_file()
    assert f'projection = "{out / "pretrained_minigpt4_llama2_7b.pth"}"' in result.stdout
    assert servers.token not in result.stdout + result.stderr


def test_wrong_size_file_is_refused_and_removed(servers, demo, drive, tmp_path):
    servers.announced["eva_vit_g.pth"] = len(demo.vit.read_bytes()) + 4096  # the mirror sends another file
    out = tmp_path / "weights"
    result = _run(servers, tmp_path, "--out", str(out), "--from", str(drive), "--no-check", *_files(servers))
    assert result.returncode == 1
    text = _flat(result)
    assert "eva_vit_g.pth: received" in text and f"expected {len(demo.vit.read_bytes()) + 4096:,}" in text
    assert not (out / "eva_vit_g.pth").exists() and not (out / "eva_vit_g.pth.incomplete").exists()


def test_missing_drive_file_prints_the_link_and_is_picked_up_next_run(servers, demo, tmp_path):
    out = tmp_path / "weights"
    first = _run(servers, tmp_path, "--out", str(out), "--no-check", *_files(servers))
    assert first.returncode == 1
    text = _flat(first)
    assert DRIVE_7B in text and f"save it as {out / 'prerained_minigpt4_7b.pth'}" in text
    assert (out / "eva_vit_g.pth").is_file() and (out / "vicuna-7b" / "config.json").is_file()  # the rest is there
    shutil.copy(demo.projection, out / "prerained_minigpt4_7b.pth")  # the person saves it
    second = _run(servers, tmp_path, "--out", str(out), "--no-check", *_files(servers))
    assert second.returncode == 0, second.stderr[-2000:]
    assert f'projection = "{out / "prerained_minigpt4_7b.pth"}"' in second.stdout
