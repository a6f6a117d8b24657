"""The gateway for addons loaded on their own (``mitmdump -s addons/<name>.py``).

Inside ``taskgate run`` the server hands every addon the services it built. Under
plain mitmdump there is no server: the first addon to start builds the services
from the ``taskgate_config`` option (one set per config file, shared by every addon
loaded), and they live as long as the process.
"""

from __future__ import annotations

import contextlib

from addons._errors import json_error_responses
from addons._h1_framing import install as install_framing
from proxy.config import load_config
from proxy.gateway import Services, build

__all__ = ["shared_services"]

_shared: dict[str | None, Services] = {}
_stack = contextlib.AsyncExitStack()  # never closed: the services end with the process


async def shared_services(config_path: str | None) -> Services:
    """The services for ``config_path``, built on first use."""
    if config_path not in _shared:
        json_error_responses()
        install_framing()  # the chain's Framing addon does this inside `taskgate run`
        _shared[config_path] = await _stack.enter_async_context(
            build(load_config(config_path)))
    return _shared[config_path]
