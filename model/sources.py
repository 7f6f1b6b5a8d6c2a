"""Where the published MiniGPT-4 files live, and fetching them (``minigpt4-bot weights download``).

One table, :data:`SOURCES`, names every file per variant and LLM size (from the Vision-CAIR/MiniGPT-4
README and LAVIS; ``shared/reference/openai-grounding-weights.md`` §4):

* the LLM — a Hugging Face repo, fetched with ``huggingface_hub.snapshot_download`` (progress bars,
  resume of ``.incomplete`` files, ``HF_TOKEN`` for gated repos such as Llama-2-chat, ``HF_ENDPOINT``
  for a mirror);
* ``eva_vit_g.pth`` and ``blip2_pretrained_flant5xxl.pth`` — HTTPS from the LAVIS bucket, with
  huggingface_hub's ``http_get`` (resume with ``Range`` from ``<name>.incomplete``, retries after a cut
  connection, size check against the server's length);
* the stage-2 checkpoints — on Google Drive, which has no stable download API: their link and the file
  name to save are printed, and the file is picked up from the output folder or ``--from`` next run.

Every entry can be overridden per file (``--source vit=https://mirror/eva_vit_g.pth``,
``--source llm=org/name``, ``--source projection=/mnt/weights/``: a local file or a folder holding it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from model.variants import VARIANTS

__all__ = [
    "SOURCES",
    "DownloadError",
    "DriveFile",
    "Fetched",
    "HubRepo",
    "UrlFile",
    "WeightSources",
    "fetch_all",
    "sources_for",
]

LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"


class DownloadError(RuntimeError):
    """A file could not be fetched; the text says which, why, and what to do."""


@dataclass(frozen=True, kw_only=True)
class _Source:
    """What every published file shares: an override may name a local copy, used in place (nothing fetched)."""

    local: str = ""

    @property
    def remote(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the file comes from, as the download command lists it: the local copy, else its address."""
        return self.local or self.remote


@dataclass(frozen=True)
class HubRepo(_Source):
    """An LLM folder on the Hugging Face hub, saved as ``<out>/<folder>``."""

    repo_id: str
    folder: str
    revision: str = "main"
    gated: bool = False

    @property
    def remote(self) -> str:
        return f"https://huggingface.co/{self.repo_id} ({self.revision})"


@dataclass(frozen=True, kw_only=True)
class _File(_Source):
    """One checkpoint file; ``size`` (bytes), when known, is checked as well as the server's length."""

    size: int | None = None


@dataclass(frozen=True)
class UrlFile(_File):
    """A file fetched over HTTP(S)."""

    url: str
    filename: str

    @property
    def remote(self) -> str:
        return self.url


@dataclass(frozen=True)
class DriveFile(_File):
    """A file on Google Drive: fetched by hand in a browser (Drive has no stable download API)."""

    file_id: str
    filename: str

    @property
    def remote(self) -> str:
        """The page to open in a browser (``Download`` there saves the file)."""
        return f"https://drive.google.com/file/d/{self.file_id}/view"


Source = HubRepo | UrlFile | DriveFile


@dataclass(frozen=True)
class WeightSources:
    """The files of one variant and LLM size, by ``[model]`` key (``qformer`` only for vicuna0)."""

    variant: str
    size: str
    files: Mapping[str, Source] = field(default_factory=dict)


_VIT = UrlFile(f"{LAVIS}/eva_vit_g.pth", "eva_vit_g.pth")
_QFORMER = UrlFile(f"{LAVIS}/blip2_pretrained_flant5xxl.pth", "blip2_pretrained_flant5xxl.pth")
_LLAMA2 = HubRepo("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7b-chat-hf", gated=True)


def _published(variant: str, size: str, llm: HubRepo, projection: DriveFile) -> WeightSources:
    """One published checkpoint's files: its LLM, EVA ViT-g, BLIP-2's Q-Former where the variant has one
    (Vicuna V0; the Llama 2 variants project the ViT's features directly) and its projection file."""
    qformer = {"qformer": _QFORMER} if VARIANTS[variant].has_qformer else {}
    return WeightSources(variant, size, {"llm": llm, "vit": _VIT, **qformer, "projection": projection})


SOURCES: dict[tuple[str, str], WeightSources] = {
    (entry.variant, entry.size): entry
    for entry in (
        _published("vicuna0", "7b", HubRepo("Vision-CAIR/vicuna-7b", "vicuna-7b"),
                   DriveFile("1RY9jV0dyqLX-o38LrumkKRh6Jtaop58R", "prerained_minigpt4_7b.pth")),  # sic
        _published("vicuna0", "13b", HubRepo("Vision-CAIR/vicuna", "vicuna-13b"),
                   DriveFile("1a4zLvaiDBr-36pasffmgpvH5P7CKmpze", "pretrained_minigpt4.pth")),
        _published("llama2", "7b", _LLAMA2,
                   DriveFile("11nAPjEok8eAGGEG1N2vXo3kBLCg0WgUk", "pretrained_minigpt4_llama2_7b.pth")),
        # "after stage 3" in the MiniGPT-v2 README; stage 2: 1Vi_E7ZtZXRAQcyz4f8E6LtLh2UXABCmu,
        # online demo: 1aVbfW7nkCSYx99_vCRyP1sOlQiWVSnAl (override with --source projection=…).
        _published("minigptv2", "7b", _LLAMA2,
                   DriveFile("1HkoUUrjzFGn33cSiUkI-KcT-zysCynAz", "minigptv2_checkpoint.pth")),
    )
}  # fmt: skip


def sources_for(variant: str, size: str, overrides: Mapping[str, str] | None = None) -> WeightSources:
    """The table's entry for ``variant``/``size`` with per-file ``overrides`` (``key`` → URL, repo id or path).

    A URL replaces a file's URL (a Drive file given a URL is fetched over HTTPS like the others); ``org/name``
    (optionally ``@revision``) replaces the LLM repo; an existing local path (a file, or a folder holding the
    file) is used in place and nothing is fetched for it.
    """
    entry = SOURCES.get((variant, size))
    if entry is None:
        known = ", ".join(f"{v} {s}" for v, s in SOURCES)
        raise DownloadError(f"no published weights for variant {variant!r} at size {size!r} (known: {known})")
    files = dict(entry.files)
    for key, value in (overrides or {}).items():
        if key not in files:
            raise DownloadError(
                f"--source {key}=…: variant {variant!r} has no {key!r} file (it has {', '.join(files)})"
            )
        files[key] = _override(key, files[key], value)
    return replace(entry, files=files)


def _override(key: str, source: Source, value: str) -> Source:
    if Path(value).expanduser().exists():
        return replace(source, local=str(Path(value).expanduser().resolve()))
    if value.startswith(("http://", "https://")):
        if isinstance(source, HubRepo):
            raise DownloadError(f"--source {key}={value}: the LLM is a hub repo id (org/name[@rev]) or a local folder")
        return UrlFile(value, source.filename)
    if isinstance(source, HubRepo) and value.count("/") == 1:
        repo, _, revision = value.partition("@")
        return replace(source, repo_id=repo, revision=revision or "main")
    raise DownloadError(f"--source {key}={value}: not a URL, a hub repo id or an existing file or folder")


@dataclass
class Fetched:
    """What a run has: a path per ``[model]`` key, and the Drive files still to save by hand."""

    paths: dict[str, Path] = field(default_factory=dict)
    missing: list[tuple[str, DriveFile]] = field(default_factory=list)


def fetch_all(
    sources: WeightSources, out: Path, search: Iterable[Path] = (), note: Callable[[str], None] = print
) -> Fetched:
    """Fetch every file of ``sources`` into ``out`` (what is there already is kept); ``search`` = ``--from``."""
    out.mkdir(parents=True, exist_ok=True)
    folders = [*search, out]
    fetched = Fetched()
    for key, source in sources.files.items():
        note(f"{key}: {source.describe()}")
        if isinstance(source, HubRepo):
            fetched.paths[key] = _hub_snapshot(source, out)
            continue
        found = _find(source, folders)
        if found is not None:
            fetched.paths[key] = found
        elif isinstance(source, UrlFile):
            fetched.paths[key] = fetch_url(source, out)
        else:
            fetched.missing.append((key, source))
    return fetched


def _find(source: UrlFile | DriveFile, folders: Iterable[Path]) -> Path | None:
    """A complete copy already there: the override's path, or ``filename`` in one of ``folders``."""
    if source.local:
        local = Path(source.local)
        local = local / source.filename if local.is_dir() else local
        if not local.is_file():
            raise DownloadError(f"{local} does not exist (given with --source for {source.filename})")
        return local
    for folder in folders:
        candidate = Path(folder).expanduser() / source.filename
        if candidate.is_file() and (source.size is None or candidate.stat().st_size == source.size):
            return candidate.resolve()
    return None


def fetch_url(source: UrlFile, out: Path) -> Path:
    """Download ``source`` to ``out/filename`` through ``filename.incomplete``, resuming what is there.

    The expected size is the table's, else the server's ``Content-Length`` (HEAD); a file that ends up
    any other size is removed and reported (a mirror serving another file, a proxy cutting it short).
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import http_backoff

    target = out / source.filename
    partial = out / (source.filename + ".incomplete")
    try:
        head = http_backoff("HEAD", source.url, follow_redirects=True, max_retries=2)
    except Exception as exc:  # httpx2's connect / timeout errors
        raise DownloadError(f"cannot reach {source.url}: {exc}") from exc
    if head.status_code != 200:
        raise DownloadError(f"{source.url} answered HTTP {head.status_code}; check the URL or use --source")
    announced = head.headers.get("Content-Length")
    expected = source.size or (int(announced) if announced and announced.isdigit() else None)
    if expected is not None and announced and announced.isdigit() and int(announced) != expected:
        raise DownloadError(
            f"{source.url} is {int(announced):,} bytes but {source.filename} is {expected:,}: not the same file"
        )
    resume = partial.stat().st_size if partial.is_file() else 0
    if expected is not None and resume > expected:
        partial.unlink()
        resume = 0
    try:
        with partial.open("ab") as handle:
            http_get(source.url, handle, resume_size=resume, expected_size=expected, displayed_filename=source.filename)
    except OSError as exc:
        got = partial.stat().st_size if partial.is_file() else 0
        if expected is not None and got != expected:
            partial.unlink(missing_ok=True)  # a wrong-size file is no base to resume from
            raise DownloadError(
                f"{source.filename}: received {got:,} bytes, expected {expected:,} — the partial file was removed; "
                "run the command again (or check the mirror given with --source)"
            ) from exc
        raise DownloadError(f"{source.filename}: {exc}") from exc
    except Exception as exc:  # the connection dropped more often than http_get retries
        raise DownloadError(
            f"{source.filename}: download interrupted ({exc}); run the command again to resume "
            f"from {partial.stat().st_size if partial.is_file() else 0:,} bytes"
        ) from exc
    os.replace(partial, target)
    return target.resolve()


def _hub_snapshot(source: HubRepo, out: Path) -> Path:
    """The LLM folder: ``snapshot_download`` of the config, tokenizer and weights (safetensors when the
    repo has them, else ``.bin``), resumed where an earlier run stopped."""
    if source.local:
        if not (Path(source.local) / "config.json").is_file():
            raise DownloadError(f"{source.local} is not an LLM folder (no config.json)")
        return Path(source.local)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    try:
        info = HfApi(endpoint=endpoint).model_info(source.repo_id, revision=source.revision)
        names = [s.rfilename for s in info.siblings or []]
        weights = ["*.safetensors"] if any(n.endswith(".safetensors") for n in names) else ["*.bin"]
        folder = snapshot_download(
            source.repo_id,
            revision=info.sha,
            local_dir=out / source.folder,
            allow_patterns=["*.json", "tokenizer.model", *weights],
            endpoint=endpoint,
        )
    except GatedRepoError as exc:
        raise DownloadError(_gated_message(source)) from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"{source.repo_id} was not found on the hub (or is private); check --source llm=…") from exc
    except HfHubHTTPError as exc:
        raise DownloadError(f"the hub refused {source.repo_id}: {_first_line(exc)}") from exc
    except OSError as exc:  # includes a consistency (size) check failure
        raise DownloadError(f"{source.repo_id}: {_first_line(exc)}; run the command again to resume") from exc
    except Exception as exc:  # httpx2's connect / protocol errors after huggingface_hub's retries
        raise DownloadError(f"cannot fetch {source.repo_id}: {_first_line(exc)}; run again to resume") from exc
    return Path(folder)


def _gated_message(source: HubRepo) -> str:
    page = f"https://huggingface.co/{source.repo_id}"
    if os.environ.get("HF_TOKEN"):
        return (
            f"{source.repo_id} is gated and the account of HF_TOKEN has no access yet: accept the licence at {page} "
            "and wait for the grant, then run again"
        )
    return f"{source.repo_id} is gated: accept the licence at {page}, then set HF_TOKEN to a token of that account"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
