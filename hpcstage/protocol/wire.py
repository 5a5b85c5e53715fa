"""Typed messages as JSON objects and back: ``to_wire`` and a strict ``from_wire``.

A message is a frozen dataclass whose fields are JSON-shaped: ``str``, ``int``, ``float``,
``bool``, a ``StrEnum``, another message, ``list[T]``, ``dict[str, T]``, ``T | None``, or
``Any`` (JSON the receiver hands on without reading it). Decoding is strict, because a
field one side sends and the other never reads (or reads under another name, or with a
value it never gets) is a bug that no type checker sees across a process boundary:
an unknown field, a missing required field, a value of the wrong type or an enum value
the receiver does not know is a ``ProtocolError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar, cast

from hpcstage.errors import ProtocolError

T = TypeVar("T")


def to_wire(message: Any) -> Any:
    """A message (or any value of a message field) as plain JSON values."""
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {f.name: to_wire(getattr(message, f.name)) for f in dataclasses.fields(message)}
    if isinstance(message, enum.Enum):
        return message.value
    if isinstance(message, list | tuple):
        return [to_wire(v) for v in message]
    if isinstance(message, dict):
        return {str(k): to_wire(v) for k, v in message.items()}
    return message


def from_wire(cls: type[T], data: Any) -> T:
    """``data`` (parsed JSON) as a ``cls``; ProtocolError if it is not exactly one."""
    return cast(T, _decode(cls, data, cls.__name__))


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    """The field types of a message class (resolved once: annotations are strings here)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _decode_optional(tp, value, where)
    if origin is list:
        return [
            _decode(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in _items(value, where)
        ]
    if origin is dict:
        item = typing.get_args(tp)[1]
        return {k: _decode(item, v, f"{where}.{k}") for k, v in _object(value, where).items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_message(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _decode_enum(tp, value, where)
    return _decode_scalar(tp, value, where)


def _decode_optional(tp: Any, value: Any, where: str) -> Any:
    others = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(others) != 1:  # a programming error in a message type, not in a message
        raise TypeError(f"{where}: only `T | None` unions have a wire form, not {tp}")
    if value is None and len(others) < len(typing.get_args(tp)):
        return None
    return _decode(others[0], value, where)


def _decode_message(cls: type[Any], value: Any, where: str) -> Any:
    found = _object(value, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(found) - set(fields))
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(unknown)}")
    hints, args = _hints(cls), {}
    for name, f in fields.items():
        if name in found:
            args[name] = _decode(hints[name], found[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: missing field {name}")
    return cls(**args)


def _decode_enum(cls: type[enum.Enum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in cls)
        raise ProtocolError(f"{where}: {value!r} is none of {known}") from None


def _decode_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python, but a JSON true is no count of anything.
    if tp is int and isinstance(value, bool):
        raise ProtocolError(f"{where}: expected int, got bool")
    if tp in (str, int, bool) and isinstance(value, tp):
        return value
    if tp is type(None) and value is None:
        return None
    if tp not in (str, int, bool, float, type(None)):
        raise TypeError(f"{where}: {tp!r} has no wire form")
    raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _items(value: Any, where: str) -> typing.Iterable[tuple[int, Any]]:
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
    return enumerate(value)
