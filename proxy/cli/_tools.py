"""``taskgate tools changes|accept``: MCP tool definitions that changed since they were
pinned, and accepting one (the rug-pull defence, proxy/mcp/_pins.py).

Talks to the control plane of a running gateway (:class:`~proxy.cli._client.ControlClient`).
Every value the server wrote (tool names, servers) goes through :func:`safe`. Exit
status: 0 done, 1 the control plane refused (unknown id, a rule's pin), 2 it could
not be asked.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.cli._client import ControlClient, ControlError, segment
from proxy.cli._common import Command, config_of, control_config_option
from proxy.safe_text import safe, safe_json

__all__ = ["TOOLS"]


def _setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with pinned tool definitions")
    text = "tools whose definition changed, waiting for an admin"
    ls = sub.add_parser("changes", help=text, description=text)
    ls.add_argument("--json", action="store_true", help="print the control plane's JSON")
    a = sub.add_parser("accept", help="accept a changed tool definition as the new pin",
                       description="accept a changed tool definition as the new pin")
    a.add_argument("id", help="the change id (from `taskgate tools changes`)")
    a.add_argument("--by", required=True, metavar="NAME", help="who accepts")
    a.add_argument("--comment", help="why")
    control_config_option(ls, a)


def _tools(args: argparse.Namespace) -> int:
    try:
        client = ControlClient.from_config(config_of(args))
        if args.action == "changes":
            doc = client.call("GET", "/v1/tools/changes")
            if args.json:
                print(safe_json(doc))
            else:
                _print_changes(doc.get("changes", []))
            return 0
        body: dict[str, Any] = {"by": args.by}
        if args.comment is not None:
            body["comment"] = args.comment
        change = client.call("POST", f"/v1/tools/changes/{segment(args.id)}/accept", body)
    except ControlError as e:
        print(f"taskgate tools: {safe(e)}", file=sys.stderr)
        return 1 if e.answered else 2
    print(safe(f"accepted {change['id']}: tool {change['tool']} of {change['server']} "
               f"({change['subject']}) is pinned at {change['seen']['digest']} by {args.by}"))
    return 0


def _print_changes(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no tool changes are waiting")
        return
    for c in items:
        print(safe(f"{c['id']}  {c['tool']}  {c['server']}  ({c['subject']})"))
        print(safe(f"  {c['what']}"))
        if c.get("pinned"):
            print(safe(f"  pinned: {c['pinned']['digest']}"))
        print(safe(f"  seen:   {c['seen']['digest']}"))
        if not c.get("acceptable"):
            print(safe(f"  pinned by rule {c.get('rule')}: change the rule's mcp.pin"))


TOOLS = Command("tools", "MCP tools whose definition changed since pinned; accept one",
                _tools, _setup)
