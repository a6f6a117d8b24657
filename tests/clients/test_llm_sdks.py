"""The openai and anthropic Python SDKs through the real gateway, set up from the
environment only (``HTTPS_PROXY``, ``SSL_CERT_FILE``): a call passes, a stream arrives
event by event, and a refusal's reason and request id are in the exception's message
(the SDKs build it from the body's ``error`` object: proxy/gateway/_core.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import anthropic
import openai
import pytest

from tests.clients.conftest import EVENTS, REFUSED_REASON, World, incremental


@pytest.fixture
def agent_env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """The process environment of an agent: the SDKs read proxy and CA from it."""
    for name, value in world.env().items():
        monkeypatch.setenv(name, value)
    return world


def _openai(world: World) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{world.origin}/v1", api_key="sk-test", max_retries=0)


def _anthropic(world: World) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=world.origin, api_key="sk-ant-test", max_retries=0)


def test_openai_call_passes_and_is_recorded(agent_env: World) -> None:
    raw = _openai(agent_env).chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "hello"
    rec = agent_env.record(raw.headers["x-taskgate-request-id"])
    assert (rec["decision"], rec["rule"], rec["status"], rec["path"]) == (
        "allow", "api", 200, "/v1/chat/completions")


def test_openai_stream_is_incremental(agent_env: World) -> None:
    stamps = []
    stream = _openai(agent_env).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
    assert len(stamps) == EVENTS and incremental(stamps), stamps


def _refused_call(world: World) -> None:
    _openai(world).embeddings.create(model="e", input="x")  # /v1/embeddings: no rule


def _refused_stream(world: World) -> None:
    """A streaming call to a path no rule allows (the SDK's ``post(stream=True)``)."""
    _openai(world).post("/responses", body={"model": "m", "stream": True}, cast_to=object,
                        stream=True, stream_cls=openai.Stream[object])


@pytest.mark.parametrize("call", [_refused_call, _refused_stream], ids=["call", "stream"])
def test_openai_refusal_names_reason_and_request_id(agent_env: World,
                                                     call: Callable[[World], None]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        call(agent_env)
    exc = caught.value
    rid = exc.response.headers["x-taskgate-request-id"]
    assert REFUSED_REASON in str(exc) and rid in str(exc), str(exc)
    assert exc.code == "forbidden" and exc.type == "taskgate_refusal"
    rec = agent_env.record(rid)
    assert (rec["decision"], rec["status"]) == ("deny", 403)


def test_anthropic_call_passes_and_stream_is_incremental(agent_env: World) -> None:
    client = _anthropic(agent_env)
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().content[0].text == "hello"  # type: ignore[union-attr]
    assert agent_env.record(raw.headers["x-taskgate-request-id"])["decision"] == "allow"
    stamps = []
    with client.messages.stream(model="claude-test", max_tokens=10,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        for _text in stream.text_stream:
            stamps.append(time.monotonic())
    assert len(stamps) == EVENTS and incremental(stamps), stamps


def test_anthropic_refusal_names_reason_and_request_id(agent_env: World) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        _anthropic(agent_env).models.list()
    exc = caught.value
    rid = exc.response.headers["x-taskgate-request-id"]
    assert REFUSED_REASON in str(exc) and rid in str(exc), str(exc)
    assert agent_env.record(rid)["decision"] == "deny"
