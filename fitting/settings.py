"""The one reader of settings: a mapping (YAML, command-line flags, a saved config) in, a typed
dataclass out, and the dataclass back to plain data.

Fields are read by their annotations: nested dataclasses, lists and tuples, dicts with string
keys, optional values, and bool, int, float and str, each read the same way everywhere:
- an int from an int, an integral float or a string of one ('12', '1e3'), never from a bool;
- a float from a number or a numeric string ('1e-4', which YAML leaves a string), never a bool;
- a bool from a bool, 0 or 1, or one of true/false, yes/no, on/off, 1/0 in any case;
- a str from a string or a number.
An empty section (None in YAML) reads as an empty mapping. Unknown keys are errors. Every error is one line that names its place, e.g.
`config.fit.smplify.stages[1].iterations: cannot read 'x' as int`. What is semantic (a range, a
name from a registry) stays with each class, in its `__post_init__`.
"""
from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

import yaml

from fitting.errors import BadInput

T = TypeVar("T")
TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


class Settings:
    """Base of the settings dataclasses: `from_dict` and `to_dict` through this module.
    SECTION names the settings in errors when the caller gives no place."""

    SECTION: ClassVar[str] = "settings"

    @classmethod
    def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
        return from_mapping(cls, data, where or cls.SECTION)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def from_mapping(kind: type[T], data: Any, where: str) -> T:
    """An instance of the dataclass `kind` from `data`, read field by field (see the module
    docstring); an instance of `kind` is taken as it is."""
    if isinstance(data, kind):
        return data
    if not isinstance(data, Mapping):
        raise BadInput(f"{where}: expected a mapping, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind) if f.init}
    unknown = [str(key) for key in data if key not in fields]
    if unknown:
        raise BadInput(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(repr(k) for k in unknown)} (known: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:
        raise BadInput(f"{where}: missing key {', '.join(repr(k) for k in missing)}")
    hints = typing.get_type_hints(kind)
    values = {name: read_value(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return kind(**values)
    except BadInput as exc:
        message = str(exc)
        raise BadInput(message if message.startswith(where) else f"{where}: {message}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def read_value(kind: Any, value: Any, where: str) -> Any:
    """`value` read as the annotation `kind`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: no reader for {kind}")
        return read_value(options[0], value, where)
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, {} if value is None else value, where)  # an empty YAML section
    if origin in (list, tuple):
        return _read_sequence(origin, args, value, where)
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            raise BadInput(f"{where}: expected a mapping, found {type(value).__name__}")
        key_kind, item_kind = args or (Any, Any)
        return {read_value(key_kind, k, where): read_value(item_kind, v, f"{where}.{k}") for k, v in value.items()}
    if kind in _SCALARS:
        return _SCALARS[kind](value, where)
    raise TypeError(f"{where}: no reader for {kind}")


def _read_sequence(origin: type, args: tuple, value: Any, where: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise BadInput(f"{where}: expected a list, found {type(value).__name__}")
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[float, float]
        if len(value) != len(args):
            raise BadInput(f"{where}: expected {len(args)} values, found {len(value)}")
        return tuple(read_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [read_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _cannot(value: Any, kind: type, where: str) -> BadInput:
    return BadInput(f"{where}: cannot read {value!r} as {kind.__name__}")


def _read_int(value: Any, where: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    try:
        number = _read_float(value, where)   # '12', '1e3', 12.0
    except BadInput:
        raise _cannot(value, int, where) from None
    if not number.is_integer():
        raise _cannot(value, int, where)
    return int(number)


def _read_float(value: Any, where: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value.strip())          # YAML leaves '1e-4' a string
    except (AttributeError, ValueError):
        raise _cannot(value, float, where) from None


def _read_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise _cannot(value, bool, where)


def _read_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    raise _cannot(value, str, where)


_SCALARS = {bool: _read_bool, int: _read_int, float: _read_float, str: _read_str}


def to_mapping(settings: Any) -> dict[str, Any]:
    """A settings dataclass as plain data (tuples as lists) that `from_mapping` reads back;
    fields that are not constructor arguments (derived ones) are left out."""
    return {f.name: _plain(getattr(settings, f.name)) for f in dataclasses.fields(settings) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else to_mapping(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML text (a config file, a flag's value) with a one-line error naming `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"{where}: not valid YAML ({' '.join(str(exc).split())[:160]})") from None
