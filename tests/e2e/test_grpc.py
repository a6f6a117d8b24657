"""gRPC through the real gateway with grpcio over TLS: the four kinds of call.

HTTP/2 request bodies without a length (every gRPC request) stream upstream as they
arrive; buffered whole, a bidirectional call would wait for a request stream that
only ends after its answers. Each call gets exactly one audit record, counted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from tests.conftest import base_config
from tests.grpc_upstream import GrpcUpstream, channel, method
from tests.support import Gateway, Keys, Upstream

FRAME = 5  # a gRPC message's prefix: compressed flag and 4-byte length


@pytest.fixture(scope="module")
def grpc_up(test_ca: trustme.CA) -> Iterator[GrpcUpstream]:
    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    srv = GrpcUpstream(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream, grpc_up: GrpcUpstream) -> Iterator[Gateway]:
    cfg = base_config(shared_files, upstream)
    (wl,) = cfg["workloads"].values()
    wl["standing"].append({"id": "grpc-echo", "host": "localhost", "allow_private": True,
                           "port": grpc_up.port, "methods": ["POST"],
                           "paths": ["/taskgate.test.Echo/*"]})
    g = Gateway(tmp_path_factory.mktemp("grpc"), cfg).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def chan(gw: Gateway, grpc_up: GrpcUpstream, keys: Keys) -> Iterator[grpc.Channel]:
    ch = channel(f"localhost:{grpc_up.port}", gw.proxy_url_with(keys.token()),
                 gw.ca.read_bytes())
    yield ch
    ch.close()


def _record(gw: Gateway, name: str, before: int) -> dict[str, Any]:
    """The one record of the call to ``name`` written after ``before`` records."""
    recs = [r for r in gw.audit()[before:] if r["path"] == method(name)]
    assert len(recs) == 1, recs
    return recs[0]


def test_unary(gw: Gateway, chan: grpc.Channel) -> None:
    before = len(gw.audit())
    assert chan.unary_unary(method("Unary"))(b"hello", timeout=10) == b"unary:hello"
    rec = _record(gw, "Unary", before)
    assert (rec["decision"], rec["rule"], rec["status"]) == ("allow", "grpc-echo", 200)
    assert rec["bytes_in"] == FRAME + len(b"hello")
    assert rec["bytes_out"] == FRAME + len(b"unary:hello")


def test_server_streaming(gw: Gateway, chan: grpc.Channel) -> None:
    before = len(gw.audit())
    answers = list(chan.unary_stream(method("ServerStream"))(b"q", timeout=10))
    assert answers == [b"server:0:q", b"server:1:q", b"server:2:q"]
    rec = _record(gw, "ServerStream", before)
    assert rec["decision"] == "allow" and rec["status"] == 200
    assert rec["bytes_out"] == sum(FRAME + len(a) for a in answers)


def test_client_streaming(gw: Gateway, chan: grpc.Channel) -> None:
    before = len(gw.audit())
    parts = [b"a" * 10, b"b" * 20_000, b"c"]
    answer = chan.stream_unary(method("ClientStream"))(iter(parts), timeout=10)
    assert answer == b"client:" + b"|".join(parts)
    rec = _record(gw, "ClientStream", before)
    assert rec["decision"] == "allow" and rec["status"] == 200
    assert rec["bytes_in"] == sum(FRAME + len(p) for p in parts)


def test_bidi_streaming_is_incremental(gw: Gateway, chan: grpc.Channel) -> None:
    """Each answer arrives while the request stream is still open: the next message
    is only sent once the previous one's answer came back."""
    before = len(gw.audit())
    outbox: queue.Queue[bytes | None] = queue.Queue()
    ended = threading.Event()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get(timeout=10)) is not None:
            yield message
        ended.set()

    answers = chan.stream_stream(method("Bidi"))(requests(), timeout=15)
    sent = []
    for i in range(3):
        message = b"message %d" % i
        outbox.put(message)
        sent.append(message)
        assert next(answers) == b"bidi:" + message
        assert not ended.is_set()  # answered before the request stream ended
    outbox.put(None)
    assert list(answers) == []
    rec = _record(gw, "Bidi", before)
    assert rec["decision"] == "allow" and rec["status"] == 200
    assert rec["bytes_in"] == sum(FRAME + len(m) for m in sent)
    assert rec["bytes_out"] == sum(FRAME + len(b"bidi:" + m) for m in sent)


def test_a_method_no_rule_names_is_refused_and_recorded(gw: Gateway, grpc_up: GrpcUpstream,
                                                        keys: Keys) -> None:
    """Outside the rule's paths: the call never reaches the service, and is recorded."""
    before = len(gw.audit())
    with channel(f"localhost:{grpc_up.port}", gw.proxy_url_with(keys.token()),
                 gw.ca.read_bytes()) as ch, pytest.raises(grpc.RpcError):
        ch.unary_unary("/taskgate.test.Other/Unary")(b"x", timeout=10)
    recs = [r for r in gw.audit()[before:] if r["path"] == "/taskgate.test.Other/Unary"]
    assert len(recs) == 1 and recs[0]["decision"] == "deny" and recs[0]["bytes_in"] == 0
