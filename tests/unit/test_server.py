"""proxy/server.py's mitmproxy options: the transparent listener next to the regular one,
and nothing on either relayed without being read (no raw TCP/UDP, no ignored hosts)."""

from __future__ import annotations

import warnings

import pytest
from mitmproxy.proxy import mode_specs

from proxy.config import Config

with warnings.catch_warnings():
    # mitmproxy.master imports ldap3 (for proxyauth), which uses names pyasn1 deprecated.
    warnings.simplefilter("ignore", DeprecationWarning)
    from proxy.server import mitm_options


def test_no_transparent_listener_unless_configured() -> None:
    assert mitm_options(Config(), "ca.pem")["mode"] == ["regular@8080"]


@pytest.mark.parametrize(("listen", "spec", "host"), [
    (("0.0.0.0", 8082), "transparent@0.0.0.0:8082", "0.0.0.0"),
    (("10.77.0.1", 8082), "transparent@10.77.0.1:8082", "10.77.0.1"),
    (("::", 8082), "transparent@:8082", ""),  # both families, one port
])
def test_transparent_listener_next_to_the_regular_one(listen: tuple[str, int], spec: str,
                                                      host: str) -> None:
    modes = mitm_options(Config(transparent_listen=listen), "ca.pem")["mode"]
    assert modes == ["regular@8080", spec]
    parsed = mode_specs.ProxyMode.parse(modes[1])
    assert isinstance(parsed, mode_specs.TransparentMode)
    assert (parsed.listen_host(), parsed.listen_port()) == (host, 8082)


def test_nothing_is_relayed_unread() -> None:
    opts = mitm_options(Config(transparent_listen=("0.0.0.0", 8082)), "ca.pem")
    assert opts["rawtcp"] is False and opts["http3"] is False
    # WebSocket frames are read: each one passes addons/websocket.py (counted, judged).
    assert opts["websocket"] is True
    assert opts["tcp_hosts"] == opts["udp_hosts"] == []
    assert opts["ignore_hosts"] == opts["allow_hosts"] == []
