"""Thin mitmproxy addons around the taskgate core, one concern each.

:func:`default_addons` is the chain ``taskgate run`` loads, in the order hooks must
run: limits (connections per client are counted before anything is read) →
transparent (a redirected connection: only HTTP, known by its source address, held to
its original destination) → identify (who is calling) → authorize (may it) → egress
(where the name leads: every resolved address judged, the connection pinned to it) →
mcp (which tool, which arguments) → approve (does a person have to say yes) → inject
(which secret goes on the request) → approved-as-shown (the call is still what the
approver saw) → audit (the record, the request id, streaming) → websocket (an allowed
upgrade's frames, its record when it ends) → framing (mitmproxy's HTTP/1 framing
patched when loaded). Each module is also loadable on its own with
``mitmdump -s addons/<name>.py --set taskgate_config=FILE`` (addons/_standalone.py).

Every one is policy: plain imports, so a missing module stops the start, never a hook.
"""

from __future__ import annotations

from typing import Any

from addons._errors import json_error_responses
from addons.approve import Approve, ApprovedAsShown
from addons.audit import Audit
from addons.authorize import Authorize
from addons.egress import Egress
from addons.framing import Framing
from addons.identify import Identify
from addons.inject import Inject
from addons.limits import Limits
from addons.mcp import Mcp
from addons.transparent import Transparent
from addons.websocket import WebSocket
from proxy.gateway import Services

__all__ = ["CHAIN", "default_addons", "json_error_responses"]

CHAIN = (Limits, Transparent, Identify, Authorize, Egress, Mcp, Approve, Inject,
         ApprovedAsShown, Audit, WebSocket, Framing)


def default_addons(services: Services) -> list[Any]:
    """The taskgate addons, in chain order, sharing ``services``."""
    return [addon(services) for addon in CHAIN]
