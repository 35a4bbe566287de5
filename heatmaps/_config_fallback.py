"""Stand-in for ``hipt.config`` (same names and behaviour for what heatmaps use), used only
while that shared module is not in the tree. Delete this file once ``hipt/config.py`` exists."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per problem."""


class ConfigModel(BaseModel):
    """Base of a config schema: typed fields, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"invalid config: --set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def load_config(
    schema: type[M],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> M:
    """Defaults, then the YAML file, then ``flags``, then ``key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"invalid config: {path}: cannot read ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid config: {path}: must be a mapping")
    raw = _merge(_merge(raw, dict(flags or {})), _overrides(overrides))
    try:
        return schema.model_validate(raw)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{key} = {err.get('input')!r}: {msg}")
        raise ConfigError("invalid config: " + "\n  ".join(lines)) from None


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain data."""
    return cfg.model_dump(mode="json")


def check_name(value: str, what: str) -> str:
    """Stand-in for ``hipt.names.check_name``: ``value`` if safe as one path component."""
    if (
        not isinstance(value, str)
        or not value
        or value.strip() != value
        or value.startswith(".")
        or any(bad in value for bad in ("/", "\\", "..", "\x00"))
    ):
        raise ValueError(
            f"{what} {value!r}: a name that becomes a file or folder name must not contain "
            "'/', '\\', '..' or start with '.'"
        )
    return value
