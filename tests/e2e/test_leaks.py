"""Secrets that leak back after injection, end to end (issue 10, items 4, 8 and 9).

A real gateway injects a real secret (an env value with ``/ + _ .`` in it, so
every escape applies) into calls to a hostile upstream (tests/leak_upstream.py)
that echoes it back in every reversible spelling — body buffered or streamed
three bytes at a time, content- or transfer-encoded, header names and values,
the reason phrase, HTTP/2 trailers, malformed answers that make mitmproxy fail
— and serves decompression bombs. Whatever the agent, the audit log and the
gateway's output received is scanned for every spelling.
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
import trustme

from tests.e2e import assert_refusal
from tests.leak_upstream import SPELL, LeakUpstream, stretches
from tests.standins import server_tls
from tests.support import AUDIENCE, ISSUER, WORKLOAD, Gateway, Keys
from tests.wire import Tunnel, request_bytes

SECRET = f"sk-{uuid.uuid4().hex}/Ab+Cd_Ef.Gh"
QUERY_SECRET = f"qk-{uuid.uuid4().hex}"
RECEIVED: list[bytes] = []
LEAK_PATHS = ["/buffered/**", "/chunked/**", "/ce/**", "/ce-stream/**", "/te/**", "/reason/**",
              "/header-name/**", "/header-value/**", "/malformed/**", "/h2/**", "/canned/**"]


@dataclass
class World:
    gw: Gateway
    up: LeakUpstream
    token: str

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.up.port}{path}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA,
          shared_files: dict[str, Path], keys: Keys) -> Iterator[World]:
    up = LeakUpstream(server_tls(test_ca)).start()
    port = up.port
    config = {
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(shared_files["jwks"])}]},
        "secrets": {
            "leak-key": {"provider": "env", "var": "TG_LEAK_KEY",
                         "inject": {"header": "X-Api-Key"}},
            "leak-query": {"provider": "env", "var": "TG_LEAK_QUERY",
                           "inject": {"query": "api_key"}},
        },
        "workloads": {WORKLOAD: {"standing": [
            {"id": "leak", "host": "localhost", "allow_private": True,
             "port": port, "methods": ["GET"],
             "paths": LEAK_PATHS, "secret": "leak-key"},
            {"id": "query", "host": "localhost", "allow_private": True,
             "port": port, "methods": ["GET"],
             "paths": ["/query/**"], "secret": "leak-query"},
            {"id": "plain", "host": "127.0.0.1", "port": port, "methods": ["GET"],
             "paths": ["/canned/**", "/buffered/**"]},
        ]}},
    }
    gw = Gateway(tmp_path_factory.mktemp("gw-leaks"), config,
                 env={"TG_LEAK_KEY": SECRET, "TG_LEAK_QUERY": QUERY_SECRET}).start()
    try:
        yield World(gw, up, keys.token())
    finally:
        gw.stop()
        up.stop()


def get(w: World, path: str, host: str = "localhost", **kw: Any) -> httpx.Response:
    with w.gw.client(w.token) as c:
        r = c.get(w.url(path, host), **kw)
    RECEIVED.append(f"{r.status_code} {r.reason_phrase}\n".encode()
                    + b"".join(k + b": " + v + b"\n" for k, v in r.headers.raw)
                    + b"\n" + r.content)
    return r


def leaked(blob: bytes) -> list[bytes]:
    return [s for s in stretches(SECRET) if s in blob]


def assert_clean(r: httpx.Response) -> None:
    whole = RECEIVED[-1]
    assert leaked(whole) == [], whole[:400]


def _injected(w: World) -> None:
    assert w.up.seen[-1]["headers"].get("x-api-key") == SECRET


# -- 4c: every spelling, buffered and streamed ----------------------------------
SPELLINGS = sorted(SPELL)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_buffered_body_echo_is_masked(world: World, spelling: str) -> None:
    r = get(world, f"/buffered/{spelling}")
    assert r.status_code == 200, r.text
    _injected(world)
    assert_clean(r)
    assert b"REDACTED" in r.content
    assert len(r.content) == int(r.headers["content-length"])


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_streamed_body_echo_split_every_three_bytes_is_masked(world: World,
                                                              spelling: str) -> None:
    r = get(world, f"/chunked/{spelling}")
    assert r.status_code == 200, r.text
    assert "content-length" not in r.headers
    assert_clean(r)
    assert b"REDACTED" in r.content and r.content.endswith(b'"}')


CODED = ["gzip", "deflate", "br", "gzip+br", "br+deflate"]


# (route, spelling): "ce" answers with one buffered body, "ce-stream" streams it.
CODED_ECHOES = [*(("ce", s) for s in ("plain", "pct-lower", "html-hex", "utf16-le")),
                *(("ce-stream", s) for s in ("plain", "hex-upper", "json-u"))]


@pytest.mark.parametrize("coding", CODED)
@pytest.mark.parametrize(("route", "spelling"), CODED_ECHOES,
                         ids=[f"{'streamed' if r == 'ce-stream' else 'buffered'}-{s}"
                              for r, s in CODED_ECHOES])
def test_content_encoded_echo_is_decoded_and_masked(world: World, coding: str, route: str,
                                                    spelling: str) -> None:
    r = get(world, f"/{route}/{spelling}/{coding}")
    assert r.status_code == 200, r.text
    assert "content-encoding" not in r.headers  # sent decoded: it held an echo
    assert_clean(r)
    assert r.content.startswith(b'{"echo": "') and b"REDACTED" in r.content


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("spelling", ["plain", "pct-upper", "b64"])
def test_transfer_encoded_echo_is_decoded_and_masked(world: World, framing: str,
                                                     coding: str, spelling: str) -> None:
    r = get(world, f"/te/{spelling}/{coding}/{framing}")
    assert r.status_code == 200, r.text
    assert_clean(r)
    assert r.content.startswith(b'{"echo": "') and b"REDACTED" in r.content


# -- 4c: reason phrase, header names and values -----------------------------------
@pytest.mark.parametrize("spelling", ["plain", "pct-lower", "hex-lower", "html-dec"])
def test_reason_phrase_echo_is_masked(world: World, spelling: str) -> None:
    r = get(world, f"/reason/{spelling}")
    assert r.status_code == 401
    assert_clean(r)
    assert r.reason_phrase.startswith("invalid token REDACTED")


@pytest.mark.parametrize("spelling", ["hex-lower", "hex-upper", "b64url", "pct-partial"])
def test_header_name_echo_is_masked(world: World, spelling: str) -> None:
    r = get(world, f"/header-name/{spelling}")
    assert r.status_code == 200, r.text
    assert_clean(r)
    # base64 leaves its edge characters (they mix with neighbours): the marker in the middle
    assert any(k.lower().startswith(b"x-") and b"redacted" in k  # a masked name is lower-cased
               for k, _ in r.headers.raw), r.headers


@pytest.mark.parametrize("spelling", ["plain", "pct-lower", "html-dec", "json-u", "b64"])
def test_header_value_echo_is_masked(world: World, spelling: str) -> None:
    r = get(world, f"/header-value/{spelling}")
    assert r.status_code == 200, r.text
    assert_clean(r)
    assert "REDACTED" in r.headers["www-authenticate"]


# -- 4a: HTTP/2 trailers ---------------------------------------------------------
@dataclass
class H2Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: list[tuple[str, str]]


def h2_get(w: World, path: str) -> H2Reply:
    import h2.config
    import h2.connection
    import h2.events

    target = f"localhost:{w.up.port}"
    t = Tunnel(w.gw.proxy_port, target, w.token, timeout=20)
    assert t.connect.status == 200
    ctx = ssl.create_default_context(cafile=str(w.gw.ca))
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(t.sock, server_hostname="localhost")
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", target),
                          (":path", path), ("te", "trailers")], end_stream=True)
    sock.sendall(conn.data_to_send())
    status, headers, body, trailers = 0, {}, b"", []
    ended = False
    while not ended:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = dict(ev.headers)
                status = int(headers.pop(":status"))
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = list(ev.headers)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                 h2.events.ConnectionTerminated)):
                ended = True
        sock.sendall(conn.data_to_send())
    sock.close()
    RECEIVED.append(repr((status, headers, trailers)).encode() + body
                    + b"".join(f"{k}: {v}\n".encode() for k, v in trailers))
    return H2Reply(status, headers, body, trailers)


@pytest.mark.parametrize("mode", ["streamed", "buffered"])
@pytest.mark.parametrize("spelling", ["plain", "pct-lower", "pct-partial", "hex-upper",
                                      "html-hex", "json-u", "b64"])
def test_h2_trailers_are_masked(world: World, mode: str, spelling: str) -> None:
    reply = h2_get(world, f"/h2/{mode}/{spelling}")
    assert reply.status == 200, reply
    _injected(world)
    assert ("content-length" in reply.headers) == (mode == "buffered")
    names = [k for k, _ in reply.trailers]
    assert "grpc-message" in names, reply.trailers
    message = dict(reply.trailers)["grpc-message"]
    assert message.startswith("invalid token ") and "REDACTED" in message, message
    assert any(k.startswith("x-echo-redacted") for k in names), names  # a trailer NAME
    assert leaked(RECEIVED[-1]) == []
    assert reply.body.startswith(b"body ") and b"REDACTED" in reply.body


# -- 4b: mitmproxy's error texts quote the upstream ---------------------------------
@pytest.mark.parametrize("what", ["status-line", "header-line", "content-length",
                                  "chunk-size", "version"])
@pytest.mark.parametrize("spelling", ["plain", "pct-lower", "hex-lower"])
def test_malformed_answer_echoing_the_secret_is_not_recorded(world: World, what: str,
                                                             spelling: str) -> None:
    if what == "chunk-size":  # the head went out: the agent sees the body cut short
        with world.gw.client(world.token) as c, \
                c.stream("GET", world.url(f"/malformed/{spelling}/{what}")) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
    else:
        r = get(world, f"/malformed/{spelling}/{what}")
        assert r.status_code == 502, r.text
        assert_clean(r)
        assert r.json()["request_id"]
    _injected(world)
    time.sleep(0.3)  # the error hook's record
    audit = world.gw.audit_path.read_bytes()
    assert leaked(audit) == []
    assert leaked(world.gw.output().encode()) == []
    recs = [x for x in world.gw.audit() if x.get("rule") == "leak" and x["decision"] == "error"
            and x["path"].startswith(f"/malformed/{spelling}/{what}")]
    assert recs
    assert all(SPELL[spelling](SECRET).decode() not in (x["reason"] or "") for x in recs)


def test_control_plane_audit_api_is_clean(world: World) -> None:
    get(world, "/malformed/plain/status-line")
    admin = (world.gw.home / "admin-token").read_text().strip()
    r = httpx.get(f"{world.gw.control_url}/v1/audit", headers={
        "Authorization": f"Bearer {admin}"}, params={"limit": 1000}, timeout=10)
    assert r.status_code == 200, r.text
    assert "malformed" in r.text
    assert leaked(r.content) == []


# -- 8: the agent's own query credential, however spelled ----------------------------
@pytest.mark.parametrize("own", [
    "API_KEY=mine", "Api-Key=mine", "api%5Fkey=mine", "api%5fKEY=mine", "apikey=mine",
    "api.key=mine", "api%255Fkey=mine", "api_key%20=mine", "API%2DKEY=mine",
    "access_token=mine", "ACCESS%5FTOKEN=mine", "Access-Token=mine", "token=mine",
    "client_secret=mine", "api_key=mine&api_key=again",
])
def test_agents_own_query_credential_is_removed(world: World, own: str) -> None:
    r = get(world, f"/query/echo?x=1&{own}&y=2")
    assert r.status_code == 404, r.text  # the upstream's own answer: it has no /query
    seen = world.up.seen[-1]
    assert seen["path"] == "/query/echo"
    assert seen["params"] == [("x", "1"), ("y", "2"), ("api_key", QUERY_SECRET)], seen["query"]
    assert "mine" not in seen["query"] and "again" not in seen["query"]


@pytest.mark.parametrize("bad", ["api_key%00=mine", "api_key%0a=mine", "api%5Fkey%01=mine",
                                 "x%7f=1", "%00=1", "api_key%2500=mine"])
def test_query_names_with_control_bytes_are_refused(world: World, bad: str) -> None:
    before = len(world.up.seen)
    target = f"/query/echo?x=1&{bad}"
    with Tunnel(world.gw.proxy_port, f"localhost:{world.up.port}", world.token) as t:
        t.start_tls(world.gw.ca, "localhost")
        reply = t.request(request_bytes("GET", target, f"localhost:{world.up.port}", None))
    RECEIVED.append(reply.body)
    assert_refusal(reply.status, reply.headers, reply.body, 403, "control character")
    assert len(world.up.seen) == before


# -- 9: decompression bombs ----------------------------------------------------------
def _bombs() -> dict[str, tuple[bytes, str]]:
    zeros = b"\0" * (256 << 20)
    from backports import zstd

    br = brotli.compress(b"\0" * (1 << 30), quality=5)  # seconds of CPU: made once
    return {
        "br": (br, "br"),
        "gzip": (gzip.compress(zeros, 9), "gzip"),
        "deflate": (zlib.compress(zeros, 9), "deflate"),
        "zstd": (zstd.compress(zeros), "zstd"),
        "stacked": (gzip.compress(br), "br, gzip"),
    }


@pytest.fixture(scope="module")
def bombs(world: World) -> list[str]:
    made = _bombs()
    for name, (body, coding) in made.items():
        world.up.bodies[name] = (body, {"Content-Encoding": coding,
                                        "Content-Type": "application/json"})
    return sorted(made)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("name", ["br", "gzip", "deflate", "zstd", "stacked"])
def test_buffered_bomb_on_an_injected_call_is_refused_quickly(world: World, bombs: list[str],
                                                              name: str) -> None:
    assert world.gw.proc is not None
    done: dict[str, float] = {}

    def plain_calls() -> None:
        t0 = time.monotonic()
        for _ in range(5):
            assert get(world, "/buffered/plain").status_code == 200
        done["plain"] = time.monotonic() - t0

    t0 = time.monotonic()
    th = threading.Thread(target=plain_calls)
    th.start()
    r = get(world, f"/canned/{name}")
    elapsed = time.monotonic() - t0
    th.join(30)
    body = assert_refusal(r.status_code, r.headers, r.content, 502, "too large")
    assert body["error"]["code"] == "secret_unredactable"
    assert elapsed < 5, elapsed
    assert done["plain"] < 5, done
    assert _rss_kb(world.gw.proc.pid) < 600 * 1024  # never the decoded gigabyte


def test_bomb_on_a_call_without_a_secret_passes_undecoded(world: World,
                                                          bombs: list[str]) -> None:
    t0 = time.monotonic()
    with world.gw.client(world.token) as c, \
            c.stream("GET", world.url("/canned/br", "127.0.0.1")) as r:
        raw = b"".join(r.iter_raw())  # as sent: httpx would decode the gigabyte itself
    assert time.monotonic() - t0 < 5
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "br"
    assert raw == world.up.bodies["br"][0]


@pytest.mark.parametrize("coding", ["br", "gzip"])
def test_streamed_bomb_is_cut(world: World, coding: str) -> None:
    raw = (brotli.compress(b"\0" * (256 << 20), quality=5) if coding == "br"
           else gzip.compress(b"\0" * (64 << 20), 9))
    # An event stream is streamed whatever its length.
    world.up.bodies[f"stream-{coding}"] = (raw, {"Content-Encoding": coding,
                                                 "Content-Type": "text/event-stream"})
    t0 = time.monotonic()
    with world.gw.client(world.token) as c:
        try:
            r = c.get(world.url(f"/canned/stream-{coding}"))
            got = r.content
        except httpx.HTTPError:
            got = b""
    assert time.monotonic() - t0 < 10
    assert len(got) < 16 << 20
    rec = [x for x in world.gw.audit() if x["path"] == f"/canned/stream-{coding}"]
    assert rec and rec[-1]["decision"] == "error", rec


# -- last: nothing leaked anywhere ------------------------------------------------------
def test_secret_appears_nowhere(world: World) -> None:
    assert world.gw.stop() == 0
    blobs = {"output": world.gw.output().encode(),
             **{str(f): f.read_bytes() for f in world.gw.dir.rglob("*") if f.is_file()},
             **{f"response {i}": b for i, b in enumerate(RECEIVED)}}
    assert len(RECEIVED) > 100
    assert [(name, s[:16]) for name, blob in blobs.items() for s in leaked(blob)] == []

