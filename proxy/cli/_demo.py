"""``taskgate demo``: a self-contained tour of the gateway, on loopback, in seconds.

A real ``taskgate run`` with a generated config, a local HTTPS API and MCP
server, and a scripted agent making allowed and refused calls through a task's
``proxy_url``; prints each call as it goes, then the audit log's verdict and
where to look further. Exit 0 when every step went as scripted, 1 when one did
not, 2 when the gateway would not start, 130 when interrupted.
"""

from __future__ import annotations

import argparse

from proxy.cli._common import Command

__all__ = ["DEMO", "main_demo"]


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", metavar="DIR",
                   help="keep the gateway's config, state and audit log in DIR (kept); "
                        "default: a temp folder, removed at the end")
    p.add_argument("--serve", action="store_true",
                   help="after the tour, keep everything running (review page, logs) "
                        "until Ctrl-C")


def main_demo(args: argparse.Namespace) -> int:
    # Imported here for start-up cost: the tour (proxy/demo/_run.py, with httpx and its
    # upstreams) adds ~0.07 s to the CLI's ~0.23 s, which no other subcommand needs.
    from proxy.demo import run

    return run(args.home, args.serve)


DEMO = Command("demo", "a self-contained tour: gateway, local API and MCP server, a scripted "
               "agent's allowed and refused calls", main_demo, _setup)
