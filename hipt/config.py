"""One configuration mechanism for every command that takes a config file (train, pretrain, heatmap).

A command describes its settings as a :class:`ConfigModel` (a pydantic model: every key typed,
ranges and choices stated, unknown keys refused). :func:`load_config` layers the sources in one
order: the schema's defaults, then the YAML file, then the command's named flags, then
``--set key=value`` overrides. The whole result is checked before the command writes anything,
and every problem comes back as one line naming the dotted key, the value and what is allowed.
:func:`save_config` writes the resolved config next to the outputs.

Examples
--------
>>> from pydantic import Field
>>> class Optim(ConfigModel):
...     lr: float = Field(1e-3, gt=0)
>>> class Run(ConfigModel):
...     name: str = "demo"
...     optim: Optim = Optim()
>>> load_config(Run, overrides=["optim.lr=0.01"]).optim.lr
0.01
>>> load_config(Run, overrides=["optim.lr=fast"])
Traceback (most recent call last):
...
hipt.config.ConfigError: invalid config: optim.lr = 'fast': Input should be a valid number, unable to parse string as a number
"""

from __future__ import annotations

import argparse
import copy
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict

from hipt.atomic import write_text_atomic

__all__ = [
    "ConfigError",
    "ConfigModel",
    "RelPath",
    "add_set_argument",
    "config_dict",
    "config_to_yaml",
    "describe_validation_error",
    "load_config",
    "merge_mappings",
    "parse_overrides",
    "read_config_file",
    "save_config",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per problem."""


class ConfigModel(BaseModel):
    """Base of every command's config schema: typed fields, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class _RelativeToConfigFile:
    """Marks a string field as a path that a YAML file may give relative to its own folder."""

    def __repr__(self) -> str:
        return "RelPath"


#: A path given in a YAML file relative to that file's folder (absolute after loading).
RelPath = Annotated[str, _RelativeToConfigFile()]

M = TypeVar("M", bound=BaseModel)


def load_config(
    schema: type[M],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    *,
    relative_keys: Sequence[str] = (),
) -> M:
    """Resolve a command's config: defaults, then the YAML file, then flags, then overrides.

    Parameters
    ----------
    schema : type of ConfigModel
        The command's settings; its field defaults are the first layer.
    path : str or PathLike, optional
        A YAML mapping. Fields typed :data:`RelPath` (and the dotted ``relative_keys``) that it
        gives as relative paths are resolved against its folder.
    overrides : sequence of str
        ``key.sub=value`` items (``--set``); values are parsed as YAML (numbers, lists, null...).
    flags : mapping, optional
        A nested dict from the command's named flags (``{"train": {"epochs": 3}}``); paths in it
        are taken as given (relative to the working directory).
    relative_keys : sequence of str
        Dotted keys inside free-form mappings that are paths too (e.g. ``model.kwargs.weights``).

    Returns
    -------
    ConfigModel
        The validated config.

    Raises
    ------
    ConfigError
        One line per problem: an unreadable file, a malformed ``--set``, an unknown key, a wrong
        type or value (naming the key, the value and what is allowed).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(path, schema, relative_keys=relative_keys)
    raw = merge_mappings(raw, dict(flags or {}))
    raw = merge_mappings(raw, parse_overrides(overrides))
    try:
        return schema.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, schema)) from None


def read_config_file(
    path: str | os.PathLike[str],
    schema: type[BaseModel] | None = None,
    *,
    relative_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """A YAML config file as a dict, its relative paths made absolute against its folder.

    The paths are the ``schema``'s :data:`RelPath` fields and the dotted ``relative_keys``.
    Raises :class:`ConfigError` for an unreadable file, bad YAML or a non-mapping.
    """
    data = _read_yaml(Path(path))
    fields = _path_fields(schema) if schema is not None else []
    _resolve_relative(data, fields + list(relative_keys), Path(path).resolve().parent)
    return data


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The ``--set KEY=VALUE`` option every config-taking command shares (into ``overrides``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. {example} (repeatable)",
    )


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"invalid config: --set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text  # not YAML (e.g. an unbalanced bracket): keep the text as it was typed
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain data (dicts, lists, strings, numbers), as it is written to YAML."""
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: BaseModel | Mapping[str, Any]) -> str:
    """The config as YAML text, keys in schema order."""
    data = config_dict(cfg) if isinstance(cfg, BaseModel) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def save_config(cfg: BaseModel | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, config_to_yaml(cfg))
    return path


# --------------------------------------------------------------------------- internals
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def merge_mappings(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge (a new dict): mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_relative(data: dict[str, Any], keys: Sequence[str], folder: Path) -> None:
    """Make the relative paths at dotted ``keys`` absolute, against ``folder`` (in place)."""
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        value = node.get(leaf)
        if isinstance(value, str) and value:
            node[leaf] = _absolute(value, folder)
        elif isinstance(value, list):  # a list of paths
            node[leaf] = [_absolute(v, folder) if isinstance(v, str) and v else v for v in value]


def _absolute(path: str, folder: Path) -> str:
    return path if os.path.isabs(path) else str((folder / path).resolve())


def _path_fields(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields typed RelPath, in nested sections too."""
    found = []
    for name, field in schema.model_fields.items():
        annotations = [field.annotation, *[m for m in field.metadata]]
        if any(isinstance(m, _RelativeToConfigFile) for m in field.metadata) or any(
            _mentions_relpath(a) for a in annotations
        ):
            found.append(prefix + name)
        for sub in _section_types(field.annotation):
            found += _path_fields(sub, f"{prefix}{name}.")
    return found


def _mentions_relpath(annotation: Any) -> bool:
    if isinstance(annotation, _RelativeToConfigFile):
        return True
    if typing.get_origin(annotation) is Annotated:
        return any(isinstance(m, _RelativeToConfigFile) for m in typing.get_args(annotation)[1:])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return any(_mentions_relpath(a) for a in typing.get_args(annotation))
    return False


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    """The nested config models a field holds (``Section`` or ``Section | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _section_types(a)]
    return []


def describe_validation_error(exc: pydantic.ValidationError, schema: type[BaseModel]) -> str:
    """pydantic's errors as ``invalid config: key = value: reason`` lines, one per key."""
    by_key: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc[:-1])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            line = f"{key}: unknown key{hint}"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            line = f"{key} = {err['input']!r}: must be a mapping of keys (a section)"
        elif err["type"] == "missing":
            line = f"{key}: required"
        elif err["type"] == "value_error" or not loc:
            # Raised by a schema's own validator, whose message names the key and value itself.
            line = err["msg"].removeprefix("Value error, ")
        else:
            line = f"{key} = {err['input']!r}: {err['msg']}"
        by_key.setdefault(key, []).append(line)
    lines = []
    for found in by_key.values():
        # A value that fits no member of a union (``bool | "auto"``) fails once per member.
        reasons = [line.split(": ", 1)[1] if " = " in line else line for line in found[1:]]
        lines.append(" or ".join([found[0], *(r for r in reasons if r not in found[0])]))
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _is_union_tag(part: object) -> bool:
    # pydantic puts the member type of a union into an error's location ("bool",
    # "literal['auto']", "list[int]"); it is not a key.
    return isinstance(part, str) and (
        part in ("bool", "int", "float", "str", "none", "list", "dict") or "[" in part
    )


def _allowed_keys(schema: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    model: type[BaseModel] | None = schema
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        sections = _section_types(field.annotation) if field else []
        model = sections[0] if sections else None
    return list(model.model_fields) if model else []
