"""Malformed requests for every route of the API, drawn from the FastAPI app itself.

Shared by the unit test (the app as ASGI over a fake daemon) and the integration test (the
real daemon over HTTP). Each case spoils one parameter of one route and keeps the others
valid, so the answer has to be about that parameter: a status below 500 and, when the
request is refused as malformed (400 or 422), a body that names the parameter.

The routes are read from the app's OpenAPI schema: a new route, or a new parameter of one, is
covered without editing this file (routes hidden from the schema are not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

HUGE = 20_000  # characters of a huge value (under uvicorn's limit of a request line)

# Values written into a URL (path, query or header), already percent-encoded where needed.
BAD_TEXT: tuple[str, ...] = (
    "-1",
    "abc",
    "1.5",
    "1e999",
    "nan",
    "-inf",
    "9" * 40,  # an integer no database column holds
    "",
    "%ff%fe",  # not UTF-8 once decoded
    "%00",
    "s3://",
    "s3://results/project/run1/",
    "s3://No_Such..Bucket/x",
    "..%2F..%2Fetc%2Fpasswd",
    "x" * HUGE,
)
# Values for one field of a JSON body.
BAD_FIELDS: tuple[Any, ...] = (
    None,
    1,
    -1,
    1.5,
    True,
    [],
    {},
    [1],
    ["\ud800"],
    "",
    "\ud800",  # a lone surrogate: valid JSON, not encodable as UTF-8
    "s3://",
    "s3://No_Such..Bucket/x",
    "x" * HUGE,
    ["n1"] * 10_000,
)
# Whole bodies that are not the model.
BAD_BODIES: tuple[bytes, ...] = (
    b"",
    b"not json",
    b"\xff\xfe{}",
    b"[]",
    b'"x"',
    b"1",
    b"null",
    b"{}",
    b'{"a": ' * 2000,
)


@dataclass(frozen=True)
class Case:
    """One request: ``param`` is the parameter it spoils."""

    method: str
    raw_path: str  # percent-encoded, ASCII
    query: str  # percent-encoded, ASCII
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    param: str

    def describe(self) -> str:
        shown = f"{self.method} {self.raw_path[:80]}?{self.query[:80]}"
        return f"{shown} body={(self.body or b'')[:80]!r} ({self.param})"


# A value each path parameter may take that the fake and the real daemon both accept or
# refuse with a 4xx: job 41 of the unit tests' database, node n1 of both.
GOOD_PATH = {"integer": "41", "string": "n1"}


@dataclass(frozen=True)
class Route:
    """One operation of the app's OpenAPI schema: what FastAPI itself validates against."""

    method: str
    path: str  # with {name} parts
    params: list[dict[str, Any]]  # OpenAPI parameter objects (name, in, schema)
    body: dict[str, Any] | None  # the JSON body's schema, references resolved


def routes(schema: dict[str, Any]) -> list[Route]:
    """Every operation of an app's OpenAPI schema (``app.openapi()``, or a daemon's
    /openapi.json): public, and it holds the routes of included routers and the parameters
    of dependencies too."""
    found = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            found.append(
                Route(
                    method.upper(),
                    path,
                    op.get("parameters", []),
                    _resolve(schema, body["schema"]) if body else None,
                )
            )
    return found


def _resolve(schema: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in ref:
        return ref
    found: dict[str, Any] = schema
    for part in ref["$ref"].removeprefix("#/").split("/"):
        found = found[part]
    return found


def cases(schema: dict[str, Any]) -> Iterator[Case]:
    """Every malformed request of every route of the OpenAPI ``schema``."""
    for route in routes(schema):
        yield from _route_cases(route)


def _route_cases(route: Route) -> Iterator[Case]:
    where = {p["name"]: p["in"] for p in route.params}
    good = {
        p["name"]: GOOD_PATH.get(p.get("schema", {}).get("type", ""), "n1")
        for p in route.params
        if p["in"] == "path"
    }
    body = _good_body(route.body)
    path = _path(route.path, good)
    for name, place in where.items():
        for bad in BAD_TEXT:
            if place == "path":
                yield Case(route.method, _path(route.path, {**good, name: bad}), "", (), body, name)
            elif place == "query":
                yield Case(route.method, path, f"{name}={bad}", (), body, name)
            elif place == "header" and len(bad) < 1000 and "%" not in bad:
                yield Case(route.method, path, "", ((name, bad),), body, name)
    yield from _body_cases(route.method, path, body)


def _body_cases(method: str, path: str, good: bytes | None) -> Iterator[Case]:
    if good is None:
        return
    for raw in BAD_BODIES:
        yield Case(method, path, "", (), raw, "body")
    fields = json.loads(good)
    for name in fields:
        for bad in BAD_FIELDS:
            spoilt = json.dumps({**fields, name: bad}).encode()
            yield Case(method, path, "", (), spoilt, name)


# A valid value of a body field without a default, by its JSON type.
GOOD_FIELD: dict[str, Any] = {
    "array": ["n1"],
    "boolean": False,
    "integer": 1,
    "number": 1,
    "string": "s3://results/x",
}


def _good_body(schema: dict[str, Any] | None) -> bytes | None:
    """A valid body for the route's model: each field's first example (``Field(examples=)``,
    for a field whose valid values are narrower than its type), else its default, else a
    value of its type."""
    if schema is None:
        return None
    value = {name: _good_field(field) for name, field in schema.get("properties", {}).items()}
    return json.dumps(value).encode()


def _good_field(field: dict[str, Any]) -> Any:
    if field.get("examples"):
        return field["examples"][0]
    if "default" in field:
        return field["default"]
    return GOOD_FIELD[field.get("type", "string")]


def _path(template: str, values: dict[str, str]) -> str:
    """``template`` with its ``{name}`` parts replaced (values percent-encoded already,
    a '/' in one encoded so it stays one segment)."""
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", quote(value, safe="%"))
    return out


def names_param(status: int, body: bytes, param: str) -> bool:
    """Whether a refusal names the parameter it is about (other answers need not)."""
    if status not in (400, 422):
        return True
    return param.lower() in body.decode("utf-8", "replace").lower()
