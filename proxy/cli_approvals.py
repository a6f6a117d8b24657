"""``taskgate approvals list|approve|deny``: answer held calls from a terminal.

Talks to the control plane of a running gateway: its address is
``TASKGATE_CONTROL_URL`` or the config's ``listen.control``; the admin token is
``TASKGATE_ADMIN_TOKEN`` or the config's ``admin_token_file``. Exit status: 0
done, 1 the control plane refused (unknown id, already answered, bad input),
2 it could not be asked (no token, unreachable).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from .admin import ENV_VAR as TOKEN_ENV
from .admin import admin_token
from .cli import command, config_of

__all__ = ["ControlClient", "ControlError"]

URL_ENV = "TASKGATE_CONTROL_URL"


class ControlError(Exception):
    """The control plane could not be asked (exit 2) or said no (exit 1)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ControlClient:
    """A few JSON calls to the control plane, never through an agent's HTTP_PROXY."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ControlError(f"{base_url!r} is not an http(s) URL of the control plane", 2)
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControlClient:
        config = config_of(args)
        url = os.environ.get(URL_ENV)
        if not url:
            host, port = config.control_listen
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        try:
            token = admin_token(config.admin_token_file, create=False)
        except OSError:
            raise ControlError(f"no admin token: set {TOKEN_ENV} or create "
                               f"{config.admin_token_file}", 2) from None
        return cls(url, token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.base_url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise ControlError(f"{e.code}: {_reason(e.read())}", 1) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise ControlError(f"cannot reach the control plane at {self.base_url}: {why}",
                               2) from None


def _reason(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(doc, dict) and "reason" in doc:
        field = f" (field {doc['field']!r})" if doc.get("field") else ""
        return f"{doc['reason']}{field}"
    return str(doc)[:200]


def _setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="calls waiting for approval, oldest first")
    ls.add_argument("--json", action="store_true", help="print the control plane's JSON")
    for verb, help_text in (("approve", "let one held call go to its upstream"),
                            ("deny", "refuse one held call")):
        a = sub.add_parser(verb, help=help_text, description=help_text)
        a.add_argument("id", help="the approval id (from `taskgate approvals list`)")
        a.add_argument("--by", required=True, metavar="NAME", help="who answers")
        a.add_argument("--comment", help="why; a denial's comment is shown to the agent")
    for action_parser in (ls, *(sub.choices[v] for v in ("approve", "deny"))):
        action_parser.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                                   help="config file (for listen.control and admin_token_file)")


@command("approvals", "list calls held for approval; approve or deny one", _setup)
def _approvals(args: argparse.Namespace) -> int:
    try:
        client = ControlClient.from_args(args)
        if args.action == "list":
            doc = client.call("GET", "/v1/approvals")
            if args.json:
                print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            else:
                _print_list(doc.get("approvals", []))
            return 0
        body: dict[str, Any] = {"by": args.by}
        if args.comment is not None:
            body["comment"] = args.comment
        held = client.call("POST", f"/v1/approvals/{_quote(args.id)}/{args.action}", body)
    except ControlError as e:
        print(f"taskgate approvals: {e}", file=sys.stderr)
        return e.code
    verb = "approved" if args.action == "approve" else "denied"
    print(f"{verb} {held['id']} (request {held['request_id']}: {held['method']} "
          f"{held['url']}) by {args.by}")
    return 0


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _print_list(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no calls are waiting for approval")
        return
    for h in items:
        print(_safe(f"{h['id']}  waiting {h['age_seconds']:.0f}s  until {h['expires_at']}"))
        print(_safe(f"  workload: {h['workload']}  owner: {h['owner'] or '-'}  "
                    f"task: {h['task'] or '-'}  purpose: {h['purpose'] or '-'}"))
        print(_safe(f"  call:     {h['method']} {h['url']}  (request {h['request_id']})"))
        for c in h.get("calls") or []:
            print(_safe(f"  tool:     {c['name']} {orjson.dumps(c['arguments']).decode()}"))
        tool = h.get("tool")
        if not h.get("calls") and isinstance(tool, dict) and tool.get("method"):
            print(_safe(f"  rpc:      {tool['method']}"))  # an MCP method other than a tool


def _safe(line: str) -> str:
    """What the agent controls (URL, tool names) must not drive the approver's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
