"""The admin token that guards the control plane."""

from __future__ import annotations

import os
import secrets

__all__ = ["ENV_VAR", "admin_token"]

ENV_VAR = "TASKGATE_ADMIN_TOKEN"


def admin_token(path: str, *, create: bool = True) -> str:
    """``TASKGATE_ADMIN_TOKEN`` if set, else the token file (made, mode 0600, if absent)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env.strip()
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        if not create:
            raise
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token
