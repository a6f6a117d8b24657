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

__all__ = ["Command", "Handler", "Setup", "config_of"]

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


def config_of(args: argparse.Namespace) -> Config:
    """The config ``-c`` names, else ./taskgate.yaml if present, else the defaults."""
    return load_config(getattr(args, "config", None))
