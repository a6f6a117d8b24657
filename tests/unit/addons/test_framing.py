"""addons/framing.py: the HTTP/1 framing patch installed on load; request trailers filtered."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import taddons

from addons.framing import Framing
from proxy.gateway import Services
from tests.unit.addons.conftest import request


def trailed(*fields: tuple[bytes, bytes]) -> http.HTTPFlow:
    f = request("POST", "http://api.example/approve/x", content=b"{}")
    f.request.trailers = http.Headers(list(fields))
    return f


async def test_loading_installs_the_framing_patch(svc: Services) -> None:
    with taddons.context(Framing(svc)):
        assert getattr(_http1, "_taskgate_framing", False)
        send = _http1.Http1Client.send
    with taddons.context(Framing(svc)):  # idempotent: a second load wraps nothing again
        assert _http1.Http1Client.send is send


async def test_framing_and_credential_trailers_are_dropped(svc: Services) -> None:
    f = trailed((b"X-Checksum", b"abc"), (b"Content-Length", b"0"),
                (b"Transfer-Encoding", b"chunked"), (b"Authorization", b"Bearer x"),
                (b"Proxy-Authorization", b"Basic y"), (b"Host", b"evil.example"))
    Framing(svc).request(f)
    assert f.request.trailers is not None
    assert f.request.trailers.fields == ((b"X-Checksum", b"abc"),)


async def test_a_trailer_section_with_nothing_to_pass_is_removed(svc: Services) -> None:
    f = trailed((b"Content-Length", b"5"), (b"Connection", b"close"))
    Framing(svc).request(f)
    assert f.request.trailers is None


async def test_pseudo_headers_and_line_breaks_never_pass(svc: Services) -> None:
    f = trailed((b":path", b"/admin"), (b"X-Split", b"a\r\nX-Evil: 1"), (b"X-Ok", b"1"))
    Framing(svc).request(f)
    assert f.request.trailers is not None and f.request.trailers.fields == ((b"X-Ok", b"1"),)


async def test_a_request_without_trailers_is_untouched(svc: Services) -> None:
    f = request("POST", "http://api.example/approve/x", content=b"{}")
    before = f.request.headers.fields
    Framing(svc).request(f)
    assert f.request.trailers is None and f.request.headers.fields == before
