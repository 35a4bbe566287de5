"""Configuration of ``hipt train``: a typed schema on the shared :mod:`hipt.config` mechanism.

Defaults (this schema), then the cohort YAML, then the named flags, then ``--set key=value``;
every key's type, range and choice is checked, and the model's keyword arguments are checked
against the model builder's signature, before any output is written. The stages downstream read
the resolved config as a plain nested dict (:func:`resolve` / :func:`validate`); it is written as
``config.yaml`` next to the run outputs.

Examples
--------
>>> cfg = validate(merge(default_config(), {"cohort": "lung", "csv": "c.csv", "features_dir": "f"}))
>>> cfg["splits"]["folds"], cfg["train"]["select_on"]
(10, 'loss')
>>> validate(merge(default_config(), {"csv": "c.csv", "features_dir": "f", "train": {"lr": "fast"}}))
Traceback (most recent call last):
...
hipt.config.ConfigError: invalid config: train.lr = 'fast': Input should be a valid number, unable to parse string as a number
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field, field_validator, model_validator

from hipt.config import (
    ConfigError,
    ConfigModel,
    RelPath,
    config_dict,
    config_to_yaml,
    describe_validation_error,
    load_config,
    merge_mappings,
    parse_overrides,
    read_config_file,
)
from hipt.names import check_name

TASKS = ("subtype", "survival")

# Builder arguments the trainer sets from the cohort itself; a config must not set them.
_SET_BY_TRAINER = ("n_classes", "task", "n_bins")


class ModelSection(ConfigModel):
    """The slide model: a registered name and its builder's keyword arguments."""

    name: str = "hipt_gp"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_model_and_arguments(self) -> ModelSection:
        from hipt.models import list_models
        from hipt.models.registry import model_builder

        known = list_models(kind="slide")
        if self.name not in known:
            raise ValueError(
                f"model.name {self.name!r}: not a slide model (known: {', '.join(known)})"
            )
        check_builder_kwargs(model_builder(self.name), self.kwargs, "model.kwargs")
        return self


class SplitsSection(ConfigModel):
    """How cases are split into folds."""

    folds: int | None = Field(None, ge=2)  # default 10 (subtype) / 5 (survival)
    val_fraction: float = Field(0.15, gt=0, lt=1)  # of the non-test cases, stratified
    site_preserving: bool = False  # no tissue-source site in both train and test
    file: RelPath | None = None  # a user split CSV (case_id, fold, role) instead of generating one
    time_bins: int = Field(4, ge=1)  # survival stratification: event × this many time quantiles


class TrainSection(ConfigModel):
    """Optimisation and model selection of each fold."""

    epochs: int = Field(20, ge=1)
    lr: float = Field(2.0e-4, gt=0)
    weight_decay: float = Field(1.0e-5, ge=0)
    accumulate: int = Field(1, ge=1)  # bags per optimiser step (real accumulation)
    balanced_sampling: bool = True  # subtyping: class-balanced sampling
    # loss | auc (subtype) | cindex (survival) | last (the paper's protocol); default loss
    select_on: Literal["loss", "auc", "cindex", "last"] | None = None
    patience: int = Field(5, ge=0)  # epochs without improvement before stopping (0 = never)
    min_epochs: int = Field(1, ge=1)
    # Keep bags in memory after the first read: true, false, or auto (region features only;
    # patch features are ~500x larger).
    cache: bool | Literal["auto"] = "auto"
    max_regions: int | None = Field(None, ge=1)  # sample at most this many regions per bag
    progress: bool = True


class SurvivalSection(ConfigModel):
    """Discrete-time survival loss."""

    n_bins: int = Field(4, ge=1)
    alpha: float = Field(0.0, ge=0, le=1)


class TrainConfig(ConfigModel):
    """Every setting of ``hipt train`` (see ``train/README.md``)."""

    cohort: str | None = None  # name; runs go to <out>/<cohort>/ (default: the CSV's stem)
    task: Literal["subtype", "survival"] = "subtype"
    csv: RelPath | None = None  # cohort CSV
    features_dir: RelPath | None = None  # folder of features/<slide_id>.h5
    label_map: dict[str, int] | None = None  # subtyping: {label: class index}; default: sorted
    out: str = "runs"
    seed: int = 1
    device: str = "cpu"
    # CPU threads for torch. Bags are small, so one thread per process is fastest and avoids
    # oversubscribing shared nodes; 0 keeps torch's default (e.g. hipt_lgp on a big node).
    threads: int = Field(1, ge=0)
    model: ModelSection = Field(default_factory=ModelSection)
    splits: SplitsSection = Field(default_factory=SplitsSection)
    train: TrainSection = Field(default_factory=TrainSection)
    survival: SurvivalSection = Field(default_factory=SurvivalSection)

    @field_validator("cohort")
    @classmethod
    def _cohort_is_a_safe_name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "cohort")

    @model_validator(mode="after")
    def _task_defaults(self) -> TrainConfig:
        missing = [k for k in ("csv", "features_dir") if not getattr(self, k)]
        if missing:
            raise ValueError(f"{' and '.join(missing)}: required (in the config or as a flag)")
        if not self.cohort:
            self.cohort = check_name(Path(str(self.csv)).stem, "cohort (the CSV's name)")
        if self.splits.folds is None:
            self.splits.folds = 10 if self.task == "subtype" else 5
        if self.train.select_on is None:
            self.train.select_on = "loss"
        allowed = ("loss", "auc", "last") if self.task == "subtype" else ("loss", "cindex", "last")
        if self.train.select_on not in allowed:
            raise ValueError(
                f"train.select_on = {self.train.select_on!r}: for task {self.task} one of "
                f"{', '.join(allowed)}"
            )
        return self


def check_builder_kwargs(builder: Any, kwargs: Mapping[str, Any], key: str) -> None:
    """Check keyword arguments against a model builder's signature: names and types.

    Raises ``ValueError`` naming the first wrong ``key.argument``, its value and what is allowed.
    """
    params = inspect.signature(builder).parameters
    allowed = [
        n
        for n, p in params.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in _SET_BY_TRAINER
    ]
    hints = typing.get_type_hints(builder)
    for name, value in kwargs.items():
        if name in _SET_BY_TRAINER:
            raise ValueError(f"{key}.{name}: set by hipt train from the cohort; remove it")
        if name not in allowed:
            raise ValueError(f"{key}.{name}: unknown argument (allowed: {', '.join(allowed)})")
        if name in hints:
            try:
                pydantic.TypeAdapter(hints[name]).validate_python(value)
            except pydantic.ValidationError as exc:
                reason = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(f"{key}.{name} = {value!r}: {reason}") from None


# Keys inside free-form mappings that are paths, resolved against the YAML file's folder.
_RELATIVE_KEYS = ("model.kwargs.vit4k_weights",)


def resolve(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults → YAML file → named flags → ``--set`` items, validated; a plain nested dict."""
    cfg = load_config(TrainConfig, path, overrides, flags, relative_keys=_RELATIVE_KEYS)
    return config_dict(cfg)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A cohort YAML as a dict, its relative paths resolved against its folder (not validated)."""
    return read_config_file(path, TrainConfig, relative_keys=_RELATIVE_KEYS)


def default_config() -> dict[str, Any]:
    """The defaults as a plain nested dict (a fresh copy each call; not yet validated)."""
    return config_dict(TrainConfig.model_construct())


def merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else replaces."""
    return merge_mappings(dict(base), override or {})


def apply_dotlist(cfg: Mapping[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML)."""
    return merge(cfg, parse_overrides(items))


def validate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a merged config dict and fill the task-dependent defaults.

    Raises :class:`hipt.config.ConfigError` (a ``ValueError``) listing every problem.
    """
    try:
        return config_dict(TrainConfig.model_validate(dict(cfg)))
    except pydantic.ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, TrainConfig)) from None


def to_yaml(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text (key order kept)."""
    return config_to_yaml(cfg)
