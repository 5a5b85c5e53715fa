"""Problems in a site file, in TOML's vocabulary: ``site.toml:14: cache.high_watermark: ...``.

:func:`find_problems` collects every mistake at once: keys that look like credentials (refused
anywhere: S3 credentials come from the usual AWS sources, a PostgreSQL password from libpq's),
and pydantic's validation errors reworded ("must be an integer, got '22'", "unknown key (did
you mean 'endpoint_url'?)"), each placed on its line by
:func:`~hpcstage.config.tomlfile.locate_keys`.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from hpcstage.config.fields import CREDENTIAL_HELP, CREDENTIAL_WORDS
from hpcstage.config.schema import Settings
from hpcstage.config.tomlfile import Loc, dotted, line_of, locate_keys


@dataclass(frozen=True)
class Problem:
    """One mistake: where (key path, line if known) and what is wrong.

    Every problem is an error today (the file does not load); ``severity`` is in the JSON of
    ``hpcstage config check --json`` so that warnings can join without changing its shape.
    """

    loc: Loc
    message: str
    line: int | None = None
    severity: str = "error"

    def render(self, source: str) -> str:
        """``source:line: key: message``, one printable line."""
        where = f"{source}:{self.line}" if self.line else source
        key = dotted(self.loc)
        message = _capped(self.message)
        return f"{where}: {key}: {message}" if key else f"{where}: {message}"

    def as_dict(self) -> dict[str, Any]:
        """For JSON: severity, key (dotted, null for the whole file), line, message."""
        return {
            "severity": self.severity,
            "key": dotted(self.loc) or None,
            "line": self.line,
            "message": self.message,
        }


def _capped(text: str, limit: int = 300) -> str:
    """A problem line stays one readable line, whatever value it quotes."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else f"{safe[:limit]}... ({len(text)} characters)"


def find_problems(data: dict[str, Any], text: str) -> list[Problem]:
    """Every problem of the parsed TOML ``data`` (from ``text``), in line order."""
    secrets = set(_credential_locs(data))
    found = [Problem(loc, CREDENTIAL_HELP) for loc in sorted(secrets, key=str)]
    try:
        Settings.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        found += [_from_pydantic(e) for e in errors if tuple(e["loc"]) not in secrets]
    lines = locate_keys(text)
    placed = [Problem(p.loc, p.message, line_of(p.loc, lines)) for p in found]
    return sorted(placed, key=lambda p: p.line if p.line is not None else math.inf)


def syntax_problem(exc: tomllib.TOMLDecodeError, text: str) -> Problem:
    """tomllib's error as one problem of the whole file, with its line and column."""
    message = str(exc)
    # Python 3.14 exposes lineno/colno; older versions only put them at the end of the message.
    match = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    line, column = (int(match[1]), int(match[2])) if match else (None, None)
    message = message[: match.start()] if match else message
    if message.endswith(" (at end of document)"):
        message, line = message.removesuffix(" (at end of document)"), len(text.splitlines())
    line = getattr(exc, "lineno", line)
    column = getattr(exc, "colno", column)
    suffix = f" (column {column})" if column else ""
    return Problem((), f"invalid TOML: {getattr(exc, 'msg', message)}{suffix}", line or None)


# ---------------------------------------------------------------------------------------------
# Turning pydantic's errors into messages in TOML's vocabulary.
# ---------------------------------------------------------------------------------------------

_TYPE_MESSAGES: Final = {
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
}


def _from_pydantic(error: ErrorDetails) -> Problem:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "missing":
        return Problem(loc, "missing required " + ("section" if len(loc) == 1 else "key"))
    if kind == "extra_forbidden":
        return Problem(loc, _unknown_key(loc, value))
    if kind == "value_error":
        return Problem(loc, str(error.get("ctx", {}).get("error", error["msg"])))
    message = _TYPE_MESSAGES.get(kind) or error["msg"].replace("Input should be", "must be", 1)
    return Problem(loc, f"{message}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _unknown_key(loc: Loc, value: Any) -> str:
    what = "unknown section" if isinstance(value, dict) and len(loc) == 1 else "unknown key"
    key = str(loc[-1])
    close = difflib.get_close_matches(key, _field_names(loc[:-1]), n=1, cutoff=0.6)
    if close:
        return f"{what} (did you mean {close[0]!r}?)"
    homes = [dotted(section) for section in _sections_with(key)]
    return f"{what} (it belongs in [{homes[0]}])" if homes else what


def _field_names(loc: Loc) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # an element of a list of tables: same model as the list
        field = model.model_fields.get(part)
        inner = _inner_model(field.annotation) if field else None
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation if issubclass(annotation, BaseModel) else None
    for arg in get_args(annotation):
        if (found := _inner_model(arg)) is not None:
            return found
    return None


def _sections_with(key: str) -> Iterator[Loc]:
    for name, field in Settings.model_fields.items():
        model = _inner_model(field.annotation)
        if model is not None and key in model.model_fields:
            yield (name,)


def _credential_locs(data: Mapping[str, Any], path: Loc = ()) -> Iterator[Loc]:
    if path == ("quotas", "accounts"):
        return  # account names, not settings
    for key, value in data.items():
        loc = (*path, key)
        if any(word in key.lower().replace("-", "_") for word in CREDENTIAL_WORDS):
            yield loc
        elif isinstance(value, dict):
            yield from _credential_locs(value, loc)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _credential_locs(item, (*loc, index))
