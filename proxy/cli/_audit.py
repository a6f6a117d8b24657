"""``taskgate logs`` and ``taskgate audit verify``: read and check the audit log offline.

Both read the files the config names (rotated ones too), so they work while
the gateway is down: by default every process's log on this host (the gateway's,
its workers', proxy/audit/_replicas.py), or the files and folders given. ``logs``
merges the records of several logs by time; ``verify`` checks each log's chain on
its own.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from proxy.audit import (
    FILTER_KEYS,
    AuditFilter,
    Report,
    anchor_log,
    follow,
    host_logs,
    load_hmac_key,
    log_files,
    logs_in,
    merged,
    read_anchor,
    records,
    verify,
    verify_files,
)
from proxy.cli._common import Command, config_of
from proxy.policy import default_port
from proxy.safe_text import safe, safe_json
from proxy.store import store_path

__all__ = ["AUDIT", "LOGS", "format_row", "main_logs", "main_verify"]

_COLUMNS = (("TIME", 19), ("DECISION", 8), ("ST", 3), ("WORKLOAD", 30), ("TASK", 12),
            ("CALL", 56), ("TOOL", 16), ("RULE", 16), ("REASON", 0))


def _cut(text: str, width: int) -> str:
    if width <= 0 or len(text) <= width:
        return text.ljust(width) if width > 0 else text
    return text[:width - 1] + "…"


def _call(rec: dict[str, Any]) -> str:
    method, host, port = rec.get("method") or "", rec.get("host") or "", rec.get("port")
    scheme = rec.get("scheme") or "http"
    if method == "CONNECT":
        return f"CONNECT {host}:{port}"
    netloc = host if port in (None, default_port(scheme)) else f"{host}:{port}"
    return f"{method} {scheme}://{netloc}{rec.get('path') or ''}".strip()


def _tool(tool: Any) -> str:
    if isinstance(tool, dict):
        return str(tool.get("name") or "")
    if isinstance(tool, list):
        return ",".join(_tool(t) for t in tool)
    return "" if tool is None else str(tool)


def format_row(rec: dict[str, Any]) -> str:
    """One record as a line of the table (every value shown as plain text)."""
    ts = str(rec.get("ts") or "")[:19].replace("T", " ")
    approval = rec.get("approval")
    reason = str(rec.get("reason") or "")
    if isinstance(approval, dict) and approval.get("by"):
        reason = f"{reason} [by {approval['by']}]".strip()
    values = (ts, str(rec.get("decision") or ""), str(rec.get("status") or "-"),
              str(rec.get("workload") or "-"), str(rec.get("task") or "-"), _call(rec),
              _tool(rec.get("tool")), str(rec.get("rule") or "-"), reason)
    # Escaped before cut: a record's values come from agents and upstreams.
    return "  ".join(_cut(safe(v), w) for v, (_, w) in zip(values, _COLUMNS, strict=True))


def _header() -> str:
    return "  ".join(_cut(name, w) for name, w in _COLUMNS)


def _logs_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="audit logs, or folders of them (*.jsonl); default: every "
                        "process's log on this host, from the config")
    p.add_argument("--task", help="only this task id")
    p.add_argument("--workload", help="only this workload id")
    p.add_argument("--decision", help="allow, deny, error, approved, rejected, held, "
                                      "would_deny, challenge (comma-separated for several)")
    p.add_argument("--host", help="only calls to this host")
    p.add_argument("--tool", help="only MCP/JSON-RPC calls of this tool")
    p.add_argument("--since", help="from this time on: RFC 3339, or an age like 15m, 2h, 7d")
    p.add_argument("--until", help="before this time: RFC 3339, or an age")
    p.add_argument("--last", type=int, metavar="N", help="only the newest N matching records")
    p.add_argument("--json", action="store_true", help="JSON lines, one record each")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing records as they are written")


def _emit(recs: Iterable[dict[str, Any]], as_json: bool) -> None:
    out = sys.stdout
    for rec in recs:
        if as_json:
            out.write(safe_json(rec, indent=False) + "\n")
        else:
            out.write(format_row(rec) + "\n")
    out.flush()


def main_logs(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        flt = AuditFilter.parse({k: getattr(args, k) for k in FILTER_KEYS})
    except ValueError as e:
        print(f"taskgate logs: --{safe(e)}", file=sys.stderr)
        return 2
    path = config.audit_path
    if args.paths:
        missing = [p for p in args.paths if not os.path.exists(p)]
        if missing:
            print(f"taskgate logs: {safe(missing[0])}: no such file", file=sys.stderr)
            return 2
        logs = logs_in(args.paths)
    else:
        logs = host_logs(path) or [path]
    if not any(log_files(log) for log in logs) and not args.follow:
        print(f"taskgate logs: no audit log at {safe(', '.join(args.paths) or path)}",
              file=sys.stderr)
        return 1
    try:
        if not args.json:
            print(_header(), flush=True)
        found: Iterable[dict[str, Any]] = merged(records(log, flt) for log in logs)
        if args.last is not None:
            found = deque(found, maxlen=max(args.last, 0))
        _emit(found, args.json)
        if args.follow:
            for rec in _follow_all(logs, flt):
                _emit((rec,), args.json)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _follow_all(logs: list[str], flt: AuditFilter) -> Iterator[dict[str, Any]]:
    """New records of every log, as they come (one reader thread per extra log)."""
    if len(logs) == 1:
        yield from follow(logs[0], flt)
        return
    arrived: queue.Queue[dict[str, Any]] = queue.Queue()

    def read(log: str) -> None:
        for rec in follow(log, flt):
            arrived.put(rec)

    for log in logs:
        threading.Thread(target=read, args=(log,), name="taskgate-follow", daemon=True).start()
    while True:
        yield arrived.get()


def _verify_setup(parent: argparse.ArgumentParser) -> None:
    sub = parent.add_subparsers(dest="action", required=True, metavar="ACTION",
                                help="the audit log tool to run")
    p = sub.add_parser("verify", help="check the hash chain, across rotated files",
                       description="Check the audit log's hash chain. Exit 0 when intact, "
                                   "1 naming the first damage, 2 on a usage error.")
    p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="config file (default: ./taskgate.yaml if present)")
    p.add_argument("files", nargs="*", metavar="PATH",
                   help="log files (one log's rotated files, or several logs) or folders of "
                        "logs (*.jsonl); default: every process's log on this host and "
                        "its rotated files")
    p.add_argument("--hmac-key-file", metavar="FILE",
                   help="the chain key (default: audit.hmac_key_file from the config)")
    p.add_argument("--partial", action="store_true",
                   help="the first file may continue an earlier file not given")
    p.add_argument("--accept-torn", action="store_true",
                   help="report records cut off by a crash as warnings, not damage")
    p.add_argument("--accept-missing-head", action="store_true",
                   help="report a missing chain head or state-store anchor, or a head older "
                        "than the anchor, as warnings, not damage (a log written by an older "
                        "taskgate); records missing before the anchor stay damage")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _chain_order(files: list[str]) -> list[str]:
    """Rotated files (``x.1``, ``x.2``, … numerically) before the current ``x``."""
    def key(path: str) -> tuple[str, int, int]:
        m = re.fullmatch(r"(.*)\.(\d+)", path)
        return (m.group(1), 0, int(m.group(2))) if m else (path, 1, 0)

    return sorted(files, key=key)


def main_verify(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        key = load_hmac_key(args.hmac_key_file or config.audit_hmac_key_file)
    except (OSError, ValueError) as e:
        print(f"taskgate audit verify: cannot read the HMAC key: {safe(e)}", file=sys.stderr)
        return 2
    store = store_path(config.home)
    ours = host_logs(config.audit_path)
    reports: list[Report] = []
    if args.files:
        missing = [f for f in args.files if not os.path.exists(f)]
        if missing:
            print(f"taskgate audit verify: {safe(missing[0])}: no such file", file=sys.stderr)
            return 2
        for files in _chains(args.files):
            # One of this host's logs (the configured one or a worker's): its anchor too.
            mine = next((log for log in ours if _same_file(files[-1], log)), None)
            anchor = (read_anchor(store, key, anchor_log(config.audit_path, mine))
                      if mine is not None else None)
            reports.append(verify_files(files, key=key, partial=args.partial,
                                        accept_torn=args.accept_torn, head_of=files[-1],
                                        anchor=anchor,
                                        accept_missing_head=args.accept_missing_head))
    elif not ours or not any(log_files(log) for log in ours):
        anchor = read_anchor(store, key)
        reached = (f", though the state store's anchor ({anchor.source}) says it reached "
                   f"seq {anchor.head.seq}" if anchor.head is not None else "")
        print(f"taskgate audit verify: no audit log at {config.audit_path}{reached}",
              file=sys.stderr)
        return 1
    else:
        for log in ours:
            anchor = read_anchor(store, key, anchor_log(config.audit_path, log))
            reports.append(verify(log, key=key, partial=args.partial,
                                  accept_torn=args.accept_torn, anchor=anchor,
                                  accept_missing_head=args.accept_missing_head))
    ok = all(r.ok for r in reports)
    if args.json:
        print(safe_json(reports[0].as_dict() if len(reports) == 1 else
                        {"ok": ok, "logs": [r.as_dict() for r in reports]}))
    elif len(reports) == 1:
        print(_summary(reports[0], partial=args.partial, explicit=bool(args.files)))
    else:
        print(safe(f"{'OK' if ok else 'DAMAGED'}: {len(reports)} audit logs, each chain "
                   f"checked on its own"))
        for r in reports:
            print(safe(f"\n== {r.files[-1] if r.files else '?'}"))
            print(_summary(r, partial=args.partial, explicit=bool(args.files)))
    return 0 if ok else 1


def _chains(paths: list[str]) -> list[list[str]]:
    """The logs the paths name, each as its files in chain order: given files of one
    log (``x.1``, ``x``) stay together; a folder brings each of its logs whole."""
    chains: dict[str, list[str]] = {}
    for path in paths:
        for log in logs_in([path]):
            files = log_files(log) if os.path.isdir(path) else [log]
            base = re.sub(r"\.\d+$", "", files[-1]) if files else log
            chains.setdefault(base, []).extend(files)
    return [_chain_order(files) for files in chains.values() if files]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _summary(report: Report, *, partial: bool, explicit: bool) -> str:
    chain = "HMAC-SHA-256 (keyed)" if report.keyed else "SHA-256 (unkeyed)"
    span = (f" (seq {report.first_seq}..{report.last_seq})" if report.records else "")
    lines = []
    if report.damage is None:
        lines.append("OK: the audit log is intact")
    else:
        lines.append(f"DAMAGED: {report.damage}")
        if (report.damage.kind == "removed" and report.records == 0 and explicit
                and not partial):
            lines.append("  (checking only part of a rotated log? give every file in order, "
                         "or add --partial)")
        lines.append("  intact before the damage:")
    lines.append(f"  records: {report.records}{span}")
    if report.records:
        lines.append(f"  time:    {report.first_ts} .. {report.last_ts}")
    lines.append(f"  files:   {len(report.files)}")
    for f in report.files:
        if f in report.per_file:
            first, last = report.per_file[f]
            lines.append(f"    {f}  seq {first}..{last}")
        else:
            lines.append(f"    {f}")
    lines.append(f"  chain:   {chain}")
    if report.damage is None:
        lines.append(f"  last hash: {report.last_hash}")
        lines.append(f"  head:    {report.head} (the log reaches it)" if report.head else
                     "  head:    none (records cut from the end would not show)")
        if report.anchor is None:
            lines.append("  anchor:  not checked (verify the configured log, with -c CONFIG, "
                         "to compare with the state store)")
        elif report.anchor_seq is None:
            lines.append(f"  anchor:  none in {report.anchor}")
        else:
            lines.append(f"  anchor:  {report.anchor} seq {report.anchor_seq} "
                         "(the log reaches it)")
    for t in report.torn:
        lines.append(f"  warning: {t}")
    for w in report.warnings:
        lines.append(f"  warning: {w}")
    # A damage report may quote the log (its records came from agents): one line each.
    return "\n".join(safe(line) for line in lines)


LOGS = Command("logs", "show audit records (works while the gateway is down)", main_logs,
               _logs_setup)
AUDIT = Command("audit", "audit log tools: `audit verify [FILE...]` checks the hash chain",
                main_verify, _verify_setup)
