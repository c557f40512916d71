"""YAML files and ``section.key=value`` overrides -> the typed :class:`Config` tree.

Strict on purpose: unknown keys fail with the closest valid key, duplicate YAML keys are
refused, and values are type-checked against the schema's hints (an unquoted ``4:00:00``
that YAML reads as an integer is an error, not a silent 14400).

Errors say where the value came from: a command-line override's syntax, YAML, section and
key are checked on their own and the override is named (``command-line override
'train.lrr=1': unknown key 'train.lrr'; did you mean 'lr'?``); a bad value in a file is
prefixed with the file, and with the overrides that set a field the message names
(``configs/tiny.yaml with command-line override 'train.lr=nan': train.lr=nan must be ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_forge.config.schema import Config, _require
from megatron_forge.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` checked (and int->float widened) against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        _require(value in choices, f"{where}={value!r} must be one of {list(choices)}")
        return value
    if origin is list:
        _require(isinstance(value, list), f"{where}={value!r} must be a list")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, f"{where}={value!r} must be a number")
        return float(value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _require(ok, f"{where}={value!r} must be an integer")
        return value
    if hint is bool:
        _require(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if hint is str:
        # Strict on purpose: YAML turns an unquoted 4:00:00 into the integer 14400.
        _require(
            isinstance(value, str),
            f'{where}={value!r} must be a string; quote it in YAML (e.g. "4:00:00")',
        )
        return value
    return value


def _nested_section(hint: Any) -> Optional[type]:
    """The dataclass of a nested mapping's type hint (``X`` or ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        nested = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        return nested[0] if nested else None
    return None


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    _require(isinstance(values, dict), f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        _require(key in names, f"unknown key '{where}.{key}'" + _suggest(key, names))
        hint = hints[key]
        nested = _nested_section(hint)
        if nested is not None and isinstance(value, nested):
            kwargs[key] = value
        elif nested is not None and not (value is None and nested is not hint):
            kwargs[key] = _build_section(nested, value or {}, f"{where}.{key}")
        elif nested is not None:
            kwargs[key] = None  # an optional mapping set to null
        else:
            kwargs[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a validated-per-section Config from a nested dict (as read from YAML)."""
    hints = typing.get_type_hints(Config)
    names = list(hints)
    sections = {}
    for key, value in (values or {}).items():
        _require(key in names, f"unknown section '{key}'" + _suggest(key, names))
        _require(isinstance(value, dict), f"section '{key}' must be a mapping")
        sections[key] = value
    return Config(**{k: _build_section(hints[k], v, k) for k, v in sections.items()})


OVERRIDE = "command-line override"


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value parsed as YAML); ConfigError naming it."""
    _require(
        "=" in item and "." in item.split("=", 1)[0],
        f"{OVERRIDE} {item!r} must look like section.key=value (e.g. train.lr=1e-4)",
    )
    path, raw = item.split("=", 1)
    section, key = path.split(".", 1)
    if raw == "":
        return section, key, None
    try:
        return section, key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
        where = f" at column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"{OVERRIDE} {item!r}: the value {raw!r} is not valid YAML ({problem}{where}); "
            "close its brackets and quotes (e.g. data.blend=[a, b]), or quote a string "
            "value for YAML inside the shell's quotes (e.g. 'logging.dir=\"a: b\"')"
        ) from None


def _check_override_key(item: str, section: str, key: str) -> None:
    """Unknown sections and keys, named as the override (not as a fault of the file);
    ``key`` may reach into a nested mapping (``rope_scaling.factor``)."""
    hints = typing.get_type_hints(Config)
    sections = list(hints)
    _require(
        section in sections,
        f"{OVERRIDE} {item!r}: unknown section '{section}'" + _suggest(section, sections),
    )
    cls, where = hints[section], section
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        _require(
            part in names,
            f"{OVERRIDE} {item!r}: unknown key '{where}.{part}'" + _suggest(part, names),
        )
        where = f"{where}.{part}"
        nested = _nested_section(typing.get_type_hints(cls)[part])
        _require(
            nested is not None or depth == len(parts) - 1,
            f"{OVERRIDE} {item!r}: '{where}' is not a mapping; set it as {where}=VALUE",
        )
        cls = nested


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict.

    Each override's syntax, YAML and key are checked on its own, so a typo is reported as
    the override it is, not as a fault of the config file. Values are checked with the
    file's, by :func:`from_dict` (:func:`load_config` then names the overrides involved).
    """
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for item in overrides:
        section, key, value = _parse_override(item)
        _check_override_key(item, section, key)
        if values.get(section) is None:
            values[section] = {}
        if isinstance(values[section], dict):  # else from_dict names the file's bad section
            _set_nested(values[section], key.split("."), value)
    return values


def _set_nested(values: dict[str, Any], path: list[str], value: Any) -> None:
    """``values[a][b]... = value``, copying (or creating, over a null) each mapping on the
    way so that the caller's dicts are left as they were."""
    for part in path[:-1]:
        inner = values.get(part)
        if not isinstance(inner, dict):  # null (or a bad value, which the override replaces)
            inner = {}
        values[part] = inner = dict(inner)
        values = inner
    values[path[-1]] = value


def _named_overrides(message: str, overrides: list[str]) -> list[str]:
    """The overrides whose ``section.key`` the message names."""
    named = []
    for item in overrides:
        path = item.split("=", 1)[0]
        # A nested key (model.rope_scaling.factor) is also named by its mapping's errors.
        paths = [path] + ([path.rsplit(".", 1)[0]] if path.count(".") > 1 else [])
        if any(re.search(rf"(?<![\w.]){re.escape(p)}(?![\w])", message) for p in paths):
            named.append(item)
    return named


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) and apply overrides."""
    overrides = list(overrides or [])
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _require(path.is_file(), f"config file {path} does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        _require(isinstance(values, dict), f"{path} must hold a mapping of sections")
    values = apply_overrides(values, overrides)
    try:
        return from_dict(values)
    except ConfigError as err:
        if path is None:  # every value is a default or an override: the field says which
            raise
        named = _named_overrides(str(err), overrides)
        where = str(path)
        if named:
            plural = "s" if len(named) > 1 else ""
            where += f" with {OVERRIDE}{plural} " + ", ".join(map(repr, named))
        raise ConfigError(f"{where}: {err}") from None
