"""A hostile upstream for the secret-leak tests: raw HTTP/1.1 and HTTP/2 over TLS.

It reads the injected secret from the request (``X-Api-Key``) and answers with
it spelled however the path asks — in the body (buffered, streamed in small
chunks, content- or transfer-encoded), in header names and values, in the
reason phrase, in HTTP/2 trailers, or in a malformed answer that makes
mitmproxy fail. Every request is recorded (path, query, headers).
"""

from __future__ import annotations

import base64
import gzip
import html
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import brotli

SPELL: dict[str, Callable[[str], bytes]] = {
    "plain": lambda v: v.encode(),
    "hex-lower": lambda v: v.encode().hex().encode(),
    "hex-upper": lambda v: v.encode().hex().upper().encode(),
    "pct-lower": lambda v: "".join(f"%{b:02x}" for b in v.encode()).encode(),
    "pct-upper": lambda v: "".join(f"%{b:02X}" for b in v.encode()).encode(),
    "pct-partial": lambda v: "".join(f"%{b:02x}" if i % 2 else chr(b)
                                     for i, b in enumerate(v.encode())).encode(),
    "pct-quote": lambda v: quote(v, safe="").encode(),
    "pct-double": lambda v: "".join(f"%25{b:02x}" for b in v.encode()).encode(),
    "b64": lambda v: base64.b64encode(b"u:" + v.encode()),
    "b64url": lambda v: base64.urlsafe_b64encode(b"xy" + v.encode()),
    "utf16-le": lambda v: v.encode("utf-16-le"),
    "utf16-be": lambda v: v.encode("utf-16-be"),
    "html-dec": lambda v: "".join(f"&#{b};" for b in v.encode()).encode(),
    "html-hex": lambda v: "".join(f"&#x{b:X};" for b in v.encode()).encode(),
    "html-hex-padded": lambda v: "".join(f"&#x{b:04x};" for b in v.encode()).encode(),
    "html-named": lambda v: html.escape(v).replace("/", "&sol;").replace("+", "&plus;")
    .replace(".", "&period;").replace("_", "&lowbar;").encode(),
    "json-u": lambda v: "".join(f"\\u{b:04x}" for b in v.encode()).encode(),
    "json-u-upper-partial": lambda v: "".join(f"\\u{b:04X}" if i % 3 == 0 else chr(b)
                                              for i, b in enumerate(v.encode())).encode(),
    "json-slash": lambda v: v.replace("/", "\\/").encode(),
}


def stretches(v: str) -> set[bytes]:
    """Every spelling the upstream can write, to look for in what the agent got."""
    out = set()
    for name, f in SPELL.items():
        s = f(v)
        if name.startswith("b64"):  # the bytes that depend on the value alone
            s = s[4:-4]
        if name.startswith("utf16"):
            s = s[1:-1]
        out.add(s)
    return out


def _encode(body: bytes, coding: str) -> bytes:
    for c in [c.strip() for c in coding.split(",") if c.strip()]:
        body = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[c](body)
    return body


class LeakUpstream:
    """TLS on loopback; HTTP/1.1 or h2 by ALPN; one thread per connection."""

    def __init__(self, tls_ctx: ssl.SSLContext) -> None:
        tls_ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.tls = tls_ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[dict[str, Any]] = []
        self.bodies: dict[str, tuple[bytes, dict[str, str]]] = {}  # path -> canned answer
        self._stop = False

    def start(self) -> LeakUpstream:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            conn = self.tls.wrap_socket(raw, server_side=True)
            if conn.selected_alpn_protocol() == "h2":
                self._h2(conn)
            else:
                self._h1(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    # -- what to answer -----------------------------------------------------------
    def _record(self, method: str, target: str, headers: dict[str, str]) -> str:
        parts = urlsplit(target)
        self.seen.append({"method": method, "path": parts.path, "query": parts.query,
                          "params": parse_qsl(parts.query, keep_blank_values=True),
                          "headers": headers})
        return headers.get("x-api-key", "")

    # -- HTTP/1.1 -------------------------------------------------------------------
    def _h1(self, conn: ssl.SSLSocket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in head[1:])}
        secret = self._record(method, target, headers)
        path = urlsplit(target).path.strip("/").split("/")
        for piece in self._h1_answer(path, secret):
            if isinstance(piece, float):
                time.sleep(piece)
            else:
                conn.sendall(piece)
        try:
            conn.unwrap()
        except (OSError, ssl.SSLError):
            pass

    def _h1_answer(self, path: list[str], v: str) -> list[bytes | float]:
        kind = path[0]
        if kind == "canned":  # /canned/<name>: a fixed body (bombs)
            body, hdrs = self.bodies[path[1]]
            head = "".join(f"{k}: {x}\r\n" for k, x in hdrs.items())
            return [f"HTTP/1.1 200 OK\r\n{head}Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode(), body]
        spelled = SPELL[path[1]](v) if len(path) > 1 and path[1] in SPELL else v.encode()
        body = b'{"echo": "' + spelled + b'"}'
        if kind == "buffered":
            return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body]
        if kind == "chunked":  # streamed, cut every 3 bytes
            out: list[bytes | float] = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                        b"Transfer-Encoding: chunked\r\n"
                                        b"Connection: close\r\n\r\n"]
            for i in range(0, len(body), 3):
                piece = body[i:i + 3]
                out += [b"%x\r\n%s\r\n" % (len(piece), piece), 0.002]
            return [*out, b"0\r\n\r\n"]
        if kind in ("ce", "ce-stream"):  # /ce/<spelling>/<codings>: Content-Encoding
            coding = path[2].replace("+", ",")
            enc = _encode(body, coding)
            if kind == "ce":
                return [f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n"
                        f"Content-Length: {len(enc)}\r\nConnection: close\r\n\r\n".encode(),
                        enc]
            out = [f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n"
                   "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()]
            for i in range(0, len(enc), 7):
                out += [b"%x\r\n%s\r\n" % (len(enc[i:i + 7]), enc[i:i + 7]), 0.002]
            return [*out, b"0\r\n\r\n"]
        if kind == "te":  # /te/<spelling>/<coding>: Transfer-Encoding: gzip[, chunked]
            coding = path[2]
            enc = _encode(body, coding)
            if len(path) > 3 and path[3] == "chunked":
                return [f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}, chunked\r\n"
                        "Connection: close\r\n\r\n".encode(),
                        b"%x\r\n%s\r\n0\r\n\r\n" % (len(enc), enc)]
            return [f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n"
                    "Connection: close\r\n\r\n".encode(), enc]
        if kind == "reason":
            return [b"HTTP/1.1 401 invalid token " + spelled + b"\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\nno"]
        if kind == "header-name":  # hex / base64url spell a valid field name
            return [b"HTTP/1.1 200 OK\r\nX-" + spelled.rstrip(b"=")
                    + b": 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"]
        if kind == "header-value":
            return [b"HTTP/1.1 200 OK\r\nWWW-Authenticate: Bearer error=\"" + spelled
                    + b"\"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"]
        if kind == "malformed":  # mitmproxy cannot parse these; its error quotes them
            return [{
                "status-line": b"HTTP/1.1 2x0 token " + spelled + b"\r\n\r\n",
                "header-line": b"HTTP/1.1 200 OK\r\nbad header " + spelled + b"\r\n\r\n",
                "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: " + spelled
                + b"\r\n\r\n",
                "chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + spelled + b"\r\n",
                "version": b"HTTP/9 200 " + spelled + b"\r\n\r\n",
            }[path[2]]]
        return [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"]

    # -- HTTP/2 ---------------------------------------------------------------------
    def _h2(self, conn: ssl.SSLSocket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        h2c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_outbound_headers=False))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for ev in h2c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    hdrs = dict(ev.headers)
                    secret = self._record(hdrs[":method"], hdrs[":path"],
                                          {k: v for k, v in hdrs.items()
                                           if not k.startswith(":")})
                    self._h2_answer(h2c, conn, ev.stream_id,
                                    urlsplit(hdrs[":path"]).path.strip("/").split("/"), secret)
            conn.sendall(h2c.data_to_send())

    def _h2_answer(self, h2c: Any, conn: ssl.SSLSocket, sid: int, path: list[str],
                   v: str) -> None:
        # /h2/<streamed|buffered>/<spelling>: the secret in a trailer (grpc-message)
        # and in the body.
        spelled = SPELL[path[2]](v).decode("latin-1")
        body = b"body " + spelled.encode("latin-1")
        headers = [(":status", "200"), ("content-type", "application/grpc")]
        if path[1] == "buffered":
            headers.append(("content-length", str(len(body))))
        h2c.send_headers(sid, headers)
        conn.sendall(h2c.data_to_send())
        for i in range(0, len(body), 5):
            h2c.send_data(sid, body[i:i + 5])
            conn.sendall(h2c.data_to_send())
            time.sleep(0.002)
        h2c.send_headers(sid, [("grpc-status", "16"),
                               ("grpc-message", f"invalid token {spelled}"),
                               ("x-echo-" + SPELL["hex-lower"](v).decode(), "1")],
                         end_stream=True)
        conn.sendall(h2c.data_to_send())
