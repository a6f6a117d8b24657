"""The refusal body LLM SDKs read, and a refused gRPC call's status and message."""

from __future__ import annotations

import urllib.parse
import uuid

import orjson
import pytest

from proxy.gateway import grpc_refusal, is_grpc, new_request_id, refusal_body


def test_the_error_object_carries_code_message_and_request_id() -> None:
    doc = orjson.loads(refusal_body("forbidden", "no rule allows this", "r1", rule="x"))
    assert doc == {"error": {"type": "taskgate_refusal", "code": "forbidden",
                             "message": "taskgate: no rule allows this (request id r1)",
                             "request_id": "r1"},
                   "reason": "no rule allows this", "request_id": "r1", "rule": "x"}


@pytest.mark.parametrize(("status", "code"), [(403, "7"), (407, "16"), (413, "8"),
                                              (503, "14"), (500, "13"), (418, "13")])
def test_grpc_status_of_each_refusal(status: int, code: str) -> None:
    assert grpc_refusal(status, "why", "r1")["grpc-status"] == code


@pytest.mark.parametrize("reason", ["plain words", "100% sure", "naïve: ünïcode ✓",
                                    "line\nbreak"])
def test_grpc_message_is_percent_encoded_and_round_trips(reason: str) -> None:
    message = grpc_refusal(403, reason, "r1")["grpc-message"]
    assert all(0x20 <= ord(c) <= 0x7E for c in message), message
    assert urllib.parse.unquote(message) == f"taskgate: {reason} (request id r1)"


@pytest.mark.parametrize(("content_type", "grpc"), [
    ("application/grpc", True), ("application/grpc+proto", True),
    ("Application/GRPC-web", True), ("application/json", False), (None, False),
    ("", False)])
def test_which_calls_are_grpc(content_type: str | None, grpc: bool) -> None:
    assert is_grpc(content_type) is grpc


def test_request_ids_are_random_uuids_in_hex() -> None:
    """What ``uuid.uuid4().hex`` wrote before: 32 hex digits, version 4, RFC 4122
    variant; and every id its own."""
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and len(rid) == 32
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # the bits around the version and variant stay random
    assert len({rid[12:14] for rid in ids}) > 8 and len({rid[16] for rid in ids}) == 4
