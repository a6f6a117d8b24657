"""taskgate: the egress gateway for AI agents (command line).

The subcommands are the ordered table :data:`COMMANDS`: each module exports its
:class:`~proxy.cli._common.Command` and knows nothing of this one, so imports
run one way (``_main`` → subcommand modules → ``_common``, ``_client``).
"""

from __future__ import annotations

import argparse
import os
import sys

from proxy import __version__
from proxy.cli._approvals import APPROVALS
from proxy.cli._audit import AUDIT, LOGS
from proxy.cli._common import Command, config_of
from proxy.cli._demo import DEMO
from proxy.cli._reload import RELOAD
from proxy.cli._tasks import TASK
from proxy.cli._tools import TOOLS
from proxy.config import load_config
from proxy.errors import ConfigError

__all__ = ["COMMANDS", "build_parser", "main"]


def _run_setup(p: argparse.ArgumentParser) -> None:
    # Set by the supervisor (proxy/supervisor.py) on the workers it starts, not by people.
    p.add_argument("--worker", metavar="N:PID:PORT", help=argparse.SUPPRESS)


def _run(args: argparse.Namespace) -> int:
    # Imported here for start-up cost: the server pulls in mitmproxy (~0.3 s, doubling
    # what every other subcommand takes to start).
    from proxy.server import Worker, run

    config = config_of(args)
    if args.worker is not None:
        index, pid, port = (int(x) for x in args.worker.split(":"))
        return run(config, Worker(index, pid, port))
    if config.workers > 1:
        from proxy.supervisor import run as supervise  # start-up cost, as above

        return supervise(config)
    return run(config)


def _ca(args: argparse.Namespace) -> int:
    from proxy.server import ensure_ca  # start-up cost, as in _run

    config = config_of(args)
    path = os.path.abspath(ensure_ca(config))
    print(f"CA certificate: {path}\n")
    print("Agents must trust it. For common clients:")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"):
        print(f"  export {var}={path}")
    return 0


def _check_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the config file to validate")


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    rules = sum(len(w.standing) + len(w.ceiling) for w in config.workloads.values())
    print(f"{args.file}: OK ({len(config.workloads)} workloads, {rules} rules, "
          f"{len(config.issuers)} issuers, {len(config.secrets)} secrets)")
    return 0


#: Every subcommand, in the order ``taskgate --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command("run", "start the gateway (embedded defaults without a config)", _run,
            _run_setup),
    Command("ca", "print the CA certificate agents must trust, and how to trust it", _ca),
    Command("check-config", "validate a config file offline", _check, _check_setup),
    RELOAD,
    APPROVALS,
    LOGS,
    AUDIT,
    DEMO,
    TASK,
    TOOLS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"taskgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("-c", "--config", metavar="FILE",
                       help="config file (default: ./taskgate.yaml if present, "
                            "else the embedded defaults)")
        cmd.setup(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"taskgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
