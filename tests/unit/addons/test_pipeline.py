"""addons/_pipeline.py: the concerns run per hook in chain order, as mitmproxy ran them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from addons import CHAIN, default_addons
from addons._base import GatewayAddon, exchange, guarded
from addons._pipeline import DONE, Pipeline
from addons.authorize import Authorize
from proxy.gateway import Services


class Recorder:
    """A concern that notes each call of its hooks in a shared list."""

    def __init__(self, name: str, seen: list[str], *, fail: bool = False,
                 wait: bool = False, halt: bool = False) -> None:
        self.label, self.seen, self.fail, self.wait, self.halt = name, seen, fail, wait, halt

    def requestheaders(self, flow: http.HTTPFlow) -> Any:
        self.seen.append(self.label)
        if self.halt:
            raise exceptions.AddonHalt()
        if self.fail:
            raise RuntimeError(f"{self.label} broke")
        return self._later() if self.wait else None

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.seen.append(f"{self.label} waited")

    async def response(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(0)
        self.seen.append(f"{self.label} response")


def test_a_hook_no_concern_defines_is_not_offered_to_mitmproxy() -> None:
    pipeline = Pipeline([Recorder("a", [])])
    assert set(pipeline.hooks) == {"requestheaders", "response"}
    assert getattr(pipeline, "request", None) is None  # mitmproxy skips it
    assert getattr(pipeline, "websocket_message", None) is None


async def test_sync_concerns_run_as_plain_calls_in_order() -> None:
    seen: list[str] = []
    pipeline = Pipeline([Recorder("a", seen), Recorder("b", seen)])
    assert pipeline.requestheaders(tflow.tflow()) is None  # nothing to await
    assert seen == ["a", "b"]


async def test_a_concern_that_waits_holds_the_next_until_it_is_done() -> None:
    seen: list[str] = []
    pipeline = Pipeline([Recorder("a", seen), Recorder("b", seen, wait=True),
                         Recorder("c", seen)])
    pending = pipeline.requestheaders(tflow.tflow())
    assert seen == ["a", "b"] and pending is not None
    await pending
    assert seen == ["a", "b", "b waited", "c"]
    await pipeline.response(tflow.tflow())
    assert seen[-3:] == ["a response", "b response", "c response"]


@pytest.mark.parametrize("wait_first", [False, True])
async def test_an_exception_is_logged_and_the_next_concern_runs(
        wait_first: bool, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    pipeline = Pipeline([Recorder("a", seen, wait=wait_first), Recorder("b", seen, fail=True),
                         Recorder("c", seen)])
    with caplog.at_level(logging.ERROR, logger="taskgate"):
        pending = pipeline.requestheaders(tflow.tflow())
        if pending is not None:
            await pending
    assert [s for s in seen if "waited" not in s] == ["a", "b", "c"]
    assert "Recorder.requestheaders raised" in caplog.text and "b broke" in caplog.text


async def test_addon_halt_ends_the_chain() -> None:
    seen: list[str] = []
    pipeline = Pipeline([Recorder("a", seen), Recorder("b", seen, halt=True),
                         Recorder("c", seen)])
    assert pipeline.requestheaders(tflow.tflow()) is None
    assert seen == ["a", "b"]


class Policy(GatewayAddon):
    """A guarded policy hook: sync when it can, an awaitable when it must wait."""

    def __init__(self, mode: str) -> None:
        super().__init__(None)
        self.mode = mode

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Any:
        if self.mode == "raise":
            raise RuntimeError("a bug")
        if self.mode == "raise later":
            return self._fail()
        return None

    async def _fail(self) -> None:
        raise RuntimeError("a bug after waiting")


async def test_a_guarded_sync_hook_returns_done_and_can_still_be_awaited() -> None:
    f = tflow.tflow()
    assert Policy("pass").requestheaders(f) is DONE
    await Policy("pass").requestheaders(f)
    assert Pipeline([Policy("pass")]).requestheaders(f) is None  # DONE is not awaited


@pytest.mark.parametrize("mode", ["raise", "raise later"])
async def test_a_guarded_hook_that_fails_refuses_the_call(mode: str) -> None:
    f = tflow.tflow()
    f.response = None
    pending = Pipeline([Policy(mode)]).requestheaders(f)
    if pending is not None:
        await pending
    assert f.response is not None and f.response.status_code == 500
    assert exchange(f).decision == "error"


async def test_the_chain_runs_as_one_addon_and_concerns_are_found_by_name(
        svc: Services) -> None:
    (pipeline,) = default_addons(svc)
    assert isinstance(pipeline, Pipeline)
    assert [type(c) for c in pipeline.concerns] == list(CHAIN)
    with taddons.context(pipeline) as tctx:
        assert isinstance(tctx.master.addons.get(Authorize.name), Authorize)
        assert tctx.master.addons.get("taskgate") is pipeline
        assert "taskgate_config" in tctx.options  # each concern's load ran
