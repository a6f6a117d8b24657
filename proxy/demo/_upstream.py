"""The demo's upstreams: an issue-tracker API and an MCP server, both aiohttp apps.

They stand where GitHub and a docs MCP server would, so ``taskgate demo`` runs
with the runtime dependencies alone. Each keeps a record of what reached it,
which is how the tour proves a refused call never arrived:

- the API answers ``GET /repos/{owner}/{repo}/issues`` and ``POST …/pulls``
  only with the right ``Authorization`` (else 401, like GitHub), and says
  whether it got it (``"authorization": "valid" | "missing" | "wrong"``),
  never what it got;
- the MCP server speaks streamable HTTP in JSON response mode (MCP
  specification, Transports): ``POST /mcp`` takes one JSON-RPC message;
  ``initialize`` opens a session (``Mcp-Session-Id``), notifications and
  responses get 202, requests a JSON answer; ``GET /mcp`` is 405 (no server
  stream), ``DELETE /mcp`` ends the session. Tools: ``search_docs`` and
  ``delete_repo``, whose every run is counted.
"""

from __future__ import annotations

import hmac
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

__all__ = ["ApiUpstream", "McpUpstream", "PROTOCOL_VERSIONS", "Seen"]

# Handshake-era versions this server speaks, oldest first; the last is offered
# to a client that asks for one it does not know (MCP lifecycle, version negotiation).
PROTOCOL_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
DEFAULT_VERSION = "2025-03-26"  # assumed when MCP-Protocol-Version is absent (spec)
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


# -- the issue-tracker API -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Seen:
    """One request that reached an upstream, and whether its credential was right."""

    method: str
    path: str
    authorization: str  # valid | missing | wrong


class ApiUpstream:
    """A GitHub-shaped API that needs ``Authorization: Bearer <secret>``."""

    def __init__(self, secret: str) -> None:
        self._expected = f"Bearer {secret}".encode()
        self.seen: list[Seen] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/repos/{owner}/{repo}/issues", self.issues)
        app.router.add_post("/repos/{owner}/{repo}/pulls", self.pulls)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    def _check(self, request: web.Request) -> str:
        given = request.headers.get("Authorization")
        if given is None:
            verdict = "missing"
        else:
            verdict = "valid" if hmac.compare_digest(given.encode(), self._expected) \
                else "wrong"
        self.seen.append(Seen(request.method, request.raw_path, verdict))
        return verdict

    async def issues(self, request: web.Request) -> web.Response:
        verdict = self._check(request)
        if verdict != "valid":
            return _json({"message": "Bad credentials", "authorization": verdict}, 401)
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        return _json({"repo": repo, "authorization": verdict, "issues": [
            {"number": 42, "title": "Widgets render upside down", "state": "open"},
            {"number": 41, "title": "Docs: rate limits", "state": "open"}]})

    async def pulls(self, request: web.Request) -> web.Response:
        verdict = self._check(request)
        if verdict != "valid":
            return _json({"message": "Bad credentials", "authorization": verdict}, 401)
        try:
            title = orjson.loads(await request.read()).get("title")
        except (orjson.JSONDecodeError, AttributeError):
            return _json({"message": "Problems parsing JSON"}, 400)
        return _json({"number": 43, "title": title, "state": "open",
                      "authorization": verdict}, 201)

    async def not_found(self, request: web.Request) -> web.Response:
        self._check(request)
        return _json({"message": "Not Found"}, 404)


# -- the MCP server -----------------------------------------------------------------
class _Refusal(Exception):
    """A message the server cannot take: an HTTP status and a JSON-RPC error."""

    def __init__(self, status: int, code: int, message: str, msg_id: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.msg_id = status, code, message, msg_id

    def response(self) -> web.Response:
        return _json({"jsonrpc": "2.0", "id": self.msg_id,
                      "error": {"code": self.code, "message": self.message}}, self.status)


@dataclass(frozen=True, slots=True)
class _Tool:
    description: str
    schema: dict[str, Any]
    run: Callable[[dict[str, Any]], dict[str, Any]]

    def listing(self, name: str) -> dict[str, Any]:
        return {"name": name, "description": self.description, "inputSchema": self.schema}


def _schema_error(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    """Why ``args`` do not fit the tool's (flat) input schema, or None."""
    props = schema["properties"]
    for name in schema.get("required", ()):
        if name not in args:
            return f"missing required argument {name!r}"
    for name, value in args.items():
        spec = props.get(name)
        if spec is None:
            return f"unknown argument {name!r}"
        if spec["type"] == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name!r} must be an integer"
            if not spec.get("minimum", value) <= value <= spec.get("maximum", value):
                return f"{name!r} must be between {spec['minimum']} and {spec['maximum']}"
        elif spec["type"] == "string" and (not isinstance(value, str) or not value
                                           or len(value) > spec.get("maxLength", 200)):
            return f"{name!r} must be a non-empty string of at most 200 characters"
    return None


@dataclass
class McpUpstream:
    """The MCP server; ``ran`` counts every tool run, ``deleted`` the side effect."""

    ran: Counter[str] = field(default_factory=Counter)
    deleted: list[str] = field(default_factory=list)
    sessions: dict[str, str] = field(default_factory=dict)  # session id → version

    def __post_init__(self) -> None:
        self.tools = {
            "search_docs": _Tool("Search the product documentation.", {
                "type": "object", "additionalProperties": False, "required": ["query"],
                "properties": {"query": {"type": "string", "maxLength": 200},
                               "limit": {"type": "integer", "minimum": 1,
                                         "maximum": 1000}}}, self._search),
            "delete_repo": _Tool("Delete a repository. Irreversible.", {
                "type": "object", "additionalProperties": False, "required": ["repo"],
                "properties": {"repo": {"type": "string", "maxLength": 200}}},
                self._delete),
        }

    def _search(self, args: dict[str, Any]) -> dict[str, Any]:
        hits = [f"docs/{args['query'].replace(' ', '-')}-{i}.md"
                for i in range(1, min(args.get("limit", 10), 3) + 1)]
        return {"content": [{"type": "text", "text": f"{len(hits)} pages match: "
                             + ", ".join(hits)}],
                "structuredContent": {"results": hits}, "isError": False}

    def _delete(self, args: dict[str, Any]) -> dict[str, Any]:
        self.deleted.append(args["repo"])
        return {"content": [{"type": "text", "text": f"deleted {args['repo']}"}],
                "isError": False}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.post)
        app.router.add_delete("/mcp", self.delete)
        app.router.add_get("/mcp", self.no_stream)
        return app

    # transport ---------------------------------------------------------------------
    async def post(self, request: web.Request) -> web.Response:
        try:
            self._check_transport(request)
            msg = self._message(await request.read())
            method, msg_id = msg.get("method"), msg.get("id")
            if method == "initialize" and "id" in msg:
                return self._initialize(msg)
            self._session(request)
            if "method" not in msg or "id" not in msg:  # a notification or a response
                return web.Response(status=202)
            result = self._request(str(method), msg.get("params"), msg_id)
        except _Refusal as e:
            return e.response()
        return _json({"jsonrpc": "2.0", "id": msg_id, "result": result})

    async def delete(self, request: web.Request) -> web.Response:
        try:
            self._check_transport(request, body=False)
            self._session(request)
        except _Refusal as e:
            return e.response()
        del self.sessions[request.headers[SESSION_HEADER]]
        return web.Response(status=200)

    async def no_stream(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    @staticmethod
    def _check_transport(request: web.Request, *, body: bool = True) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and URL(origin).host not in LOOPBACK:  # DNS rebinding
            raise _Refusal(403, INVALID_REQUEST, "this Origin is not allowed")
        if not body:
            return
        accepted = {part.split(";")[0].strip().lower()
                    for part in request.headers.get("Accept", "").split(",")}
        if not accepted & {"application/json", "application/*", "*/*"}:
            raise _Refusal(406, INVALID_REQUEST, "Accept must include application/json")
        if request.content_type != "application/json":
            raise _Refusal(415, INVALID_REQUEST, "Content-Type must be application/json")

    @staticmethod
    def _message(raw: bytes) -> dict[str, Any]:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Refusal(400, PARSE_ERROR, "Parse error") from None
        if isinstance(msg, list):
            raise _Refusal(400, INVALID_REQUEST, "batches are not supported; send one message")
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            raise _Refusal(400, INVALID_REQUEST, "not a JSON-RPC 2.0 message")
        msg_id = msg.get("id")
        if "id" in msg and (isinstance(msg_id, bool) or not isinstance(msg_id, (str, int))):
            raise _Refusal(400, INVALID_REQUEST, "id must be a string or an integer")
        if "method" in msg and not isinstance(msg["method"], str):
            raise _Refusal(400, INVALID_REQUEST, "method must be a string", msg_id)
        if "method" not in msg and not ("id" in msg and ("result" in msg or "error" in msg)):
            raise _Refusal(400, INVALID_REQUEST, "neither a request, a notification nor a "
                           "response", msg_id)
        return msg

    def _session(self, request: web.Request) -> str:
        """The session's protocol version; 400 without a session id, 404 for an unknown one."""
        sid = request.headers.get(SESSION_HEADER)
        if sid is None:
            raise _Refusal(400, INVALID_REQUEST, f"{SESSION_HEADER} header required")
        if sid not in self.sessions:
            raise _Refusal(404, INVALID_REQUEST, "session not found; initialize again")
        version = request.headers.get(VERSION_HEADER, DEFAULT_VERSION)
        if version not in PROTOCOL_VERSIONS:
            raise _Refusal(400, INVALID_REQUEST, f"unsupported {VERSION_HEADER}: "
                           f"{version[:40]!r}; supported: {', '.join(PROTOCOL_VERSIONS)}")
        return version

    # protocol ----------------------------------------------------------------------
    def _initialize(self, msg: dict[str, Any]) -> web.Response:
        params = msg.get("params")
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if not isinstance(asked, str):
            raise _Refusal(400, INVALID_PARAMS, "params.protocolVersion is required",
                           msg["id"])
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]
        sid = secrets.token_hex(16)
        self.sessions[sid] = version
        result = {"protocolVersion": version,
                  "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {"name": "acme-docs", "version": "1.0.0"},
                  "instructions": "Search Acme's documentation."}
        return _json({"jsonrpc": "2.0", "id": msg["id"], "result": result},
                     headers={SESSION_HEADER: sid})

    def _request(self, method: str, params: Any, msg_id: Any) -> dict[str, Any]:
        if params is not None and not isinstance(params, dict):
            raise _Refusal(200, INVALID_PARAMS, "params must be an object", msg_id)
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": [t.listing(name) for name, t in self.tools.items()]}
        if method == "tools/call":
            return self._call(params or {}, msg_id)
        raise _Refusal(200, METHOD_NOT_FOUND, f"Method not found: {method[:80]}", msg_id)

    def _call(self, params: dict[str, Any], msg_id: Any) -> dict[str, Any]:
        name, args = params.get("name"), params.get("arguments", {})
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            raise _Refusal(200, INVALID_PARAMS, f"Unknown tool: {str(name)[:80]}", msg_id)
        if not isinstance(args, dict):
            raise _Refusal(200, INVALID_PARAMS, "arguments must be an object", msg_id)
        why = _schema_error(tool.schema, args)
        if why is not None:  # an input error is a tool execution error (isError)
            return {"content": [{"type": "text", "text": why}], "isError": True}
        self.ran[str(name)] += 1
        return tool.run(args)
