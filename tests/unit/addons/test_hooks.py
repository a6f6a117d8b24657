"""addons/_hooks.py: mitmproxy's addon manager semantics, handlers looked up once."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, http
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import tflow

from addons._hooks import HookTable


class Noting:
    def __init__(self, label: str, seen: list[str], *, fail: bool = False,
                 halt: bool = False) -> None:
        self.label, self.seen, self.fail, self.halt = label, seen, fail, halt
        self.name = label  # mitmproxy names addons; two of a class need their own

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.seen.append(self.label)
        if self.halt:
            raise exceptions.AddonHalt()
        if self.fail:
            raise RuntimeError(f"{self.label} broke")


class Parent:
    def __init__(self, seen: list[str]) -> None:
        self.addons = [Noting("child", seen)]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        pass


class Updates:
    def __init__(self) -> None:
        self.updated: list[Any] = []

    def update(self, flows: Any) -> None:
        self.updated.extend(flows)


async def table(*addons: Any) -> HookTable:
    master = Master(Options())
    t = HookTable.install(master)
    t.add(*addons)
    return t


async def test_addons_run_in_order_children_after_their_parent() -> None:
    seen: list[str] = []
    t = await table(Noting("a", seen), Parent(seen), Noting("b", seen))
    await t.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow()))
    assert seen == ["a", "child", "b"]
    assert len(t.handlers("requestheaders")) == 3  # found once, kept
    assert t.handlers("response") == ()


async def test_a_new_addon_is_seen_at_the_next_event() -> None:
    seen: list[str] = []
    t = await table(Noting("a", seen))
    await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
    t.add(Noting("b", seen))
    await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
    assert seen == ["a", "a", "b"]


async def test_an_exception_is_logged_and_the_next_addon_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    t = await table(Noting("a", seen, fail=True), Noting("b", seen))
    with caplog.at_level(logging.ERROR):
        await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
    assert seen == ["a", "b"]
    assert "Addon error: a broke" in caplog.text


async def test_addon_halt_ends_the_event() -> None:
    seen: list[str] = []
    t = await table(Noting("a", seen, halt=True), Noting("b", seen))
    await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
    assert seen == ["a"]


async def test_update_follows_a_flow_hook_only_when_an_addon_handles_it() -> None:
    t = await table(Noting("a", []))
    await t.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow()))  # nobody: skipped
    updates = Updates()
    t.add(updates)
    f = tflow.tflow()
    await t.handle_lifecycle(HttpRequestHeadersHook(f))
    assert updates.updated == [f]
    await t.handle_lifecycle(hooks.RunningHook())  # not a flow: no update
    assert updates.updated == [f]


async def test_the_table_goes_in_before_any_addon() -> None:
    master = Master(Options())
    master.addons.add(Noting("a", []))
    with pytest.raises(exceptions.AddonManagerError, match="before any addon"):
        HookTable.install(master)
