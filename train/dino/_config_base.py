"""Stand-in for ``hipt.config`` (same API) until the shared config module is on this branch.

Delete this file when ``hipt.config`` lands; :mod:`train.dino.config` imports from there first.
Only what pretraining uses: ``ConfigModel``, ``RelPath``, ``ConfigError``, ``load_config``,
``save_config``, ``config_dict``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import pydantic
import yaml

from hipt.atomic import write_text_atomic


class ConfigError(ValueError):
    """A bad configuration: one line per problem, naming the dotted key, the value and the rule."""


class ConfigModel(pydantic.BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class _RelMarker:
    """Marks a path field that a YAML file's value resolves against that file's folder."""


RelPath = Annotated[Path, _RelMarker()]


def _is_rel(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return any(isinstance(m, _RelMarker) for m in get_args(annotation)[1:])
    return any(_is_rel(a) for a in get_args(annotation))


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _resolve_paths(schema: type[pydantic.BaseModel], data: dict, base: Path) -> None:
    for name, field in schema.model_fields.items():
        if name not in data or data[name] is None:
            continue
        if _is_rel(field.annotation) and isinstance(data[name], str | os.PathLike):
            p = Path(data[name]).expanduser()
            data[name] = str(p if p.is_absolute() else base / p)
            continue
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(data[name], dict):
            _resolve_paths(sub, data[name], base)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_set(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.lr=0.001)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not YAML ({exc})") from None


def _messages(exc: pydantic.ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {err['input']!r}: {err['msg']}")
    return "\n".join(lines)


def load_config(
    schema: type[pydantic.BaseModel],
    path: str | os.PathLike | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    flags: dict | None = None,
) -> Any:
    """Defaults → YAML file → ``flags`` → ``--set key=value`` strings, checked by ``schema``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        _resolve_paths(schema, loaded, path.parent.resolve())
        data = _merge(data, loaded)
    if flags:
        data = _merge(data, flags)
    for item in overrides:
        _apply_set(data, item)
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}bad configuration\n{_messages(exc)}") from None


def config_dict(cfg: pydantic.BaseModel) -> dict:
    """The plain nested dict of a config (paths as strings)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: pydantic.BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))
