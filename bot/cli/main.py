"""``minigpt4-bot``: the operator's command line (typer + rich).

Commands that need the model import it lazily, so ``bot`` itself never imports torch and
``minigpt4-bot --help`` is instant.  Human-readable output goes to the terminal; with
``--json`` only the JSON document goes to stdout (progress and logs go to stderr).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from bot.cli.admin import admin_app
from bot.cli.common import ConfigOption, err, out, setup
from bot.cli.train import train_command
from bot.cli.weights import weights_app
from bot.core.config import Settings

if TYPE_CHECKING:
    from model import MiniGPT4

__all__ = ["app", "main"]

app = typer.Typer(help="MiniGPT-4 in your team chat.", no_args_is_help=True, add_completion=False)
app.add_typer(weights_app, name="weights")  # bot/cli/weights.py: download, demo, check, export


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


app.add_typer(admin_app, name="admin")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
