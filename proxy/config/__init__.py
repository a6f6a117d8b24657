"""The config file: its model and defaults, and the checks of every file it references.
"""

from __future__ import annotations

from proxy.config._model import DEFAULT_FILE, Config, Network, WorkloadConfig, load_config

__all__ = [
    "DEFAULT_FILE",
    "Config",
    "Network",
    "WorkloadConfig",
    "load_config",
]
