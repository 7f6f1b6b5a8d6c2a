"""``minigpt4-bot``: the operator's command line (typer + rich).

Commands that need the model import it lazily, so ``bot`` itself never imports torch and
``minigpt4-bot --help`` is instant.  Human-readable output goes to the terminal; with
``--json`` only the JSON document goes to stdout (progress and logs go to stderr).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from bot.cli.admin import admin_app
from bot.cli.common import ConfigOption, err, out, setup
from bot.cli.train import train_command
from bot.core.config import Settings

if TYPE_CHECKING:
    from model import MiniGPT4

__all__ = ["app", "main"]

app = typer.Typer(help="MiniGPT-4 in your team chat.", no_args_is_help=True, add_completion=False)
weights_app = typer.Typer(help="Create and check model weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


def _load_model(settings: Settings) -> MiniGPT4:
    """Load the configured weights (or demo weights) with a progress bar on stderr."""
    from bot.cli.serve import load_model
    from model import CheckpointError, PrecisionError
    from model.loader import weights_size

    kwargs = settings.model.loader_kwargs()
    total = weights_size(kwargs["llm"], kwargs["vit"], kwargs.get("qformer"), kwargs["projection"])
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("loading weights", total=max(total, 1) if total else None)

            def advance(step: str, size: int) -> None:
                progress.update(task, advance=size, description=f"loaded {step}")

            return load_model(settings, progress=advance)
    except (CheckpointError, PrecisionError, ValueError) as exc:
        err.print(f"[red]Cannot load the model:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _options(settings: Settings, model: MiniGPT4, **overrides: Any) -> Any:
    """``[generation]`` plus command-line overrides, as the model's validated generation options."""
    from model.generate import default_options
    from model.sampling import InvalidGenerationOptions

    values = settings.generation.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    try:
        return default_options(model, **values)
    except InvalidGenerationOptions as exc:
        err.print(Text(str(exc.detail), style="red"))
        raise typer.Exit(2) from None


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="picture to ask about")],
    question: Annotated[str, typer.Argument(help="the question")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help='print {"prompt", "token_ids", "text"}')] = False,
    greedy: Annotated[bool, typer.Option("--greedy", help="deterministic: no sampling")] = False,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    num_beams: Annotated[int | None, typer.Option("--beams", min=1, max=10)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="make sampling reproducible")] = None,
) -> None:
    """Answer one question about one picture, streamed to the terminal."""
    from model.generate import ChatSession
    from model.image_processing import ImageDecodeError

    settings = setup(config)
    if not image.is_file():
        err.print(Text(f"No such file: {image}", style="red"))
        raise typer.Exit(2)
    model = _load_model(settings)
    opts = _options(
        settings,
        model,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        temperature=temperature,
        seed=seed,
        do_sample=False if greedy else None,
    )
    session = ChatSession(model, opts)
    try:
        session.add_image(image.read_bytes())
    except ImageDecodeError as exc:
        err.print(Text(f"{image} is not a picture I can read: {exc}", style="red"))
        raise typer.Exit(2) from None
    stream = session.ask(question)
    if as_json:
        for _ in stream:
            pass
        last = session.last
        sys.stdout.write(json.dumps({"prompt": last.prompt, "token_ids": last.token_ids, "text": last.text}) + "\n")
        return
    for delta in stream:
        out.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
    out.print()


def _check_before_loading(settings: Settings, *, front_ends: bool = False, terminal: bool | None = None) -> None:
    """The database must answer (and, for ``serve``, each enabled front end find its tokens) before minutes
    go into loading the model: else one line each and exit 1."""
    import asyncio

    from bot.cli.serve import database_problem, front_end_problems

    problems = [p for p in (asyncio.run(database_problem(settings)),) if p is not None]
    if front_ends:
        interactive = sys.stdin.isatty() if terminal is None else terminal
        problems += front_end_problems(settings, interactive=interactive)
    for problem in problems:
        logging.getLogger("minigpt4_bot").error("cannot start: %s", problem)
    if problems:
        raise typer.Exit(1)


@app.command()
def chat(config: ConfigOption = None) -> None:
    """Chat with the bot in this terminal (no web server or platform front ends): /image PATH, then ask."""
    import asyncio

    from bot.cli.serve import run_bot

    settings = setup(config)
    _check_before_loading(settings)
    model = _load_model(settings)
    raise typer.Exit(asyncio.run(run_bot(settings, terminal=True, model=model, only=("terminal",))))


@app.command()
def serve(
    config: ConfigOption = None,
    terminal: Annotated[
        bool | None, typer.Option("--terminal/--no-terminal", help="terminal chat too (default: if interactive)")
    ] = None,
) -> None:
    """Start the bot: the front ends bot.toml enables (web chat with /healthz and /metrics, terminal, Slack …)."""
    import asyncio

    from bot.cli.serve import run_bot

    settings = setup(config)
    _check_before_loading(settings, front_ends=True, terminal=terminal)
    model = _load_model(settings) if settings.engine.backend == "local" else None
    raise typer.Exit(asyncio.run(run_bot(settings, terminal=terminal, model=model)))


app.command("train")(train_command)  # bot/cli/train.py: MiniGPT-4's two training stages (model.training)


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
    if write_config is None:
        err.print("Set these in the [model] table of bot.toml (or use --write-config bot.toml):")
        sys.stdout.write("\n".join(lines) + "\n")  # paste-able TOML: no wrapping, no colour
        return
    try:
        _set_model_keys(write_config, dict(line.split(" = ", 1) for line in lines))
    except (OSError, ValueError) as exc:
        err.print(Text(f"Cannot update {write_config}: {exc}", style="red"))
        raise typer.Exit(1) from None
    err.print(Text(f"{write_config}: [model] now loads the demo weights in {demo.llm.parent}"))


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
    """Load the configured weights, report what was loaded, and answer a built-in test image."""
    from model.generate import ChatSession
    from model.image_processing import builtin_test_image
    from model.report import describe_weights

    settings = setup(config)
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


def _gib(size: int) -> str:
    """Bytes as GiB (from a quarter GiB up) or MiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.2f} MiB"


app.add_typer(admin_app, name="admin")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
