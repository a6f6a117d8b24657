"""The one field error (proxy.errors.InvalidField) and the control plane's one error
middleware (proxy/control/_errors.py): every refusal is JSON with a reason and the
request id, whatever the handler raised."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from proxy.control._app import _refusal_bytes, admin_auth
from proxy.control._errors import INTERNAL_REASON, json_error, json_errors
from proxy.control._keys import STATE, ControlState
from proxy.control._session import CSRF_HEADER, Sessions
from proxy.errors import (
    Conflict,
    FieldPath,
    InvalidField,
    NotFound,
    Unavailable,
    format_path,
)
from proxy.gateway import REQUEST_ID_HEADER

TOKEN = "admin-token"


# -- the field error -----------------------------------------------------------------
@pytest.mark.parametrize(("path", "text"), [
    ((), ""),
    (("host",), "host"),
    (("paths", 0), "paths[0]"),
    (("rules", 2, "paths", 0), "rules[2].paths[0]"),
    (("rules", 0, "mcp", "args", "q", "pattern"), "rules[0].mcp.args.q.pattern"),
    ((1, "id"), "[1].id"),
    (('workloads["spiffe://acme.dev/a"].ceiling[0]', "host"),
     'workloads["spiffe://acme.dev/a"].ceiling[0].host'),
])
def test_format_path(path: FieldPath, text: str) -> None:
    assert format_path(path) == text


@pytest.mark.parametrize(("path", "field"), [
    (None, None), ((), None), ("task_id", "task_id"), (("rules", 0), "rules[0]"),
    ("rules[0].secret", "rules[0].secret"),  # a path its caller already spelled
])
def test_invalid_field_path_and_field(path: Any, field: str | None) -> None:
    e = InvalidField(path, "why")
    assert e.field == field
    assert str(e) == (f"{field}: why" if field else "why")
    assert e.reason == "why" and (e.status, e.error) == (422, "invalid_request")


def test_at_prefixes_and_keeps_everything_else() -> None:
    e = InvalidField(("paths", 1), "must start with '/'", status=400, error="bad", rule="r")
    located = e.at("rules", 3)
    assert located.path == ("rules", 3, "paths", 1)
    assert str(located) == "rules[3].paths[1]: must start with '/'"
    assert (located.status, located.error, located.extra) == (400, "bad", {"rule": "r"})
    assert e.path == ("paths", 1)  # the original is unchanged


@pytest.mark.parametrize(("error", "body"), [
    (InvalidField(None, "the body is not valid JSON", status=400, error="invalid_json"),
     {"error": "invalid_json", "reason": "the body is not valid JSON"}),
    (InvalidField(("rules", 0, "repositories"), "no", rule="db"),
     {"error": "invalid_request", "reason": "no", "field": "rules[0].repositories",
      "rule": "db"}),
])
def test_body(error: InvalidField, body: dict[str, Any]) -> None:
    assert error.body() == body


def test_it_is_still_a_value_error() -> None:
    """Callers that caught the parsers' ValueError keep working."""
    with pytest.raises(ValueError, match=r"^rules\[0\]\.host: bad$"):
        raise InvalidField(("rules", 0, "host"), "bad")


# -- the middleware ------------------------------------------------------------------
def raising(exc: BaseException) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise exc
    return handler


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui")


async def returned(request: web.Request) -> web.Response:
    return json_error(403, "forbidden", "a handler may return a refusal too", hint="x")


CASES: list[tuple[str, BaseException | None, int, dict[str, Any]]] = [
    ("field", InvalidField(("rules", 1, "paths", 0), "must start with '/'"), 422,
     {"error": "invalid_request", "reason": "must start with '/'",
      "field": "rules[1].paths[0]"}),
    ("field-extra", InvalidField("rules[0].repositories", "vault", rule="db"), 422,
     {"error": "invalid_request", "reason": "vault", "field": "rules[0].repositories",
      "rule": "db"}),
    ("field-400", InvalidField(None, "the body must be JSON", status=400), 400,
     {"error": "invalid_request", "reason": "the body must be JSON"}),
    ("field-413", InvalidField(None, "too big", status=413, error="payload_too_large"), 413,
     {"error": "payload_too_large", "reason": "too big"}),
    ("not-found", NotFound("no such approval"), 404,
     {"error": "not_found", "reason": "no such approval"}),
    ("conflict", Conflict("already answered"), 409,
     {"error": "conflict", "reason": "already answered"}),
    ("unavailable", Unavailable("the audit log failed"), 503,
     {"error": "unavailable", "reason": "the audit log failed"}),
    ("http", web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), 413,
     {"error": "http_error", "reason": "Request Entity Too Large"}),
    ("bug", RuntimeError("secret=hunter2 leaked in a message"), 500,
     {"error": "internal_error", "reason": INTERNAL_REASON}),
    ("bug-key", KeyError("token"), 500, {"error": "internal_error", "reason": INTERNAL_REASON}),
]


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[json_errors, admin_auth])
    app[STATE] = ControlState(admin_token=TOKEN)
    for name, exc, _, _ in CASES:
        assert exc is not None
        app.router.add_get(f"/v1/raise/{name}", raising(exc))
    app.router.add_get("/v1/ok", ok)
    app.router.add_post("/v1/only-post", ok)
    app.router.add_get("/v1/returned", returned)
    app.router.add_get("/ui/", redirect)
    async with TestClient(TestServer(app)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def check_refusal(resp_status: int, headers: Any, body: dict[str, Any], status: int,
                  expected: dict[str, Any]) -> None:
    assert resp_status == status, body
    request_id = body.pop("request_id")
    assert isinstance(request_id, str) and len(request_id) >= 16
    assert headers[REQUEST_ID_HEADER] == request_id
    assert headers["Content-Type"].startswith("application/json")
    assert body == expected


@pytest.mark.parametrize(("name", "exc", "status", "expected"), CASES,
                         ids=[c[0] for c in CASES])
async def test_every_error_kind_is_json_with_reason_and_request_id(
        client: TestClient[web.Request, web.Application], name: str, exc: BaseException,
        status: int, expected: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="taskgate"):
        resp = await client.get(f"/v1/raise/{name}", headers=AUTH)
        body = await resp.json()
    request_id = body["request_id"]
    check_refusal(resp.status, resp.headers, body, status, expected)
    logged = [r for r in caplog.records if "control plane" in r.getMessage()]
    if status == 500:  # a bug is logged, with the id the client saw; never echoed
        assert len(logged) == 1 and request_id in logged[0].getMessage()
    else:
        assert logged == []


@pytest.mark.parametrize(("method", "path", "headers", "status", "expected"), [
    ("GET", "/v1/ok", {}, 401,
     {"error": "unauthorized", "reason": "a valid admin bearer token is required"}),
    ("GET", "/v1/ok", {"Authorization": "Bearer wrong"}, 401,
     {"error": "unauthorized", "reason": "a valid admin bearer token is required"}),
    ("GET", "/v1/nowhere", AUTH, 404, {"error": "http_error", "reason": "Not Found"}),
    ("GET", "/elsewhere", {}, 404, {"error": "http_error", "reason": "Not Found"}),
    ("GET", "/v1/only-post", AUTH, 405,
     {"error": "http_error", "reason": "Method Not Allowed"}),
    ("GET", "/v1/returned", AUTH, 403,
     {"error": "forbidden", "reason": "a handler may return a refusal too", "hint": "x"}),
])
async def test_refusals_outside_handlers_are_json_too(
        client: TestClient[web.Request, web.Application], method: str, path: str,
        headers: dict[str, str], status: int, expected: dict[str, Any]) -> None:
    resp = await client.request(method, path, headers=headers)
    check_refusal(resp.status, resp.headers, await resp.json(), status, expected)
    if status == 405:
        assert resp.headers["Allow"] == "POST"


async def test_success_and_redirects_pass_through(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/ok", headers=AUTH)
    assert resp.status == 200 and await resp.json() == {"ok": True}
    assert REQUEST_ID_HEADER not in resp.headers
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui"


def test_each_refusal_gets_its_own_request_id() -> None:
    a, b = json_error(401, "unauthorized", "x"), json_error(401, "unauthorized", "x")
    assert a.headers[REQUEST_ID_HEADER] != b.headers[REQUEST_ID_HEADER]


# -- the review page's session refusals ----------------------------------------------
@pytest.mark.parametrize(("method", "with_session", "status", "error"), [
    ("GET", False, 401, "unauthorized"),
    ("POST", True, 403, "forbidden"),  # the session cookie without the CSRF header
])
def test_session_refusals_carry_a_request_id(method: str, with_session: bool, status: int,
                                             error: str) -> None:
    sessions = Sessions()
    cookie = {}
    if with_session:
        session_id, _ = sessions.create()
        cookie = {"Cookie": f"taskgate_session={session_id}"}
    request = make_mocked_request(method, "/v1/approvals", headers=cookie)
    refusal = sessions.authenticate(request)
    assert isinstance(refusal, web.Response) and refusal.status == status
    assert refusal.text is not None and f'"error": "{error}"' in refusal.text
    assert refusal.headers[REQUEST_ID_HEADER] in refusal.text
    if status == 403:
        assert CSRF_HEADER in refusal.text


# -- refusals written before aiohttp sees the connection -----------------------------
@pytest.mark.parametrize(("status", "phrase", "error"), [
    (503, "Service Unavailable", "unavailable"), (408, "Request Timeout", "request_timeout"),
])
def test_connection_refusals_have_the_same_shape(status: int, phrase: str, error: str) -> None:
    head, _, raw = _refusal_bytes(status, phrase, error, "why").partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {phrase}"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    body = json.loads(raw)
    assert headers[REQUEST_ID_HEADER] == body.pop("request_id")
    assert body == {"error": error, "reason": "why"}
    assert int(headers["Content-Length"]) == len(raw)
