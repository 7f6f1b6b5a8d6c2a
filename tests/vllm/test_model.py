"""MiniGPT-4 as a native vLLM model: tiny exports of all three variants, greedy ids against the local engine.

Each variant: demo weights in the original layouts (head_dim 32, vLLM's CPU attention refuses 16) →
``export_model`` → ``vllm.LLM`` on the folder (one instance per variant, in the vLLM venv, driven by
``vllm_generate.py``) and the local engine (this venv, float32, same files).  Both get the same prompt:
the reference's ``<ImageHere>`` segments joined by one ``image_token_id`` per picture (the contract the
bot's vLLM backend sends), repetition penalty 1.0, no stop strings, 24 new tokens.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.vllm.vllm_env import ROOT, VLLM_PYTHON, require_vllm

require_vllm()

VARIANTS = ("vicuna0", "llama2", "minigptv2")
NEW_TOKENS = 24
OPTIONS = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "repetition_penalty": 1.0, "stop_strings": []}
FIRST = "Describe this picture in detail, please."
SECOND = "And how does this second picture differ from the first one?"


def picture(kind: int) -> bytes:
    """Two different PNG pictures (the built-in test image, and one drawn here)."""
    from model.image_processing import builtin_test_image

    image = builtin_test_image()
    if kind:
        image = Image.new("RGB", (300, 200), (20, 40, 90))
        ImageDraw.Draw(image).polygon([(30, 180), (150, 20), (270, 180)], fill=(240, 200, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_ids(codec: Any, prompt: str, image_token_id: int) -> list[int]:
    """The backend contract: segments (BOS on the first only) joined by ONE image id per picture."""
    segments = codec.segment_token_ids(prompt)
    ids = list(segments[0])
    for segment in segments[1:]:
        ids += [image_token_id, *segment]
    return ids


def without_eos(ids: Any, eos: int) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


async def local_answers(weights: Any, pictures: list[bytes]) -> list[Any]:
    """The local engine (float32): a one-picture question, then a follow-up with a second picture."""
    from bot.cli.backends import LOCAL
    from bot.core.config import Settings

    model = {k: v for k, v in weights.loader_kwargs().items() if v} | {"device": "cpu", "dtype": "float32"}
    variant = model.pop("variant")
    settings = Settings.model_validate({"data_dir": str(weights.llm.parent / "data"),
                                        "model": {**model, "variant": variant}})  # fmt: skip
    backend = await LOCAL.start(settings)
    try:
        first = [{"role": "user", "text": FIRST, "image": True}]

        async def answer(turns: list[dict[str, Any]], images: list[bytes]) -> Any:
            stream = backend.stream(turns=turns, images=images, conversation_id="t", user="u", options=OPTIONS)
            return [event async for event in stream][-1]

        one = await answer(first, pictures[:1])
        turns = [*first, {"role": "assistant", "text": one.text}, {"role": "user", "text": SECOND, "image": True}]
        two = await answer(turns, pictures)
        return [(first, one), (turns, two)]
    finally:
        await backend.close()


def prepare(variant: str, folder: Path) -> dict[str, Any]:
    """Demo weights → export → the local engine's two answers → the vLLM run's spec (same prompts)."""
    from model.conversation import build_prompt
    from model.demo_weights import write_demo_weights
    from model.text import TextCodec
    from model.variants import get_variant
    from model.vllm_plugin.export import export_model

    weights = write_demo_weights(folder / "weights", variant)
    report = export_model(folder / "export", **weights.loader_kwargs())
    pictures = [picture(0), picture(1)]
    for i, data in enumerate(pictures):
        (folder / f"pic{i}.png").write_bytes(data)
    local = asyncio.run(local_answers(weights, pictures))
    codec = TextCodec.from_dir(folder / "export")
    template = get_variant(variant).template
    requests: list[dict[str, Any]] = []
    for n, (turns, _final) in enumerate(local):
        ids = prompt_ids(codec, build_prompt(template, turns), report.image_token_id)
        requests.append({"prompt_token_ids": ids, "images": [str(folder / f"pic{i}.png") for i in range(n + 1)],
                         "max_tokens": NEW_TOKENS})  # fmt: skip
    # the first question again, through vLLM's chat API and the exported chat template (`vllm serve DIR`)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FIRST}]}]
    requests.append({"messages": chat, "images": [requests[0]["images"][0]], "max_tokens": NEW_TOKENS})
    return {
        "variant": variant,
        "report": report,
        "local": local,
        "requests": requests,
        "eos": codec.eos_id,
        "weights": weights,
        "vllm": {"model": str(folder / "export"), "requests": requests, "multiprocess": False,
                 "embed_images": requests[1]["images"]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """All three variants, then ONE vLLM process: one ``LLM`` per variant, each in-process, so ``apply_model`` can
    read every variant's picture embeddings.  vLLM as it serves (engine core spawned, the plugin loaded by entry
    point there) is ``test_backend.py``: one worker per variant."""
    folder = tmp_path_factory.mktemp("vllm-model")
    prepared = {v: prepare(v, folder / v) for v in VARIANTS}
    vicuna = prepared["vicuna0"]["vllm"]
    extra = [
        {
            "model": str(sharded_copy(Path(vicuna["model"]), folder / "sharded")),
            "dtype": "bfloat16",
            "probe": True,
            "requests": vicuna["requests"][:1],
        },
        {"model": str(broken_copy(Path(vicuna["model"]), folder / "broken")), "requests": [], "expect_error": True},
    ]
    spec = {"runs": [prepared[v]["vllm"] for v in VARIANTS] + extra, "logprobs": 5}
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    done = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_generate.py")), str(folder / "spec.json"),
         str(folder / "out.json")],
        env=env, cwd=folder, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
    assert done.returncode == 0, "the vLLM run failed (its log is above)"
    out = json.loads((folder / "out.json").read_text())["runs"]
    for variant, result in zip(VARIANTS, out, strict=False):
        prepared[variant]["results"], prepared[variant]["embeddings"] = result["results"], result["embeddings"]
    prepared["vicuna0"]["bf16"], prepared["vicuna0"]["broken"] = out[len(VARIANTS) :]
    return prepared


def sharded_copy(export: Path, out: Path) -> Path:
    """The export written in several safetensors shards + index, as a big model's export is."""
    import shutil

    from safetensors.torch import load_file

    from model.vllm_plugin.export import _save_shards

    shutil.copytree(export, out)
    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    _save_shards(state, out, shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def broken_copy(export: Path, out: Path) -> Path:
    """The export with one tensor missing and one of the wrong shape (an edited or mixed-up model file)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(export, out)
    state = load_file(out / "model.safetensors")
    del state["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    state["llama_proj.weight"] = state["llama_proj.weight"][:, :16].contiguous()
    save_file(state, out / "model.safetensors")
    return out


@pytest.fixture(params=VARIANTS)
def run(request: pytest.FixtureRequest, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return runs[request.param]


def test_one_picture_greedy_ids_equal_the_local_engine(run: dict[str, Any]) -> None:
    (_turns, local), vllm = run["local"][0], run["results"][0]
    assert without_eos(vllm["token_ids"], run["eos"]) == without_eos(local.token_ids, run["eos"])
    assert len(vllm["token_ids"]) > 1
    # the prompt vLLM ran = the local engine's context: each image id expanded to num_image_tokens
    expanded = len(run["requests"][0]["prompt_token_ids"]) - 1 + run["report"].num_image_tokens
    assert expanded == local.prompt_tokens


def test_two_turn_thread_with_a_second_picture_equals_the_local_engine(run: dict[str, Any]) -> None:
    (_turns, local), vllm = run["local"][1], run["results"][1]
    assert without_eos(vllm["token_ids"], run["eos"]) == without_eos(local.token_ids, run["eos"])
    expanded = len(run["requests"][1]["prompt_token_ids"]) - 2 + 2 * run["report"].num_image_tokens
    assert expanded == local.prompt_tokens
    # the follow-up reuses the first turn's KV blocks — text ids, the first picture (same hash) and the answer's
    # blocks where its re-tokenised text gives the same ids — as far as the two agree, in whole 32-token blocks
    first = run["results"][0]["prompt_token_ids"] + run["results"][0]["token_ids"]
    follow_up = vllm["prompt_token_ids"]
    common = next((i for i, (a, b) in enumerate(zip(first, follow_up, strict=False)) if a != b), len(first))
    picture_start = first.index(run["report"].image_token_id)
    common = min(common, len(first) - 1, len(follow_up) - 1)  # the last token of each was never fed
    assert vllm["num_cached_tokens"] == common // 32 * 32 > picture_start  # cached blocks hold picture tokens


def test_the_exported_chat_template_serves_the_same_prompt_through_vllms_chat_api(run: dict[str, Any]) -> None:
    """`vllm serve DIR` users: an OpenAI-style message with a picture renders (chat_template.jinja), tokenises
    (<ImageHere> = image_token_id) and expands to exactly the prompt the backend sends, so the answer is the same."""
    by_ids, by_chat = run["results"][0], run["results"][2]
    assert by_chat["prompt_token_ids"] == by_ids["prompt_token_ids"]
    assert by_chat["token_ids"] == by_ids["token_ids"]


def test_ln_vision_qformer_and_projection_stay_float32_in_a_bfloat16_model(runs: dict[str, dict[str, Any]]) -> None:
    """As the reference keeps them on a GPU (README "Precision"): the ViT and the LLM take vLLM's dtype.
    (This run loads the export from safetensors shards + index.)"""
    bf16 = runs["vicuna0"]["bf16"]
    assert bf16["dtypes"] == {"vision_model": "bfloat16", "ln_vision": "float32", "query_tokens": "float32",
                              "qformer": "float32", "llama_proj": "float32", "language_model": "bfloat16"}  # fmt: skip
    assert len(bf16["results"][0]["token_ids"]) > 1


def test_vllm_refuses_a_model_file_that_does_not_fit_its_config(runs: dict[str, dict[str, Any]]) -> None:
    """No silent random weights: a missing tensor or a wrong shape stops vLLM's start, by name."""
    error = runs["vicuna0"]["broken"]["error"]
    assert "does not fit its config.json (re-run minigpt4-bot weights export)" in error
    assert "missing tensor qformer.encoder.layer.0.crossattention.attention.key.weight" in error
    assert "llama_proj.weight: file has (64, 16), model needs (64, 32)" in error


def test_picture_embeddings_are_close_to_the_local_models(run: dict[str, Any]) -> None:
    """vLLM's BLIP ViT / Q-Former / projection against transformers' modules on the same float32 weights."""
    import torch

    from model.image_processing import load_image
    from model.loader import load_minigpt4

    model = load_minigpt4(**run["weights"].loader_kwargs())
    images = [load_image(Path(p).read_bytes()) for p in run["requests"][1]["images"]]
    local = torch.stack(model.encode_pil(images))
    vllm = torch.tensor(run["embeddings"])
    assert vllm.shape == local.shape == (2, run["report"].num_image_tokens, model.hidden_size)
    # float32 kernel differences only (vLLM's SDPA and fused qkv vs transformers' attention): measured up to
    # ~1e-5 absolute / 2e-5 relative on these checkpoints; the greedy ids above are equal
    print(f"{run['variant']}: max |Δ| {(vllm - local).abs().max().item():.2e}, max |x| {local.abs().max().item():.2f}")
    torch.testing.assert_close(vllm, local, rtol=1e-4, atol=1e-5)
