"""Ceilings bound three opt-ins: private addresses (allow_private), cleartext secrets and
WebSocket upgrades (websocket)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.policy import breach, parse_rule


def rule(**kw: Any) -> Any:
    kw.setdefault("id", "t")
    kw.setdefault("methods", ["GET"])
    return parse_rule(kw)


API = dict(host="api.good.test", secret="key")
WILD = dict(host="*.good.test", secret="key")


@pytest.mark.parametrize(("task", "ceiling", "key"), [
    # cleartext injection: the ceiling must say scheme: http itself
    (dict(API, scheme="http"), dict(API), "secret"),
    (dict(API, scheme="http", port=8080), dict(API, port=8080), "secret"),
    (dict(API, scheme="http"), dict(API, scheme="http"), None),
    (dict(API, scheme="https"), dict(API), None),
    (dict(API), dict(API), None),  # no scheme: injected over https only
    (dict(API, scheme="http"), dict(API, scheme="https"), "scheme"),  # not within at all
    (dict(host="api.good.test", scheme="http"), dict(API), None),  # no secret: plain http ok
    (dict(host="x.good.test", scheme="http", secret="key"), dict(WILD), "secret"),
    (dict(host="*.x.good.test", scheme="http", secret="key"), dict(WILD), "secret"),
    (dict(host="x.good.test", scheme="http", secret="key"), dict(WILD, scheme="http"), None),
    (dict(host="x.good.test", scheme="http"), dict(WILD), None),
    # allow_private: only where the ceiling opts in
    (dict(API, allow_private=True), dict(API), "allow_private"),
    (dict(API, allow_private=True), dict(API, allow_private=True), None),
    (dict(API), dict(API, allow_private=True), None),  # the task may leave it out
    (dict(host="x.good.test", allow_private=True), dict(WILD), "allow_private"),
    (dict(host="x.good.test", allow_private=True), dict(WILD, allow_private=True), None),
    (dict(host="*.x.good.test", allow_private=True), dict(WILD, allow_private=True), None),
    # an address as the host is its own opt-in, on both sides
    (dict(host="10.0.0.5", allow_private=True), dict(host="10.0.0.5"), None),
    (dict(host="10.0.0.5"), dict(host="10.0.0.5"), None),
    # websocket: only where the ceiling opts in
    (dict(API, websocket=True), dict(API), "websocket"),
    (dict(API, websocket=True), dict(API, websocket=True), None),
    (dict(API), dict(API, websocket=True), None),  # the task may leave it out
    (dict(host="x.good.test", websocket=True), dict(WILD), "websocket"),
])
def test_breach(task: dict[str, Any], ceiling: dict[str, Any], key: str | None) -> None:
    got = breach(rule(**task), [rule(id="c", **ceiling)])
    assert (got.key if got else None) == key, got
    if got is not None:
        assert got.rule == "t" and "'c'" in got.reason
    if key == "secret":
        assert "cleartext" in got.reason and "scheme: http" in got.reason
    if key == "allow_private":
        assert "allow_private: true" in got.reason
    if key == "websocket":
        assert "websocket: true" in got.reason


def test_cleartext_is_allowed_by_one_of_several_ceiling_rules() -> None:
    ceiling = [rule(id="c-https", **API), rule(id="c-http", scheme="http", **API)]
    assert breach(rule(scheme="http", **API), ceiling) is None


@pytest.mark.parametrize(("data", "ok"), [
    ({"allow_private": True}, True), ({"allow_private": False}, True),
    ({"allow_private": "yes"}, False), ({"allow_private": 1}, False),
    ({"allow_private": None}, False),
])
def test_allow_private_is_a_boolean(data: dict[str, Any], ok: bool) -> None:
    if ok:
        r = rule(host="db.good.test", **data)
        assert r.private_ok is data["allow_private"]
        assert ("allow_private" in r.to_dict()) is data["allow_private"]
    else:
        with pytest.raises(ValueError, match=r"^allow_private: .*use true"):
            rule(host="db.good.test", **data)


@pytest.mark.parametrize(("value", "ok"), [
    (True, True), (False, True), ("yes", False), (1, False), (None, False), ("true", False),
])
def test_websocket_is_a_boolean(value: Any, ok: bool) -> None:
    if ok:
        r = rule(host="rt.good.test", websocket=value)
        assert r.websocket is value and ("websocket" in r.to_dict()) is value
    else:
        with pytest.raises(ValueError, match=r"^websocket: .*use true"):
            rule(host="rt.good.test", websocket=value)


def test_mcp_messages_of_a_websocket_cannot_be_held_for_approval() -> None:
    """Each message is judged as it passes; none can wait for a person: refused, never
    let through unheld."""
    with pytest.raises(ValueError, match=r"^websocket: .*cannot be held for approval"):
        parse_rule({"id": "t", "host": "rt.good.test", "mcp": {"tools": ["a"]},
                    "approval": "required", "websocket": True})
    assert rule(host="rt.good.test", approval="required", websocket=True).websocket


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("::1", True), ("localhost", False),
    ("*.good.test", False), ("api.good.test", False),
])
def test_an_address_host_is_an_opt_in(host: str, ok: bool) -> None:
    assert rule(host=host).private_ok is ok
