"""``taskgate reload -c FILE``: have the running gateway read its config again.

``FILE`` is validated here first (a bad one is reported with its file, line and key
and the gateway is not asked); then the gateway's control plane (found through
``FILE``, as ``taskgate task`` finds it) re-reads the file it runs from and answers
what changed (``POST /v1/reload``). Exit status: 0 applied, 1 refused or not asked.
"""

from __future__ import annotations

import argparse
import sys

from proxy.cli._client import ControlClient, ControlError
from proxy.cli._common import Command, config_of
from proxy.errors import ConfigError
from proxy.safe_text import safe

__all__ = ["RELOAD"]


def _reload(args: argparse.Namespace) -> int:
    try:
        config = config_of(args)
    except ConfigError as e:
        print(f"taskgate reload: {safe(str(e))}\nthe gateway was not asked to reload; its "
              "running config stays", file=sys.stderr)
        return 1
    try:
        answer = ControlClient.from_config(config).call(
            "POST", "/v1/reload", headers={"X-Taskgate-Client": "reload"})
    except ControlError as e:
        print(f"taskgate reload: {safe(str(e))}", file=sys.stderr)
        return 1
    old, new = (safe(str(answer.get(k)))[:16] for k in ("old_digest", "new_digest"))
    print(f"reloaded {safe(str(answer.get('config')))}: config sha256:{old} -> sha256:{new}")
    for key, label in (("restart_needed", "needs a restart to change"),
                       ("revoked_tasks", "tasks revoked (beyond the new ceilings)"),
                       ("secrets_refetched", "secrets fetched anew on next use")):
        if answer.get(key):
            print(f"  {label}: {safe(', '.join(map(str, answer[key])))}")
    return 0


RELOAD = Command("reload", "have the running gateway re-read its config (validated first)",
                 _reload)
