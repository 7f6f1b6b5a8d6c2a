"""``minigpt4-bot weights``: fetch, write, check and export the model's weight files.

``download`` fetches the published files (:mod:`model.sources`), ``demo`` writes tiny random ones,
``check`` loads and verifies the configured ones (refusing early, with numbers, when they will not fit
in memory), ``export`` turns them into a folder vLLM loads.  Like every command, they import the model
lazily: ``minigpt4-bot --help`` never imports torch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from bot.cli.common import ConfigOption, err, out, setup
from bot.core.config import Settings

__all__ = ["weights_app"]

weights_app = typer.Typer(help="Download, create and check model weights.", no_args_is_help=True)


@weights_app.command("download")
def weights_download(
    variant: Annotated[str, typer.Option(help="vicuna0 | llama2 | minigptv2")] = "vicuna0",
    size: Annotated[str, typer.Option(help="LLM size: 7b | 13b (13b: vicuna0 only)")] = "7b",
    out_dir: Annotated[Path, typer.Option("--out", help="folder to download into")] = Path("weights"),
    search: Annotated[
        list[Path] | None, typer.Option("--from", help="folder holding files fetched by hand (Google Drive)")
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="KEY=URL|REPO|PATH: another source for one file (llm, vit, qformer, projection)"),
    ] = None,
    write_config: Annotated[
        Path | None, typer.Option("--write-config", help="set the [model] keys in this bot.toml")
    ] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="run weights check on the files at the end")] = True,
    config: ConfigOption = None,
) -> None:
    """Fetch the published files of one variant (Hugging Face, the LAVIS bucket; Google Drive by hand).

    Files already in --out (or --from) are kept, interrupted downloads resume.  The stage-2 checkpoints are
    on Google Drive: their link and the name to save them under are printed; run the command again once
    they are there.  At the end it runs ``weights check`` on them and prints the [model] keys (or sets them
    with --write-config).  ``HF_TOKEN`` authenticates gated repos (Llama-2-chat); ``HF_ENDPOINT`` a hub mirror.
    """
    from model.sources import DownloadError, fetch_all, sources_for

    settings = setup(config)
    try:
        overrides = dict(_split_source(item) for item in source or [])
        sources = sources_for(variant, size.lower(), overrides)
        fetched = fetch_all(
            sources, out_dir.expanduser().resolve(), search or [], note=lambda line: err.print(Text(line))
        )
    except DownloadError as exc:
        logging.getLogger("minigpt4_bot").error("weights download: %s", exc)
        err.print(Text(str(exc), style="red"))
        raise typer.Exit(1) from None
    if fetched.missing:
        for key, drive in fetched.missing:
            err.print(
                Text(
                    f"{key}: {drive.filename} is on Google Drive, which needs a browser. Open {drive.remote}, download "
                    f"it and save it as {out_dir / drive.filename} (or into a folder you give with --from), then "
                    "run this command again.",
                    style="yellow",
                ),
                soft_wrap=True,  # the link and the path stay whole, to copy
            )
        raise typer.Exit(1)
    keys = {"variant": variant, **{k: str(v) for k, v in fetched.paths.items()}}
    if check:
        model = settings.model.model_copy(update=keys)
        check_weights(settings.model_copy(update={"model": model}), max_new_tokens=16)
    lines = [f"{key} = {_toml(value)}" for key, value in keys.items()]
    _emit_model_keys(lines, write_config, f"[model] now loads the {variant} weights in {out_dir}")


def _split_source(item: str) -> tuple[str, str]:
    from model.sources import DownloadError

    key, sep, value = item.partition("=")
    if not sep or not value:
        raise DownloadError(f"--source {item}: expected KEY=VALUE, e.g. vit=https://mirror/eva_vit_g.pth")
    return key.strip(), value.strip()


def _emit_model_keys(lines: list[str], write_config: Path | None, done: str) -> None:
    """Print the ``[model]`` keys to paste, or set them in ``write_config`` (exit 1 if it cannot be updated)."""
    if write_config is None:
        err.print("Set these in the [model] table of bot.toml (or use --write-config bot.toml):", markup=False)
        sys.stdout.write("\n".join(lines) + "\n")  # paste-able TOML: no wrapping, no colour
        return
    try:
        _set_model_keys(write_config, dict(line.split(" = ", 1) for line in lines))
    except (OSError, ValueError) as exc:
        err.print(Text(f"Cannot update {write_config}: {exc}", style="red"))
        raise typer.Exit(1) from None
    err.print(Text(f"{write_config}: {done}"))


@weights_app.command("demo")
def weights_demo(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write into")] = Path("data/demo-weights"),
    variant: Annotated[str, typer.Option(help="vicuna0 | llama2 | minigptv2")] = "vicuna0",
    seed: int = 0,
    write_config: Annotated[
        Path | None, typer.Option("--write-config", help="set these keys in the [model] table of this bot.toml")
    ] = None,
) -> None:
    """Write tiny random weights in the original layouts (they answer with NONSENSE text).

    Prints the keys of bot.toml's ``[model]`` table that load them (to set in the existing table, not to
    append: bot.toml already has one), or with ``--write-config`` sets them in that table in place.
    """
    from transformers.utils import logging as hf_logging

    from model.demo_weights import DEMO_NOTICE, write_demo_weights

    hf_logging.disable_progress_bar()  # the tokenizer and shard writers' bars are noise here
    try:
        demo = write_demo_weights(out_dir.resolve() / variant, variant, seed=seed)
    except ValueError as exc:
        err.print(Text(str(exc), style="red"))
        raise typer.Exit(2) from None
    err.print(Text(DEMO_NOTICE, style="yellow"))
    keys = {"variant": variant, "llm": str(demo.llm), "vit": str(demo.vit), "qformer": str(demo.qformer or ""),
            "projection": str(demo.projection), "vision": demo.vision or None,
            "qformer_dims": demo.qformer_dims or None}  # fmt: skip
    lines = [f"{key} = {_toml(value)}" for key, value in keys.items() if value is not None]
    _emit_model_keys(lines, write_config, f"[model] now loads the demo weights in {demo.llm.parent}")


def _toml(value: Any) -> str:
    """A TOML value: a string, or an inline table of numbers (``vision = { img_size = 224, … }``)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {v}" for k, v in value.items()) + " }"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _set_model_keys(path: Path, keys: dict[str, str]) -> None:
    """Set ``keys`` (already TOML values) in the ``[model]`` table of ``path``, keeping comments and order.

    A key already in the table is replaced on its line; the others go after the table's last key.  The
    result must parse and carry the values, else the file is left as it was.
    """
    import re
    import tomllib

    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    header = next((i for i, line in enumerate(lines) if line.strip() == "[model]"), None)
    if header is None:
        lines += ["", "[model]"]
        header = len(lines) - 1
    end = next((i for i in range(header + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    last = header
    for i in range(header + 1, end):
        match = re.match(r"\s*([A-Za-z_]+)\s*=", lines[i])
        if match:
            last = i
            if match.group(1) in keys:
                lines[i] = f"{match.group(1)} = {keys.pop(match.group(1))}"
    lines[last + 1 : last + 1] = [f"{k} = {v}" for k, v in keys.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # a TOMLDecodeError (a ValueError) leaves the file untouched
    path.write_text(text, encoding="utf-8")


@weights_app.command("export")
def weights_export(
    out_dir: Annotated[Path, typer.Option("--out", help="model folder to write (replaced if it exists)")],
    config: ConfigOption = None,
) -> None:
    """Turn the [model] files into one folder vLLM loads (`vllm serve DIR`, or [vllm] model_dir)."""
    from model import CheckpointError, PrecisionError
    from model.vllm_plugin.export import export_model

    settings = setup(config)
    kwargs = settings.model.loader_kwargs()
    if settings.model.uses_demo_weights:
        from model.demo_weights import DEMO_NOTICE, write_demo_weights

        err.print(Text(f"no [model] weights configured: exporting {DEMO_NOTICE}", style="yellow"))
        kwargs |= write_demo_weights(settings.demo_weights_dir, settings.model.variant).loader_kwargs()
    try:
        report = export_model(out_dir, **kwargs)
    except (CheckpointError, PrecisionError, ValueError, OSError) as exc:
        err.print(Text(f"Cannot export the model: {exc}", style="red"))
        raise typer.Exit(1) from None
    out.print(
        f"wrote {report.out}: {report.variant}, {report.tensors} tensors ({_gib(report.bytes)}), "
        f"{report.num_image_tokens} tokens per picture, image_token_id {report.image_token_id}",
        markup=False,
    )
    for file, keys in report.ignored.items():
        out.print(
            f"not exported from {file}: {len(keys)} tensor(s) the reference ignores too "
            f"({', '.join(keys[:4])}{' …' if len(keys) > 4 else ''})",
            markup=False,
        )
    for note in report.notes:
        out.print(note, markup=False)


@weights_app.command("check")
def weights_check(
    config: ConfigOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
) -> None:
    """Load the configured weights, report what was loaded, and answer a built-in test image.

    First says how much memory the weights will take on the configured device and dtype, and refuses
    (exit 1, with the numbers) when that is more than the device has free: before minutes of loading.
    """
    settings = setup(config)
    check_weights(settings, max_new_tokens)


def check_weights(settings: Settings, max_new_tokens: int = 32) -> None:
    """``weights check`` on ``settings`` (``weights download`` ends with it, on what it fetched)."""
    from bot.cli.main import _load_model, _options
    from model.generate import ChatSession
    from model.image_processing import builtin_test_image
    from model.report import describe_weights

    _memory_or_exit(settings)
    started = time.perf_counter()
    model = _load_model(settings)
    load_s = time.perf_counter() - started
    report = model.load_report
    if report is None:  # load_minigpt4 always sets it
        err.print("[red]the loader did not report what it loaded[/red]")
        raise typer.Exit(1)

    summary = Table(title="MiniGPT-4 weights", show_header=False)
    summary.add_row("variant", report.variant)
    summary.add_row("device / dtype", f"{report.device} / {report.dtype}")
    summary.add_row("quantization", report.quantization)
    summary.add_row("visual tokens per image", str(model.spec.num_visual_tokens))
    summary.add_row("image size", f"{model.spec.vision.img_size} px")
    if report.lora_rank and model.spec.lora is not None:
        summary.add_row("LoRA", f"r={report.lora_rank}, alpha={model.spec.lora.alpha}")
    summary.add_row("load time", f"{load_s:.1f} s")
    out.print(summary)

    weights = describe_weights(model, context_tokens=settings.generation.max_length)
    parts = Table(title="parameters and memory")
    for col in ("part", "parameters", "dtype", "memory"):
        parts.add_column(col, justify="right" if col in ("parameters", "memory") else "left")
    for part in weights.parts:
        parts.add_row(part.name, f"{part.parameters:,}", part.dtype, _gib(part.bytes))
    parts.add_row("weights total", "", "", _gib(weights.weights_bytes))
    parts.add_row(f"KV cache per {weights.context_tokens}-token thread", "", "", _gib(weights.kv_bytes_per_thread))
    out.print(parts)

    files = Table(title="files")
    for col in ("role", "file", "tensors", "ignored", "unexpected"):
        files.add_column(col)
    for f in report.files:
        files.add_row(
            f.role, Text(f.file), str(f.loaded), str(len(f.ignored)), Text(", ".join(f.unexpected[:4]) or "-")
        )
    out.print(files)
    if report.llm_ignored:
        out.print(f"LLM keys not used: {', '.join(report.llm_ignored[:6])}", markup=False)

    session = ChatSession(model, _options(settings, model, do_sample=False, max_new_tokens=max_new_tokens))
    session.add_image(builtin_test_image())
    t0 = time.perf_counter()
    answer = "".join(session.ask("Describe this image in detail."))
    elapsed = time.perf_counter() - t0
    n = len(session.last.token_ids)
    out.print(f"[bold]test image answer[/bold] ({n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tok/s):")
    out.print(answer or "(empty answer)", markup=False)
    from bot.cli.backends import demo_weights_in_use

    if demo_weights_in_use(settings):
        out.print("[yellow](demo weights: the answer is expected to be nonsense)[/yellow]")
    out.print("[green]weights OK[/green]")


def _memory_or_exit(settings: Settings) -> None:
    """Print the memory plan of the configured weights; exit 1 with the numbers when they will not fit."""
    from model import PrecisionError
    from model.memory import format_bytes, plan_for_settings

    if settings.model.uses_demo_weights:
        return  # tiny: written and loaded by _load_model
    try:
        plan = plan_for_settings(settings.model.loader_kwargs(), context_tokens=settings.generation.max_length)
    except (PrecisionError, OSError, ValueError):
        return  # an unreadable LLM folder or a bad setting: the loader's own message says which, and how to fix it
    out.print(f"memory: {plan.summary()}", markup=False)
    if not plan.fits:
        err.print(
            Text(
                f"The weights will not fit: they need {format_bytes(plan.needed_bytes)} on {plan.device} in "
                f"{plan.dtype} but {format_bytes(plan.available_bytes or 0)} is available. Use a smaller dtype "
                "(bfloat16/float16), quantization = int8 or nf4 on a GPU, or a machine with more memory.",
                style="red",
            )
        )
        raise typer.Exit(1)


def _gib(size: int) -> str:
    """Bytes as GiB (from a quarter GiB up) or MiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.2f} MiB"
