"""Where a secret's value goes on the outbound request: a header, a query parameter, basic auth.

``inject`` in a secret's config is one of::

    {header: NAME, value: TEMPLATE}      # value defaults to '{token}'
    {query: PARAM}
    {basic: {username: TEMPLATE, password: TEMPLATE}}   # password defaults to '{token}'

Templates may use ``{token}`` and nothing else. Left out, ``inject`` is
``{header: Authorization, value: 'Bearer {token}'}``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from ._keys import Keys
from .value import SecretValue

__all__ = ["CREDENTIAL_PARAMS", "InjectSpec", "Placement", "parse_inject", "query_name",
           "set_query_param", "strip_query_params"]

_TOKEN = "{token}"  # noqa: S105 - the placeholder, not a password
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_.~-]{1,64}$")
# Headers the gateway or HTTP itself owns; a secret never goes there.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "proxy-authorization", "proxy-connection", "keep-alive", "x-taskgate-request-id",
})


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one injected value goes: a header (``query`` False) or a query parameter."""

    name: str
    value: SecretValue
    query: bool = False


@dataclass(frozen=True, slots=True)
class InjectSpec:
    """How a secret's value is put on the outbound request."""

    kind: str  # "header" | "query" | "basic"
    name: str  # header name (Authorization for basic) or query parameter
    template: str = _TOKEN
    username: str = ""
    password: str = _TOKEN

    def render(self, token: SecretValue) -> Placement:
        value = token.reveal()
        if self.kind == "basic":
            pair = (self.username.replace(_TOKEN, value) + ":"
                    + self.password.replace(_TOKEN, value))
            text = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
            return Placement(self.name, SecretValue(text))
        text = self.template.replace(_TOKEN, value)
        return Placement(self.name, SecretValue(text), query=self.kind == "query")


def set_query_param(target: bytes, name: str, value: str | None) -> bytes:
    """``target`` with every ``name`` parameter (however encoded) replaced by one ``value``
    (or only removed, for ``None``).

    Works on the raw request target so the agent's other parameters keep their
    exact bytes.
    """
    path, sep, query = target.partition(b"?")
    kept = [item for item in query.split(b"&") if item
            and unquote_plus(item.partition(b"=")[0].decode("latin-1")) != name] if sep else []
    if value is not None:
        kept.append(f"{quote(name, safe='')}={quote(value, safe='')}".encode("ascii"))
    elif not kept:
        return path
    return path + b"?" + b"&".join(kept)


# Query parameters an agent could authenticate with on its own, beside an injected one
# (RFC 6750 2.3's access_token, and the common API-key spellings). Compared folded.
CREDENTIAL_PARAMS = ("access_token", "api_key", "apikey", "api_token", "auth_token", "token",
                     "client_secret", "password", "secret", "id_token", "refresh_token")
_FOLD_DROP = str.maketrans("", "", "-_. \t")
# On a rule whose secret goes in a header: the bearer token's query form (RFC 6750 2.3).
HEADER_SECRET_PARAMS = ("access_token",)


def replaced_params(inject: InjectSpec) -> tuple[str, ...]:
    """Query parameters taken off an agent's call when ``inject``'s secret is added: the
    inject addon strips them, and an approver is shown the call without them."""
    if inject.kind == "query":
        return (inject.name, *CREDENTIAL_PARAMS)
    return HEADER_SECRET_PARAMS


def query_name(raw: bytes) -> str:
    """A query parameter's name as an upstream may read it: percent-decoded (twice, for a
    server that decodes again), case-folded, with ``-``, ``_``, ``.`` and blanks
    dropped (``Api-Key``, ``API_KEY``, ``api%5Fkey`` are all ``apikey``).

    Raises ValueError for a name with a control character (``api_key%00``): one
    server may cut it there and another keep it."""
    name = raw.decode("latin-1")
    for _ in range(2):
        name = unquote_plus(name, encoding="latin-1")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError("a query parameter name holds a control character")
    return name.casefold().translate(_FOLD_DROP)


def strip_query_params(target: bytes, names: tuple[str, ...]) -> bytes:
    """``target`` without every query parameter whose :func:`query_name` is one of
    ``names``'s; the others keep their exact bytes. Raises ValueError as
    :func:`query_name` does."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target
    folded = {query_name(n.encode("ascii")) for n in names}
    kept = [item for item in query.split(b"&")
            if item and query_name(item.partition(b"=")[0]) not in folded]
    return path + b"?" + b"&".join(kept) if kept else path


def _template(k: Keys, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise k.fail(key, f"{value!r} is not a string template such as 'Bearer {{token}}'")
    rest = value.replace(_TOKEN, "")
    if "{" in rest or "}" in rest:
        raise k.fail(key, f"{value!r}: the only placeholder is {{token}}")
    if any(c in value for c in "\r\n\0"):
        raise k.fail(key, "a template cannot hold line breaks or NUL")
    return value


def parse_inject(where: str, data: Any) -> InjectSpec:
    if data is None:
        return InjectSpec("header", "Authorization", "Bearer {token}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected {{header: NAME, value: 'Bearer {{token}}'}}, "
                         "{query: PARAM} or {basic: {username: ..., password: '{token}'}}")
    k = Keys(where, data)
    kinds = [kind for kind in ("header", "query", "basic") if kind in data]
    if len(kinds) != 1:
        raise k.fail(None, "give exactly one of header, query or basic")
    kind = kinds[0]
    allowed = {"header": ("header", "value"), "query": ("query",), "basic": ("basic",)}[kind]
    for key in data:
        if key not in allowed:
            raise k.fail(key, f"unknown key; with {kind!r} use {', '.join(allowed)}")
    if kind == "header":
        name = k.str("header")
        assert name is not None
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise k.fail("header", f"{name!r} cannot carry a secret")
        template = _template(k, "value", data.get("value", _TOKEN))
        if _TOKEN not in template:
            raise k.fail("value", f"{template!r} does not use {{token}}")
        return InjectSpec("header", name, template)
    if kind == "query":
        name = k.str("query")
        assert name is not None
        if not _QUERY_NAME.match(name):
            raise k.fail("query", f"{name!r} is not a plain query parameter name")
        return InjectSpec("query", name)
    basic = data["basic"]
    bk = Keys(f"{where}.basic", basic if isinstance(basic, Mapping) else {})
    if not isinstance(basic, Mapping):
        raise bk.fail(None, "expected {username: TEMPLATE, password: TEMPLATE}")
    for key in basic:
        if key not in ("username", "password"):
            raise bk.fail(key, "unknown key; use username and password")
    user = _template(bk, "username", basic.get("username", ""))
    password = _template(bk, "password", basic.get("password", _TOKEN))
    if ":" in user.replace(_TOKEN, ""):
        raise bk.fail("username", "a basic-auth username cannot contain ':'")
    if _TOKEN not in user + password:
        raise bk.fail(None, "username or password must use {token}")
    return InjectSpec("basic", "Authorization", username=user, password=password)
