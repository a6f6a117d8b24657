"""taskgate: the egress gateway for AI agents (command line).

The subcommands are the ordered table :data:`COMMANDS`: each module exports its
:class:`~proxy.cli._common.Command` and knows nothing of this one, so imports
run one way (``_main`` → subcommand modules → ``_common``, ``_client``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from proxy import __version__
from proxy.cli._approvals import APPROVALS
from proxy.cli._audit import AUDIT, LOGS
from proxy.cli._common import Command, config_of
from proxy.cli._demo import DEMO
from proxy.cli._reload import RELOAD
from proxy.cli._setup import CA_VARS, combined_bundle
from proxy.cli._tasks import TASK
from proxy.cli._tools import TOOLS
from proxy.config import DEFAULT_FILE, load_config
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


def _ca_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="store_true",
                   help="name the combined bundle (system roots + taskgate CA) in the "
                        "exports: for agents that also reach hosts directly (NO_PROXY)")


def _ca(args: argparse.Namespace) -> int:
    from proxy.server import ensure_ca  # start-up cost, as in _run

    ca = Path(os.path.abspath(ensure_ca(config_of(args))))
    bundle = combined_bundle(ca)
    chosen = bundle if args.bundle else ca
    print(f"CA certificate:  {ca}\n"
          f"combined bundle: {bundle}  (system roots + taskgate CA)\n\n"
          "Agents must trust it; each client reads its own variable:")
    for var, who in CA_VARS:
        path = ca if var == "NODE_EXTRA_CA_CERTS" else chosen  # Node adds, never replaces
        print(f"  export {var}={shlex.quote(str(path))}  # {who}")
    print("\nThese variables replace the client's trust store (NODE_EXTRA_CA_CERTS adds to "
          "it).\nThe CA alone is right when every HTTPS call goes through the gateway "
          "(NO_PROXY empty,\nas `taskgate task create` prints it). An agent that also "
          "reaches hosts directly\n(NO_PROXY set) needs the system roots too: "
          "`taskgate ca --bundle` exports the combined bundle.")
    return 0


def _check_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="config files to validate (default: ./taskgate.yaml)")


def _check(args: argparse.Namespace) -> int:
    files = args.files or ([DEFAULT_FILE] if os.path.exists(DEFAULT_FILE) else [])
    if not files:
        print(f"taskgate check-config: name the config files to check (no ./{DEFAULT_FILE})"
              "\nusage: taskgate check-config FILE [FILE ...]", file=sys.stderr)
        return 2
    failed = 0
    for name in files:
        try:
            config = load_config(name)
        except ConfigError as e:
            print(f"taskgate: {e}", file=sys.stderr)
            failed += 1
            continue
        rules = sum(len(w.standing) + len(w.ceiling) for w in config.workloads.values())
        print(f"{name}: OK ({len(config.workloads)} workloads, {rules} rules, "
              f"{len(config.issuers)} issuers, {len(config.secrets)} secrets)")
    return 2 if failed else 0


#: Every subcommand, in the order ``taskgate --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command("run", "start the gateway (embedded defaults without a config)", _run,
            _run_setup),
    Command("ca", "print the CA certificate agents must trust, and how to trust it", _ca,
            _ca_setup),
    Command("check-config", "validate config files offline", _check, _check_setup,
            config_option=False),
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`taskgate COMMAND --help` for its options")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.config_option:
            p.add_argument("-c", "--config", metavar="FILE",
                           help="config file (default: ./taskgate.yaml if present, "
                                "else the embedded defaults)")
        cmd.setup(p)
        p.set_defaults(handler=cmd.handler, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # told with the subcommand's usage, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"taskgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
