"""taskgate: the egress gateway for AI agents (command line).

Subcommands register themselves in :data:`COMMANDS` (name → (help, setup,
handler)); later features add theirs from their own modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from proxy.config import Config, load_config
from proxy.errors import ConfigError

__all__ = ["COMMANDS", "main"]

Handler = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[str, Setup, Handler]] = {}


def command(name: str, help: str, setup: Setup | None = None
            ) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (help, setup or (lambda p: None), fn)
        return fn

    return register


def config_of(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


@command("run", "start the gateway (embedded defaults without a config)")
def _run(args: argparse.Namespace) -> int:
    from proxy.server import run

    return run(config_of(args))


@command("ca", "print the CA certificate agents must trust, and how to trust it")
def _ca(args: argparse.Namespace) -> int:
    from proxy.server import ensure_ca

    config = config_of(args)
    path = os.path.abspath(ensure_ca(config))
    print(f"CA certificate: {path}\n")
    print("Agents must trust it. For common clients:")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"):
        print(f"  export {var}={path}")
    return 0


def _check_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the config file to validate")


@command("check-config", "validate a config file offline", _check_setup)
def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    rules = sum(len(w.standing) + len(w.ceiling) for w in config.workloads.values())
    print(f"{args.file}: OK ({len(config.workloads)} workloads, {rules} rules, "
          f"{len(config.issuers)} issuers, {len(config.secrets)} secrets)")
    return 0


def _load_plugins() -> None:
    """Import the modules whose subcommands register themselves (they import this
    module, so not at the top); one that fails to import is an error, not a gap."""
    from proxy.cli import _approvals, _audit, _demo, _tasks  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="taskgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", metavar="FILE",
                       help="config file (default: ./taskgate.yaml if present, "
                            "else the embedded defaults)")
        setup(p)
        p.set_defaults(handler=handler)
    return parser


def _version() -> str:
    from proxy import __version__

    return f"taskgate {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"taskgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
