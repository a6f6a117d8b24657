"""Exact bytes on the wire: clients normalise paths, so ambiguity tests write their own.

``send`` writes a raw request to the proxy (plain HTTP proxying) and parses the
answer; ``Tunnel`` opens a CONNECT tunnel, optionally speaks TLS through it
with the gateway's CA, and sends raw requests inside it.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import orjson


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return orjson.loads(self.body)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("X-Taskgate-Request-Id")


def basic(token: str, user: str = "agent") -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def request_bytes(method: str, target: bytes | str, host: str, token: str | None,
                  extra: bytes = b"", body: bytes = b"") -> bytes:
    """An HTTP/1.1 request with ``target`` written exactly as given."""
    if isinstance(target, str):
        target = target.encode()
    head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
    if token is not None:
        head += b"Proxy-Authorization: " + basic(token).encode() + b"\r\n"
    if body:
        head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return head + extra + b"\r\n" + body


def read_reply(sock: socket.socket, method: str = "GET") -> Reply:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    return Reply(resp.status, resp.msg, resp.read())


def send(proxy_port: int, data: bytes, timeout: float = 10) -> Reply:
    """One raw request over a fresh connection to the proxy; the parsed reply."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        s.sendall(data)
        return read_reply(s)


class Tunnel:
    """A CONNECT tunnel through the proxy; TLS inside it on ``start_tls``."""

    def __init__(self, proxy_port: int, target: str, token: str | None,
                 timeout: float = 10) -> None:
        self.target = target
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", proxy_port),
                                                            timeout=timeout)
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if token is not None:
            head += f"Proxy-Authorization: {basic(token)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n")
        resp = http.client.HTTPResponse(self.sock, method="CONNECT")
        resp.begin()
        body = resp.read() if resp.status >= 300 else b""
        self.connect = Reply(resp.status, resp.msg, body)

    def start_tls(self, ca: Path, server_name: str) -> Tunnel:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.set_alpn_protocols(["http/1.1"])
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_name)
        return self

    def request(self, data: bytes, method: str = "GET") -> Reply:
        self.sock.sendall(data)
        return read_reply(self.sock, method)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def h2_request(tunnel: Tunnel, ca: Path, server_name: str,
               headers: list[tuple[str, str]], timeout: float = 10) -> Reply:
    """One HTTP/2 request through ``tunnel`` (TLS with ALPN h2 only), headers as given.

    The h2 library is told not to validate or normalise them, so a test can send
    what a hostile client would (a ``host`` header that disagrees, no ``:authority``).
    """
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(tunnel.sock, server_hostname=server_name)
    tunnel.sock = sock
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, resp_headers, body = 0, http.client.HTTPMessage(), b""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(65536)
        if not data:
            break
        ended = False
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                for name, value in ev.headers:
                    if name == ":status":
                        status = int(value)
                    else:
                        resp_headers[name] = value
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                 h2.events.ConnectionTerminated)):
                ended = True
        sock.sendall(conn.data_to_send())
        if ended:
            break
    return Reply(status, resp_headers, body)
