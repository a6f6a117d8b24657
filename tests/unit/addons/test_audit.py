"""addons/audit.py: one record per call, the request id on every answer, bytes counted,
nothing leaves while the log cannot be written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy import connection, flow
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from addons._base import exchange
from addons.audit import Audit
from proxy.audit import AuditLog
from proxy.gateway import REQUEST_ID_HEADER, Services
from tests.unit.addons.conftest import SECRET, refusal, request, respond

# The audit record's fields (docs/spec.md): the exchange's chain state is never among them.
RECORD_FIELDS = {"ts", "replica", "request_id", "connect_id", "workload", "task", "owner",
                 "client", "method", "scheme", "host", "port", "upstream_ip", "path", "tool",
                 "decision", "rule", "reason", "secret", "approval", "status", "bytes_in",
                 "bytes_out",
                 "websocket", "duration_ms"}


async def records(svc: Services) -> list[dict[str, Any]]:
    text = await asyncio.to_thread(Path(svc.audit.path).read_bytes)
    return [orjson.loads(line) for line in text.splitlines()]


@pytest.fixture
def unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit log's last write failed."""
    monkeypatch.setattr(AuditLog, "healthy", property(lambda self: False))


async def test_a_buffered_answer_is_recorded_once_with_its_id(svc: Services) -> None:
    audit = Audit(svc)
    f = request("POST", "http://api.example/allowed/x", content=b"12345")
    ex = exchange(f)
    ex.decision, ex.reason, ex.rule = "allow", "rule read", "read"
    ex.buffer_body = True  # chain state: not part of the record
    with taddons.context(audit):
        audit.requestheaders(f)
        audit.request(f)
        resp = respond(f, 201, b"abc")
        audit.responseheaders(f)
        await audit.response(f)
    assert resp.headers[REQUEST_ID_HEADER] == ex.request_id
    [rec] = await records(svc)
    assert set(rec) - {"prev", "hmac", "seq", "hash"} == RECORD_FIELDS
    assert rec["request_id"] == ex.request_id and rec["decision"] == "allow"
    assert (rec["status"], rec["bytes_in"], rec["bytes_out"]) == (201, 5, 3)
    assert ex.audited


async def test_a_call_nobody_decided_is_recorded_as_an_error(svc: Services) -> None:
    audit = Audit(svc)
    f = request()
    respond(f, 200, b"{}")
    await audit.response(f)
    [rec] = await records(svc)
    assert rec["decision"] == "error" and rec["reason"] == "no decision was made; refused"


async def test_a_large_request_body_streams_and_is_counted(svc: Services) -> None:
    audit = Audit(svc)
    f = request("POST", "http://api.example/allowed/x", Transfer_Encoding="chunked")
    audit.requestheaders(f)
    assert callable(f.request.stream)
    assert f.request.stream(b"abcd") == b"abcd" and exchange(f).bytes_in == 4


async def test_a_body_a_later_hook_reads_is_not_streamed(svc: Services) -> None:
    audit = Audit(svc)
    f = request("POST", "http://api.example/allowed/x", Transfer_Encoding="chunked")
    exchange(f).buffer_body = True
    audit.requestheaders(f)
    assert not f.request.stream


async def test_a_streamed_answer_is_counted(svc: Services) -> None:
    audit = Audit(svc)
    f = request()
    exchange(f).decision = "allow"
    resp = respond(f, 200, b"", Content_Type="text/event-stream")
    del resp.headers["content-length"]
    audit.responseheaders(f)
    assert callable(resp.stream)
    assert resp.stream(b"data: 1\n\n") == b"data: 1\n\n"
    assert exchange(f).bytes_out == 9


async def test_no_call_leaves_while_the_log_is_down(svc: Services, unhealthy: None) -> None:
    audit = Audit(svc)
    f = request()
    audit.requestheaders(f)
    assert "audit log" in refusal(f, 503, "unavailable")["reason"]
    late = request()  # already past requestheaders: its last look before it leaves
    audit.request(late)
    refusal(late, 503, "unavailable")


async def test_a_stream_is_withheld_while_the_log_is_down(svc: Services,
                                                         unhealthy: None) -> None:
    audit = Audit(svc)
    f = request()
    exchange(f).decision = "allow"
    resp = respond(f, 200, b"", Content_Type="text/event-stream")
    del resp.headers["content-length"]
    audit.responseheaders(f)
    refusal(f, 503, "unavailable")
    assert f.response is not None and callable(f.response.stream)
    first = f.response.stream(b"upstream bytes")
    assert b"upstream" not in b"".join(first) and b"unavailable" in b"".join(first)


async def test_an_error_is_recorded_without_the_secrets_it_quotes(svc: Services) -> None:
    audit = Audit(svc)
    f = request()
    exchange(f).decision = "allow"
    f.error = flow.Error(f"upstream said {SECRET!r}")
    await audit.error(f)
    [rec] = await records(svc)
    assert rec["decision"] == "error" and SECRET not in rec["reason"]


async def test_an_unreachable_upstream_is_recorded_as_502(svc: Services) -> None:
    audit = Audit(svc)
    f = request()
    exchange(f).decision = "allow"
    server = connection.Server(address=(f.request.host, f.request.port))
    audit.server_connect_error(server_hooks.ServerConnectionHookData(server, f.client_conn))
    f.error = flow.Error("connection refused")
    await audit.error(f)
    [rec] = await records(svc)
    assert rec["status"] == 502 and rec["decision"] == "error"


async def test_a_refused_connect_is_recorded(svc: Services) -> None:
    audit = Audit(svc)
    f = tflow.tflow()
    exchange(f).deny("no rule allows this host and port")
    respond(f, 403, b'{"error": "forbidden"}')
    audit.http_connected(f)
    await audit.http_connect_error(f)
    [rec] = await records(svc)
    assert rec["status"] == 403 and rec["decision"] == "deny"
    assert f.response is not None and f.response.headers[REQUEST_ID_HEADER] == rec["request_id"]
