"""grpcio through the gateway over TLS, set up from the environment only (lower-case
``https_proxy``, the one grpcio reads, and ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``): an
allowed unary call passes; a refused one is a gRPC error (PERMISSION_DENIED, the reason
and request id in its details), not "Received http2 header with status: 403"."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.clients.conftest import REFUSED_REASON, World

# The agent: a plain grpcio client, its trust and proxy from the environment.
CLIENT = """
import json, sys, grpc
channel = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials())
call = channel.unary_unary(sys.argv[2])
try:
    reply, info = call.with_call(b"hi", timeout=10)
    meta = dict(info.initial_metadata())
    print(json.dumps({"reply": reply.decode(), "id": meta.get("x-taskgate-request-id")}))
except grpc.RpcError as e:
    meta = dict([*(e.initial_metadata() or ()), *(e.trailing_metadata() or ())])
    print(json.dumps({"code": e.code().name, "details": e.details(),
                      "id": meta.get("x-taskgate-request-id")}))
"""


def grpc_call(world: World, method: str) -> dict[str, str]:
    env = world.env()
    out = subprocess.run([sys.executable, "-c", CLIENT, f"localhost:{world.grpc_port}",
                          method], env=env, capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_grpc_call_passes_through_the_gateway(world: World) -> None:
    got = grpc_call(world, "/grpc.Echo/Say")
    assert got["reply"] == "echo:hi", got
    rec = world.record(got["id"])
    assert (rec["decision"], rec["rule"], rec["path"]) == ("allow", "grpc", "/grpc.Echo/Say")


def test_grpc_refusal_is_a_readable_grpc_status(world: World) -> None:
    got = grpc_call(world, "/grpc.Echo/Forbidden")
    assert got["code"] == "PERMISSION_DENIED", got
    assert REFUSED_REASON in got["details"] and got["id"] in got["details"], got
    rec = world.record(got["id"])
    # The record's status is what the agent got: 200, the refusal in grpc-status.
    assert (rec["decision"], rec["status"], rec["path"]) == (
        "deny", 200, "/grpc.Echo/Forbidden")
    assert rec["reason"] == REFUSED_REASON
