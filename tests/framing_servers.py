"""Upstreams and an HTTP/2 client that see exact bytes, for the framing tests.

``RawH1`` is an HTTP/1.1 server on a raw socket that parses request heads one after
another exactly as a lenient origin would (no framing header: no body), records
every head it parses, can answer chunked with trailers, and closes the connection
after answering a target with ``close=1``. ``H2Upstream`` is an
HTTP/2 server (h2 library) that records requests and echoes streams. ``H2Client``
speaks HTTP/2 through a CONNECT tunnel of the gateway. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tests.wire import Tunnel

TIMEOUT = 10.0


def _listener(tls_ctx: ssl.SSLContext | None) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.settimeout(0.2)
    return s


@dataclass
class Head:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""  # the first 1 MiB; all of it is counted and hashed
    body_len: int = 0
    digest: Any = field(default_factory=lambda: hashlib.sha256())
    trailers: list[tuple[str, str]] = field(default_factory=list)
    conn: int = 0

    def add(self, chunk: bytes) -> None:
        if len(self.body) < 1 << 20:
            self.body += chunk[:(1 << 20) - len(self.body)]
        self.body_len += len(chunk)
        self.digest.update(chunk)

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]


class RawH1:
    """A raw-socket HTTP/1.1 origin (plain, or TLS with ALPN http/1.1 only)."""

    def __init__(self, tls_ctx: ssl.SSLContext | None = None) -> None:
        self.tls_ctx = tls_ctx
        self.heads: list[Head] = []
        self.bad: list[bytes] = []  # lines that were parsed as a head and were none
        self._sock = _listener(tls_ctx)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns += 1
            threading.Thread(target=self._serve, args=(conn, self._conns), daemon=True).start()

    def _serve(self, raw: socket.socket, n: int) -> None:
        raw.settimeout(TIMEOUT)
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            conn = raw
            if self.tls_ctx is not None:
                conn = self.tls_ctx.wrap_socket(raw, server_side=True)
            reader = _Reader(conn)
            while True:
                line = reader.line()
                if line is None:
                    return
                if not line:
                    continue  # a stray CRLF between messages
                parts = line.split(b" ")
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                    self.bad.append(line)
                    return
                headers: list[tuple[str, str]] = []
                while (h := reader.line()):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers.append((name.strip(), value.strip()))
                head = Head(parts[0].decode(), parts[1].decode("latin-1"), headers, conn=n)
                self.heads.append(head)
                te = ",".join(head.header("transfer-encoding")).lower()
                bidi = head.target.startswith("/bidi")
                if bidi:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                if "chunked" in te:
                    while True:
                        size = int((reader.line() or b"").split(b";")[0], 16)
                        if size == 0:
                            while (t := reader.line()):
                                name, _, value = t.decode("latin-1").partition(":")
                                head.trailers.append((name.strip(), value.strip()))
                            break
                        chunk = reader.exact(size)
                        reader.line()
                        head.add(chunk)
                        if bidi:
                            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                elif head.header("content-length"):
                    left = int(head.header("content-length")[0])
                    while left:
                        chunk = reader.some(left)
                        head.add(chunk)
                        left -= len(chunk)
                if bidi:
                    conn.sendall(b"0\r\n\r\n")
                else:
                    conn.sendall(self._answer(head))
                if "close=1" in head.target:  # closes as an idle server would, unannounced
                    return

    def _answer(self, head: Head) -> bytes:
        info = json.dumps({"method": head.method, "path": head.target,
                           "body_len": head.body_len,
                           "trailers": head.trailers}).encode()
        if head.target.startswith("/trailers"):
            size = int(head.target.partition("size=")[2] or 0)
            body = info + b" " * size
            out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            out += b"Transfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                out += b"%x\r\n%s\r\n" % (len(piece), piece)
            return out + (b"0\r\nX-Checksum: abc123\r\nGrpc-Status: 0\r\n"
                          b"Content-Length: 5\r\n\r\n")
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(info), info))


class _Reader:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def _more(self) -> bool:
        data = self.conn.recv(65536)
        self.buf += data
        return bool(data)

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if len(self.buf) > 65536 or not self._more():
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def some(self, most: int) -> bytes:
        if not self.buf and not self._more():
            raise ValueError("short body")
        out, self.buf = self.buf[:most], self.buf[most:]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ValueError("short body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class H2Upstream:
    """An HTTP/2 origin over TLS (ALPN h2 only). Answers each request when its stream
    ends with JSON of what it read; ``/bidi`` echoes every DATA frame as it comes."""

    def __init__(self, tls_ctx: ssl.SSLContext) -> None:
        self.tls_ctx = tls_ctx
        self.requests: list[dict[str, Any]] = []
        self._sock = _listener(tls_ctx)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(TIMEOUT)
        with contextlib.suppress(OSError, ssl.SSLError, h2.exceptions.H2Error):
            sock = self.tls_ctx.wrap_socket(raw, server_side=True)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=False, header_encoding="utf-8"))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            streams: dict[int, dict[str, Any]] = {}
            while data := sock.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hd = dict(ev.headers)
                        streams[ev.stream_id] = {"method": hd[":method"], "path": hd[":path"],
                                                 "headers": ev.headers, "body": b"",
                                                 "trailers": []}
                        if hd[":path"].startswith("/bidi"):
                            conn.send_headers(ev.stream_id, [(":status", "200")])
                    elif isinstance(ev, h2.events.DataReceived):
                        st = streams[ev.stream_id]
                        st["body"] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if st["path"].startswith("/bidi") and ev.data:
                            conn.send_data(ev.stream_id, ev.data)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        streams[ev.stream_id]["trailers"] = ev.headers
                    elif isinstance(ev, h2.events.StreamEnded):
                        st = streams.pop(ev.stream_id)
                        self.requests.append(st)
                        if st["path"].startswith("/bidi"):
                            conn.end_stream(ev.stream_id)
                        else:
                            body = json.dumps({"method": st["method"], "path": st["path"],
                                               "body_len": len(st["body"]),
                                               "trailers": st["trailers"]}).encode()
                            conn.send_headers(ev.stream_id, [
                                (":status", "200"), ("content-type", "application/json"),
                                ("content-length", str(len(body)))])
                            conn.send_data(ev.stream_id, body, end_stream=True)
                sock.sendall(conn.data_to_send())


@dataclass
class H2Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-taskgate-request-id")


class H2Client:
    """HTTP/2 through a CONNECT tunnel of the gateway (TLS, ALPN h2 only)."""

    def __init__(self, proxy_port: int, target: str, token: str, ca: Path,
                 server_name: str = "127.0.0.1") -> None:
        self.tunnel = Tunnel(proxy_port, target, token)
        assert self.tunnel.connect.status == 200, self.tunnel.connect
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(self.tunnel.sock, server_hostname=server_name)
        self.tunnel.sock = self.sock
        assert self.sock.selected_alpn_protocol() == "h2"
        self.sock.settimeout(0.2)
        self.target = target
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        self.conn.increment_flow_control_window(1 << 24)
        self.flush()
        self.replies: dict[int, H2Reply] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.settimeout(TIMEOUT)
            self.sock.sendall(data)
            self.sock.settimeout(0.2)

    def start(self, method: str, path: str, extra: list[tuple[str, str]] | None = None,
              end: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "https"),
                                     (":authority", self.target), (":path", path),
                                     *(extra or [])], end_stream=end)
        self.replies[sid] = H2Reply()
        self.flush()
        return sid

    def data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + TIMEOUT
        while True:
            while self.conn.local_flow_control_window(sid) <= 0:
                assert time.monotonic() < deadline, "no flow-control window in time"
                self.pump(0.2)
            size = min(len(view), self.conn.local_flow_control_window(sid),
                       self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, bytes(view[:size]), end_stream=end and size == len(view))
            self.flush()
            view = view[size:]
            if not len(view):
                return

    def trailers(self, sid: int, fields: list[tuple[str, str]]) -> None:
        self.conn.send_headers(sid, fields, end_stream=True)
        self.flush()

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self.flush()

    def pump(self, seconds: float) -> None:
        """Read what arrives for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not data:
                for r in self.replies.values():
                    r.reset = r.reset or not r.ended
                return
            for ev in self.conn.receive_data(data):
                r = self.replies.get(getattr(ev, "stream_id", 0) or 0)
                if isinstance(ev, h2.events.ResponseReceived) and r:
                    for name, value in ev.headers:
                        if name == ":status":
                            r.status = int(value)
                        else:
                            r.headers[name] = value
                elif isinstance(ev, h2.events.DataReceived) and r:
                    r.body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length,
                                                        ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived) and r:
                    r.trailers.update(dict(ev.headers))
                elif isinstance(ev, h2.events.StreamEnded) and r:
                    r.ended = True
                elif isinstance(ev, h2.events.StreamReset) and r:
                    r.reset = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    for rr in self.replies.values():
                        rr.reset = rr.reset or not rr.ended
            self.flush()

    def wait(self, sid: int, timeout: float = TIMEOUT, body_len: int | None = None
             ) -> H2Reply:
        """Until the stream ends (or ``body_len`` bytes came), at most ``timeout``."""
        r = self.replies[sid]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (r.ended or r.reset) and not (
                body_len is not None and len(r.body) >= body_len):
            self.pump(0.2)
        return r

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
