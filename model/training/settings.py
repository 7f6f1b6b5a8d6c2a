"""``train.toml``: the ``[model]`` table of ``bot.toml`` plus a ``[train]`` table named after the reference yaml.

The ``[train]`` names follow the ``run:`` section of the reference's ``train_configs/*.yaml``
(``init_lr``, ``min_lr``, ``warmup_lr``, ``warmup_steps``, ``max_epoch``, ``iters_per_epoch``,
``weight_decay``, ``accum_grad_iters``, ``amp``, ``seed``, ``output_dir``, ``num_workers``) and of its
model section (``max_txt_len``, ``end_sym``, ``prompt_template``).  Settings left out take the
reference's value for the chosen stage (:data:`STAGE_RECIPES`) and variant (:data:`VARIANT_TEXT`).

Training data is one source (``data = "…"``) or several mixed by ratio, the yaml's ``datasets:`` section
(``laion: {sample_ratio: 115}``, ``cc_sbu: {sample_ratio: 14}``) as ``[[train.datasets]]`` tables with
``name``, ``data``, ``sample_ratio`` and an optional ``batch_size`` (:class:`DatasetSettings`).

The ``[model]`` table is the bot's own (:class:`model.settings.ModelSettings`, which ``bot.core.config``
uses too); :class:`TrainModelSettings` only refuses quantized weights.  Relative paths are resolved
against the file's folder.
"""

from __future__ import annotations

import glob
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.settings import ModelSettings

__all__ = [
    "ALIGNMENT_PROMPTS",
    "STAGE_RECIPES",
    "VARIANT_TEXT",
    "DatasetSettings",
    "TrainConfig",
    "TrainConfigError",
    "TrainModelSettings",
    "TrainSettings",
    "load_train_config",
]


class TrainConfigError(ValueError):
    """``train.toml`` is missing, malformed or names something that does not exist; the text names the file."""


# The reference's prompts/alignment.txt (stage 2), used when [train].prompts is empty.
ALIGNMENT_PROMPTS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)

# train_configs/minigpt4_stage1_pretrain.yaml and minigpt4_stage2_finetune.yaml (+ the model's from_config
# defaults), side by side: (stage 1, stage 2) per setting.
_RECIPES_BY_SETTING: dict[str, tuple[int | float, int | float]] = {
    "batch_size": (64, 12),
    "max_epoch": (4, 5),
    "iters_per_epoch": (5000, 200),
    "init_lr": (1e-4, 3e-5),
    "min_lr": (8e-5, 1e-5),
    "warmup_lr": (1e-6, 1e-6),
    "warmup_steps": (5000, 200),
    "max_txt_len": (32, 160),
}
STAGE_RECIPES: dict[int, dict[str, Any]] = {
    stage: {key: values[stage - 1] for key, values in _RECIPES_BY_SETTING.items()} for stage in (1, 2)
}

# (stage-2 prompt_template, stage-2 end_sym) per variant; stage 1 has no prompt and end_sym "\n".
VARIANT_TEXT: dict[str, tuple[str, str]] = {
    "vicuna0": ("###Human: {} ###Assistant: ", "###"),  # minigpt4_stage2_finetune.yaml
    "llama2": ("[INST] {} [/INST] ", "</s>"),  # minigpt4_llama2_stage2_finetune.yaml
    "minigptv2": ("[INST] {} [/INST]", "</s>"),  # minigpt_v2.py default template, minigptv2_finetune.yaml
}

_MODEL_PATH_KEYS = ("llm", "vit", "qformer", "projection")
_TRAIN_PATH_KEYS = ("data", "prompts", "eval_data", "output_dir")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainModelSettings(ModelSettings):
    """``[model]``: ``bot.toml``'s table, key for key; ``projection`` is the starting checkpoint."""

    projection: str = Field("", description="starting checkpoint (stage-1 output or pretrained_minigpt4*.pth)")

    @field_validator("quantization")
    @classmethod
    def _no_quantized_training(cls, value: str) -> str:
        if value != "none":
            raise ValueError('training needs quantization = "none" (the reference trains on fp16 weights)')
        return value


_PATTERN_CHARS = "*?[{:"


def default_dataset_name(spec: str) -> str:
    """``/data/laion/{00000..10488}.tar`` → ``laion``; ``pairs.jsonl`` → ``pairs``; ``data/cc_sbu_align`` → itself."""
    for part in reversed(Path(spec).parts):
        if part in ("", "/", ".", "..") or any(ch in part for ch in _PATTERN_CHARS):
            continue
        return Path(part).stem if part.endswith((".jsonl", ".json", ".tar")) else part
    return ""


class DatasetSettings(_Strict):
    """One ``[[train.datasets]]`` table: a source of the stage-1 mix (the reference yaml's ``datasets: <name>:``).

    Each training step takes one batch from one dataset, chosen at random with probability
    ``sample_ratio / sum(sample_ratio)`` (the reference's ``MultiIterLoader``).
    """

    name: str = Field("", description="shown in the log; empty = from the path (laion/{0..9}.tar → laion)")
    data: str = Field(..., min_length=1, description="JSONL file, cc_sbu_align folder or WebDataset shards")
    sample_ratio: float = Field(1.0, gt=0, allow_inf_nan=False, description="relative draw weight (ref. 115 / 14)")
    batch_size: int | None = Field(None, ge=1, description="per process; empty = [train].batch_size")


class TrainSettings(_Strict):
    """``[train]``: the reference's ``run:`` settings; ``None`` = the reference's value for the stage / variant."""

    stage: Literal[1, 2] = 2
    data: str = Field("", description="JSONL file, cc_sbu_align folder, or WebDataset shards (*.tar, folder, glob)")
    datasets: list[DatasetSettings] = Field(
        default_factory=list, description="instead of data: several sources drawn by sample_ratio (stage-1 mix)"
    )
    prompts: str = Field("", description="stage 2: prompt file, one prompt with <ImageHere> a line; empty = built in")
    eval_data: str = ""
    eval_every: int = Field(0, ge=0)
    batch_size: int | None = Field(None, ge=1)
    shuffle: bool = True
    num_workers: int = Field(4, ge=0)
    max_steps: int = Field(0, ge=0)
    max_epoch: int | None = Field(None, ge=1)
    iters_per_epoch: int | None = Field(None, ge=1)
    init_lr: float | None = Field(None, ge=0)
    min_lr: float | None = Field(None, ge=0)
    warmup_lr: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    beta2: float = Field(0.999, gt=0, lt=1)
    accum_grad_iters: int = Field(1, ge=1)
    amp: bool = True
    seed: int = 42
    output_dir: str = ""
    save_every: int = Field(0, ge=0)
    max_txt_len: int | None = Field(None, ge=1)
    end_sym: str | None = None
    prompt_template: str | None = None

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> TrainSettings:
        if self.data and self.datasets:
            raise ValueError(
                "set either data (one source) or [[train.datasets]] tables (several, mixed by sample_ratio), not both"
            )
        names: dict[str, int] = {}
        for index, dataset in enumerate(self.datasets):
            name = dataset.name or default_dataset_name(dataset.data) or f"dataset{index + 1}"
            if name in names:
                raise ValueError(
                    f"datasets[{names[name]}] and datasets[{index}] are both named {name!r}: "
                    "give each [[train.datasets]] table its own name"
                )
            names[name] = index
            if not dataset.name:
                dataset.name = name
        return self

    @property
    def mixed(self) -> bool:
        """Several sources (``[[train.datasets]]``) rather than one ``data``."""
        return bool(self.datasets)

    @property
    def sources(self) -> list[DatasetSettings]:
        """What the loop mixes: the ``[[train.datasets]]``, or ``data`` as a mix of one (the reference wraps one
        dataset in ``MultiIterLoader`` too), so that one code path reads both."""
        if self.datasets:
            return list(self.datasets)
        name = default_dataset_name(self.data) or "data"
        # model_construct: an unset data (a config loaded without path checks) fails later, naming the setting
        return [
            DatasetSettings.model_construct(name=name, data=self.data, sample_ratio=1.0, batch_size=self.batch_size)
        ]

    def resolved(self, variant: str) -> TrainSettings:
        """A copy with every ``None`` replaced by the reference's value for this stage and variant."""
        values = self.model_dump()
        for key, value in STAGE_RECIPES[self.stage].items():
            if values.get(key) is None:
                values[key] = value
        template, end_sym = VARIANT_TEXT[variant]
        if values["end_sym"] is None:
            values["end_sym"] = "\n" if self.stage == 1 else end_sym
        if values["prompt_template"] is None:
            values["prompt_template"] = "" if self.stage == 1 else template
        if not values["output_dir"]:
            values["output_dir"] = (
                "output/minigpt4_stage1_pretrain" if self.stage == 1 else "output/minigpt4_stage2_finetune"
            )
        for dataset in values["datasets"]:
            if dataset["batch_size"] is None:
                dataset["batch_size"] = values["batch_size"]
        return TrainSettings.model_validate(values)

    @property
    def total_steps(self) -> int:
        """``max_steps``, or ``max_epoch × iters_per_epoch`` when it is 0 (call on a resolved copy)."""
        assert self.max_epoch is not None and self.iters_per_epoch is not None
        return self.max_steps or self.max_epoch * self.iters_per_epoch

    @property
    def checkpoint_every(self) -> int:
        """``save_every``, or once per ``iters_per_epoch`` steps (the reference saves each epoch) when it is 0."""
        assert self.iters_per_epoch is not None
        return self.save_every or self.iters_per_epoch


class TrainConfig(_Strict):
    """The whole ``train.toml``; :func:`load_train_config` returns it resolved (paths absolute, no ``None``)."""

    model: TrainModelSettings = Field(default_factory=TrainModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    source: str = Field("", exclude=True, description="the file it was read from (for messages)")

    @model_validator(mode="after")
    def _stage_text(self) -> TrainConfig:
        if self.train.stage == 2 and self.train.prompt_template is not None and "{}" not in self.train.prompt_template:
            raise ValueError("train.prompt_template must contain {} (where the prompt line goes)")
        return self

    def resolved(self) -> TrainConfig:
        return TrainConfig(model=self.model, train=self.train.resolved(self.model.variant), source=self.source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints (``"config"``) and ``output_dir/config.json``, reference-style sections."""
        run = self.train.model_dump()
        mix = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in run["datasets"]}
        return {
            "model": self.model.model_dump(),
            "run": run,
            "datasets": {"train": mix or run["data"], "eval": run["eval_data"]},
        }


def _error_lines(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        where = where or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return lines


def load_train_config(path: str | os.PathLike[str], *, check_paths: bool = True) -> TrainConfig:
    """Read, validate and resolve ``train.toml``; every problem is reported at once, naming the file.

    With ``check_paths`` the weight files, the data and the prompt file must exist (nothing is read yet).
    """
    config_path = Path(path).expanduser()
    if not config_path.is_file():
        raise TrainConfigError(f"training config not found: {config_path}")
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"{config_path}: not valid TOML: {exc}") from exc
    return config_from_dict(data, config_path.parent, str(config_path), check_paths=check_paths)


def config_from_dict(data: dict[str, Any], base: Path, source: str, *, check_paths: bool = True) -> TrainConfig:
    """Validate a parsed ``train.toml`` (``base`` = folder for relative paths, ``source`` = name for messages).

    Every path comes back absolute (``base`` itself is resolved first), so the ``train_config.json`` a run
    saves — which ``train --resume DIR`` reads — means the same files from any working directory.
    """
    base = Path(base).expanduser().resolve()
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        lines = _error_lines(exc)
        raise TrainConfigError(f"{source}: {len(lines)} invalid setting(s):\n" + "\n".join(lines)) from None
    config.source = source
    for key in _MODEL_PATH_KEYS:
        value = getattr(config.model, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(config.model, key, str(base / value))
    for key in _TRAIN_PATH_KEYS:
        value = getattr(config.train, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(config.train, key, str(base / value))
    for dataset in config.train.datasets:
        if not Path(dataset.data).expanduser().is_absolute():
            dataset.data = str(base / dataset.data)
    config = config.resolved()
    if not config.train.output_dir or not Path(config.train.output_dir).is_absolute():
        config.train.output_dir = str(base / config.train.output_dir)
    if check_paths:
        _check_paths(config)
    return config


def _check_paths(config: TrainConfig) -> None:
    problems: list[str] = []
    model, train = config.model, config.train
    from_scratch = train.stage == 1 and model.variant != "minigptv2"  # an empty projection: a random llama_proj
    for key in ("llm", "vit", "projection") + (("qformer",) if model.variant == "vicuna0" else ()):
        value = getattr(model, key)
        if not value and key == "projection" and from_scratch:
            continue
        if not value:
            problems.append(f"  model.{key}: not set (training needs the original weight files)")
        elif not Path(value).expanduser().exists():
            problems.append(f"  model.{key}: {value} does not exist")
    if not train.data and not train.datasets:
        problems.append(
            "  train.data: not set (a JSONL file, a cc_sbu_align folder or WebDataset *.tar shards; "
            "or several as [[train.datasets]] tables with data and sample_ratio)"
        )
    elif train.data and not data_exists(train.data):
        problems.append(f"  train.data: {train.data} does not exist")
    for index, dataset in enumerate(train.datasets):
        if not data_exists(dataset.data):
            problems.append(f"  train.datasets[{index}].data ({dataset.name}): {dataset.data} does not exist")
    if train.eval_data and not data_exists(train.eval_data):
        problems.append(f"  train.eval_data: {train.eval_data} does not exist")
    if train.stage == 2 and train.prompts and not Path(train.prompts).expanduser().is_file():
        problems.append(f"  train.prompts: {train.prompts} is not a file")
    if train.stage == 1 and train.prompts:
        problems.append("  train.prompts: stage 1 trains without a prompt (the reference's stage-1 recipe); remove it")
    if problems:
        raise TrainConfigError(f"{config.source}: {len(problems)} invalid setting(s):\n" + "\n".join(problems))


def data_exists(spec: str) -> bool:
    """A file, a folder, or a shard pattern (glob or ``{000..009}`` brace range) that matches something."""
    if Path(spec).expanduser().exists():
        return True
    if any(ch in spec for ch in "*?[{"):
        from model.training.data import expand_shards

        return bool(expand_shards(spec))
    return bool(glob.glob(spec))
