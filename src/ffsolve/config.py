"""Experiment configs: frozen dataclasses filled from YAML files and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ffsolve.errors import ConfigError

__all__ = ["Config", "check_config", "config_to_dict", "load_config", "spec"]

C = TypeVar("C")


def _check_value(cls: type, name: str, value: Any, hint: Any) -> Any:
    """Coerce int -> float and check the value against the field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(cls, name, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{cls.__name__}.{name}: {value!r} does not match {hint}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_check_value(cls, name, v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-7 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{cls.__name__}.{name}: expected an int, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        got = f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"{cls.__name__}.{name}: expected {hint.__name__}, got {got}")
    return value


def spec(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    doc: str = "",
) -> Any:
    """A config field with its valid range or choices declared next to its default.

    For a list or tuple field the bounds and choices apply to every item; None always passes
    when the field's type allows it. A bounded number must also be finite (NaN and +-inf are
    refused, whatever the bounds).

    Example:
        >>> batch: int = spec(100, ge=1)
        >>> dtype: str = spec("float32", choices=("float32", "float64"))
    """
    rule = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    return dataclasses.field(default=default, metadata={"ffsolve": rule})


def _allowed(rule: dict[str, Any]) -> str:
    if rule.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in rule["choices"])
    parts = [
        f"{sym} {rule[key]}"
        for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if rule.get(key) is not None
    ]
    return " and ".join(parts)


def _bounded(rule: dict[str, Any]) -> bool:
    return any(rule.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def _violates(rule: dict[str, Any], v: Any) -> bool:
    if rule.get("choices") is not None:
        return v not in rule["choices"]
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    if not math.isfinite(v):  # NaN, and infinities (never a meant tolerance, rate or budget)
        return _bounded(rule)
    return (
        (rule.get("ge") is not None and not v >= rule["ge"])
        or (rule.get("gt") is not None and not v > rule["gt"])
        or (rule.get("le") is not None and not v <= rule["le"])
        or (rule.get("lt") is not None and not v < rule["lt"])
    )


def check_config(config: Any) -> None:
    """Check every field declared with `spec` against its range or choices (ConfigError)."""
    for f in dataclasses.fields(config):
        rule = f.metadata.get("ffsolve")
        if not rule:
            continue
        value = getattr(config, f.name)
        items = value if isinstance(value, list | tuple) else [value]
        for v in items:
            if v is not None and _violates(rule, v):
                finite = "finite numbers " if isinstance(v, float) and _bounded(rule) else ""
                raise ConfigError(
                    f"{type(config).__name__}.{f.name}={value!r} is out of range: "
                    f"allowed {finite}{_allowed(rule)}"
                )


class Config:
    """Base of config dataclasses: ranges declared with `spec` are checked on construction,
    so YAML, `--set` and the Python API are validated alike."""

    def __post_init__(self) -> None:
        check_config(self)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps
    the last one silently)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Build a config dataclass from defaults, an optional YAML file, then `key=value`
    overrides (values parsed as YAML). Unknown keys and ill-typed values raise ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of field: value")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem})"
            ) from None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid: {', '.join(sorted(fields))}"
        )
    checked = {k: _check_value(cls, k, v, hints[k]) for k, v in values.items()}
    return cls(**checked)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (tuples become lists, for YAML and JSON)."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
