"""The one control-plane client every ``taskgate`` subcommand uses.

Its address is ``TASKGATE_CONTROL_URL`` or the config's ``listen.control``
(a wildcard listen address is dialled on the loopback of the same family:
``0.0.0.0`` → ``127.0.0.1``, ``::`` → ``[::1]``); the admin token is
``TASKGATE_ADMIN_TOKEN`` or the config's ``admin_token_file``, never created
here. Proxy variables in the environment are ignored (an agent's shell may
well have ``HTTP_PROXY`` pointing at the gateway itself).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from proxy.config import Config
from proxy.identity import ENV_VAR as TOKEN_ENV
from proxy.identity import admin_token

__all__ = ["URL_ENV", "ControlClient", "ControlError", "control_url", "segment"]

URL_ENV = "TASKGATE_CONTROL_URL"
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


class ControlError(Exception):
    """The control plane could not be asked (``answered`` false: no token, unreachable,
    not an http(s) URL) or it said no (``answered`` true: the HTTP status first)."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


def control_url(host: str, port: int) -> str:
    """The URL to dial for a control plane listening on ``host:port``."""
    host = _LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def segment(value: str) -> str:
    """``value`` as one path segment: an id a user typed may hold ``/``, ``?`` or ``#``."""
    return urllib.parse.quote(value, safe="")


class ControlClient:
    """A few JSON calls to the control plane, never through an agent's HTTP_PROXY."""

    def __init__(self, base_url: str, token: str, timeout: float = 15.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ControlError(f"{base_url!r} is not an http(s) URL of the control plane",
                               answered=False)
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_config(cls, config: Config) -> ControlClient:
        """The address and token from the environment, else from ``config``."""
        url = os.environ.get(URL_ENV) or control_url(*config.control_listen)
        try:
            token = admin_token(config.admin_token_file, create=False)
        except OSError:
            raise ControlError(f"no admin token: set {TOKEN_ENV}, or run where "
                               f"{config.admin_token_file} is readable",
                               answered=False) from None
        return cls(url, token)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON answer; :class:`ControlError` for anything else."""
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.base_url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json", "Accept": "application/json",
                     **(headers or {})})
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise ControlError(f"{e.code}: {_reason(e.read(), e.reason)}",
                               answered=True) from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise ControlError(f"cannot reach the control plane at {self.base_url}: {why}",
                               answered=False) from None
        except orjson.JSONDecodeError:
            raise ControlError(f"the control plane at {self.base_url} answered {method} "
                               f"{path} with something other than JSON",
                               answered=True) from None


def _reason(body: bytes, status_text: str) -> str:
    """The control plane's error (``reason``, else ``error``) and the field it names."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace") or status_text
    if not isinstance(doc, dict):
        return str(doc)[:300]
    reason = doc.get("reason") or doc.get("error") or body[:300].decode("utf-8", "replace")
    return f"{reason} [{doc['field']}]" if doc.get("field") else str(reason)
