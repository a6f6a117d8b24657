"""``taskgate task create|list|show|revoke|rotate-key``: task grants from the shell.

The commands talk to a running gateway's control plane through
:class:`~proxy.cli._client.ControlClient` (its address and admin token come
from the environment or the config). Exit status: 0 done, 1 anything went
wrong (the control plane refused or could not be asked, a bad rules file),
2 a usage error.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.parse
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from proxy.cli._client import ControlClient, ControlError, segment
from proxy.cli._common import Command, config_of
from proxy.cli._setup import export_block, proxy_env
from proxy.safe_text import safe, safe_json

__all__ = ["TASK", "parse_ttl"]

_TTL = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class CliError(Exception):
    """Something the user can fix in what they gave; printed without a traceback (exit 1)."""


def parse_ttl(text: str) -> int:
    """``900``, ``90s``, ``15m``, ``1h30m`` → seconds."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    m = _TTL.match(text)
    if not text or m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 900, 15m, 1h30m")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _human(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


# -- subcommands ----------------------------------------------------------------
def _load_rules(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            doc = YAML(typ="safe", pure=True).load(f)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    except YAMLError as e:
        raise CliError(f"{path}: invalid YAML: {e}") from None
    if isinstance(doc, dict) and set(doc) == {"rules"}:
        doc = doc["rules"]
    if not isinstance(doc, list):
        raise CliError(f"{path}: expected a list of rules (or a mapping with 'rules')")
    return doc


def _create(ctl: ControlClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ttl_seconds": args.ttl, "rules": _load_rules(args.rules)}
    if args.workload_token_file:
        with open(args.workload_token_file, encoding="utf-8") as f:
            body["workload_token"] = f.read().strip()
    if args.workload:
        body["workload"] = args.workload
    for key in ("owner", "purpose", "max_calls", "mode"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.bind:
        body["bind"] = {"client_cidrs": args.bind}
    task = ctl.call("POST", "/v1/tasks", body)
    env = proxy_env(str(task["proxy_url"]))
    if args.json:  # for orchestrators: the task, and the environment to start the agent in
        print(safe_json({**task, "env": env}))
        return 0
    budget = f"{task['max_calls']} calls" if task.get("max_calls") else "no call budget"
    lines = [f"task      {safe(task['task_id'])}",
             f"workload  {safe(task['workload'])}",
             f"expires   {safe(task['expires_at'])} (in {_human(task['expires_in_seconds'])})",
             f"budget    {safe(budget)}"]
    if task.get("mode") == "report":
        lines.append("mode      report (refusals recorded would_deny, not enforced)")
    if task.get("bind"):
        lines.append(f"bound to  {safe(', '.join(task['bind']['client_cidrs']))}")
    lines += ["",
              "# The agent's environment: both spellings (curl reads only http_proxy for",
              "# http:// URLs, grpcio only https_proxy), NO_PROXY empty (nothing goes around).",
              "# Trust: `taskgate ca`. Node 20's fetch reads none of these: docs/clients.md.",
              export_block({name: safe(value) for name, value in env.items()})]
    print("\n".join(lines))
    return 0


def _list(ctl: ControlClient, args: argparse.Namespace) -> int:
    query = "&".join(f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in
                     (("workload", args.workload), ("status", args.status),
                      ("limit", args.limit)) if v is not None)
    out = ctl.call("GET", "/v1/tasks" + (f"?{query}" if query else ""))
    if args.json:
        print(safe_json(out))
        return 0
    print(f"{'TASK':32}  {'STATUS':8}  {'CALLS':>11}  {'EXPIRES':24}  WORKLOAD")
    for t in out["tasks"]:
        calls = f"{t['calls_used']}/{t['max_calls'] if t['max_calls'] else '-'}"
        print(f"{safe(t['task_id']):32}  {safe(t['status']):8}  {safe(calls):>11}  "
              f"{safe(t['expires_at']):24}  {safe(t['workload'])}")
    if out["total"] > len(out["tasks"]):
        print(f"({len(out['tasks'])} of {out['total']}; use --limit)")
    return 0


def _show_task(task: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(safe_json(task))
        return
    left = task["calls_left"] if task["calls_left"] is not None else "unlimited"
    # Every value may have come from a request (purpose, owner, rules): one line each.
    print(f"task      {safe(task['task_id'])}\n"
          f"status    {safe(task['status'])}\n"
          f"workload  {safe(task['workload'])}\n"
          f"owner     {safe(task['owner'] or '-')}\n"
          f"purpose   {safe(task['purpose'] or '-')}\n"
          f"created   {safe(task['created_at'])}\n"
          f"expires   {safe(task['expires_at'])}\n"
          + (f"revoked   {safe(task['revoked_at'])}\n" if task["revoked_at"] else "")
          + f"calls     {safe(task['calls_used'])} used, {safe(left)} left\n"
          f"rules")
    for rule in task["rules"]:
        print(f"  - {safe_json(rule, indent=False)}")
    _show_credentials(task.get("credentials"))


def _show_credentials(creds: list[dict[str, Any]] | None) -> None:
    """Minted credentials still live or pending revocation (a gateway without secrets,
    or an older one, sends none)."""
    if creds is None:
        return
    if not creds:
        print("credentials  none live, none pending revocation")
        return
    print("credentials")
    for c in creds:
        state = "pending revocation" if c["state"] == "pending_revocation" else c["state"]
        line = (f"  - {c['secret']} ({c['kind']}): {state}, expires "
                f"{c['expires_at'] or 'never'}")
        if c["attempts"]:
            line += f", {c['attempts']} revocation attempts failed"
        if c["last_error"]:
            line += f", last error: {c['last_error']}"
        if c["next_attempt_at"]:
            line += f", next attempt {c['next_attempt_at']}"
        print(safe(line))  # last_error may quote what an issuer answered


def _show(ctl: ControlClient, args: argparse.Namespace) -> int:
    _show_task(ctl.call("GET", f"/v1/tasks/{segment(args.id)}"),
               args.json)
    return 0


def _revoke(ctl: ControlClient, args: argparse.Namespace) -> int:
    task = ctl.call("DELETE", f"/v1/tasks/{segment(args.id)}")
    if args.json:
        print(safe_json(task))
    else:
        print(f"revoked {safe(task['task_id'])} at {safe(task['revoked_at'])} "
              f"({safe(task['calls_used'])} calls used)")
    return 0


def _rotate(ctl: ControlClient, args: argparse.Namespace) -> int:
    out = ctl.call("POST", "/v1/task-keys/rotate")
    print(f"new signing key {safe(out['current'])}; {len(out['keys']) - 1} older key(s) kept "
          "until their tokens expire")
    return 0


_ACTIONS = {"create": _create, "list": _list, "show": _show, "revoke": _revoke,
            "rotate-key": _rotate}


def _setup(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task_command", required=True, metavar="ACTION",
                           help="what to do with task grants")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="config file (for the control-plane address and admin token)")
        sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    c = action("create", "create a task grant and print the agent's proxy environment")
    c.add_argument("--workload", help="workload id (or --workload-token-file)")
    c.add_argument("--workload-token-file", metavar="FILE",
                   help="a workload JWT from a trusted issuer, attesting the workload")
    c.add_argument("--ttl", type=parse_ttl, default=900, help="lifetime: 900, 15m, 1h (15m)")
    c.add_argument("--max-calls", dest="max_calls", type=int, help="call budget")
    c.add_argument("--rules", required=True, metavar="FILE",
                   help="YAML list of rules, as in the config's `standing` (README: "
                        "Tasks from the shell)")
    c.add_argument("--owner", help="who answers for this task (default: workload owner)")
    c.add_argument("--purpose", help="why the task exists, for the audit trail")
    c.add_argument("--mode", choices=("enforce", "report"),
                   help="report: refusals are recorded would_deny, not enforced (where the "
                        "workload has report_allowed)")
    c.add_argument("--bind", action="append", metavar="CIDR",
                   help="client network the token is good from (repeat for more)")
    ls = action("list", "list tasks, newest first")
    ls.add_argument("--workload", help="only this workload's tasks")
    ls.add_argument("--status", choices=("active", "spent", "expired", "revoked"),
                    help="only tasks in this state")
    ls.add_argument("--limit", type=int, help="at most this many tasks")
    for name, text in (("show", "show one task"), ("revoke", "revoke a task now")):
        action(name, text).add_argument("id", help="task id")
    action("rotate-key", "sign new task tokens with a new key")


def _task(args: argparse.Namespace) -> int:
    if args.task_command == "create" and not (args.workload or args.workload_token_file):
        print("taskgate task create: give --workload or --workload-token-file", file=sys.stderr)
        return 2
    try:
        return _ACTIONS[args.task_command](ControlClient.from_config(config_of(args)), args)
    except (CliError, ControlError) as e:  # unreachable or refused alike: exit 1
        print(f"taskgate task {args.task_command}: {safe(e)}", file=sys.stderr)
        return 1


TASK = Command("task", "task grants: create, list, show, revoke, rotate-key", _task, _setup)
