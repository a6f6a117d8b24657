"""A gRPC upstream for the end-to-end tests: one generic handler per streaming kind,
no generated code (bytes in, bytes out), served over TLS with a test CA's certificate.

Every method echoes: ``Unary`` one answer, ``ServerStream`` three answers to one
request, ``ClientStream`` one answer after the whole request stream, ``Bidi`` one
answer per request message, sent as each arrives (so a buffering proxy would hang).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc

SERVICE = "taskgate.test.Echo"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"unary:" + request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(3):
        yield b"server:%d:" % i + request


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"client:" + b"|".join(requests)


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for message in requests:
        yield b"bidi:" + message


def _same(b: bytes) -> bytes:
    return b


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary, _same, _same),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, _same, _same),
    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream, _same, _same),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, _same, _same),
}


class GrpcUpstream:
    """The echo service on a loopback TLS port (``port``) until :meth:`stop`."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
        creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


def channel(target: str, proxy: str, roots: bytes) -> grpc.Channel:
    """A grpcio channel to ``target`` through the gateway at ``proxy`` (an
    ``http://user:token@host:port`` URL: grpcio sends the userinfo as Basic proxy
    credentials on its CONNECT), trusting ``roots``."""
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots),
                               options=[("grpc.http_proxy", proxy),
                                        ("grpc.enable_retries", 0)])


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"
