"""``taskgate approvals list|show|approve|deny``: answer held calls from a terminal.

What a call carries is shown in full — the URL with its query, the headers
that will be forwarded, the body (up to a bound, with its size and SHA-256),
the MCP tools and arguments — every value through :func:`proxy.safe_text.safe`,
since the agent wrote all of it.

Talks to the control plane of a running gateway through
:class:`~proxy.cli._client.ControlClient` (its address and admin token come
from the environment or the config). Exit status: 0 done, 1 the control plane
refused (unknown id, already answered, bad input), 2 it could not be asked
(no token, unreachable, not an http(s) URL).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from proxy.cli._client import ControlClient, ControlError, segment
from proxy.cli._common import Command, config_of, control_config_option
from proxy.safe_text import safe, safe_json

__all__ = ["APPROVALS"]


def _setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with held calls")
    text = "calls waiting for approval, oldest first"
    ls = sub.add_parser("list", help=text, description=text)
    ls.add_argument("--json", action="store_true", help="print the control plane's JSON")
    text = "one held call in full: URL, headers, body, tools"
    sh = sub.add_parser("show", help=text, description=text)
    sh.add_argument("id", help="the approval id (from `taskgate approvals list`)")
    sh.add_argument("--json", action="store_true", help="print the control plane's JSON")
    for verb, help_text in (("approve", "let one held call go to its upstream"),
                            ("deny", "refuse one held call")):
        a = sub.add_parser(verb, help=help_text, description=help_text)
        a.add_argument("id", help="the approval id (from `taskgate approvals list`)")
        a.add_argument("--by", required=True, metavar="NAME", help="who answers")
        a.add_argument("--comment", help="why; a denial's comment is shown to the agent")
    control_config_option(ls, sh, *(sub.choices[v] for v in ("approve", "deny")))


def _approvals(args: argparse.Namespace) -> int:
    try:
        client = ControlClient.from_config(config_of(args))
        if args.action == "list":
            doc = client.call("GET", "/v1/approvals")
            if args.json:
                print(safe_json(doc))
            else:
                _print_list(doc.get("approvals", []))
            return 0
        if args.action == "show":
            doc = client.call("GET", f"/v1/approvals/{segment(args.id)}")
            if args.json:
                print(safe_json(doc))
            else:
                _print_held(doc, full=True)
            return 0
        body: dict[str, Any] = {"by": args.by}
        if args.comment is not None:
            body["comment"] = args.comment
        held = client.call("POST", f"/v1/approvals/{segment(args.id)}/{args.action}", body)
    except ControlError as e:
        print(f"taskgate approvals: {safe(e)}", file=sys.stderr)
        return 1 if e.answered else 2
    verb = "approved" if args.action == "approve" else "denied"
    print(safe(f"{verb} {held['id']} (request {held['request_id']}: {held['method']} "
               f"{held['url']}) by {args.by}"))
    request = held.get("request")
    if isinstance(request, dict) and request.get("digest"):
        print(safe(f"  digest:   {request['digest']}"))
    return 0


def _print_list(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no calls are waiting for approval")
        return
    for h in items:
        _print_held(h, full=False)


BODY_LINES = 40  # `list` shows the start of a body; `show` all the control plane sent


def _print_held(h: dict[str, Any], *, full: bool) -> None:
    """One held call; every value through :func:`safe` (the agent wrote the call)."""
    state = h.get("state") or "waiting"
    print(safe(f"{h['id']}  {state} {h['age_seconds']:.0f}s  until {h['expires_at']}"))
    print(safe(f"  workload: {h['workload']}  owner: {h['owner'] or '-'}  "
               f"task: {h['task'] or '-'}  purpose: {h['purpose'] or '-'}"))
    print(safe(f"  call:     {h['method']} {h['url']}  (request {h['request_id']})"))
    for c in h.get("calls") or []:
        print(safe(f"  tool:     {c['name']} {orjson.dumps(c['arguments']).decode()}"))
    tool = h.get("tool")
    if not h.get("calls") and isinstance(tool, dict) and tool.get("method"):
        print(safe(f"  rpc:      {tool['method']}"))  # an MCP method other than a tool
    request = h.get("request")
    if not isinstance(request, dict):
        return
    for name, value in request.get("headers") or []:
        print(f"  header:   {safe(name)}: {safe(value)}")
    if request.get("secret"):
        print(safe(f"  secret:   {request['secret']} is added by the gateway after approval"))
    body = request.get("body") or {}
    if body.get("size"):
        cut = " (shown in part)" if body.get("truncated") else ""
        print(safe(f"  body:     {body['size']} bytes, {body.get('encoding')}{cut}, "
                   f"sha256 {body.get('sha256')}"))
        lines = str(body.get("shown") or "").split("\n")
        limit = len(lines) if full else BODY_LINES
        for line in lines[:limit]:
            print(f"    | {safe(line)}")
        if len(lines) > limit:
            print(f"    | ... {len(lines) - limit} more lines "
                  f"(taskgate approvals show {safe(h['id'])})")
    else:
        print("  body:     none")
    print(safe(f"  digest:   {request.get('digest')}"))


APPROVALS = Command("approvals", "list calls held for approval; show, approve or deny one",
                    _approvals, _setup)
