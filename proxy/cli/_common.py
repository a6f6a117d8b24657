"""What every subcommand module shares: the entry type and the config it reads.

Subcommand modules export :class:`Command` values; :mod:`proxy.cli._main`
imports them and builds the parser from its one ordered table. Nothing here
imports a subcommand, so imports run one way: ``_main`` → subcommands → here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Config, load_config

__all__ = ["Command", "Handler", "Setup", "config_of", "control_config_option"]

Handler = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], None]


def _no_arguments(p: argparse.ArgumentParser) -> None:
    """A subcommand with no options of its own (``-c`` is added for every one)."""


@dataclass(frozen=True, slots=True)
class Command:
    """One ``taskgate`` subcommand: its name, one-line help, options and handler."""

    name: str
    help: str
    handler: Handler
    setup: Setup = _no_arguments
    config_option: bool = True  # ``-c FILE``; check-config names its files as arguments


def control_config_option(*parsers: argparse.ArgumentParser) -> None:
    """``-c FILE`` on the actions of a command that talks to the control plane: they
    are subparsers of their own, where the command's ``-c`` does not reach."""
    for parser in parsers:
        parser.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="config file (for listen.control and admin_token_file)")


def config_of(args: argparse.Namespace) -> Config:
    """The config ``-c`` names, else ./taskgate.yaml if present, else the defaults."""
    return load_config(getattr(args, "config", None))
