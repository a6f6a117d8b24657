"""mitmproxy's addon manager with each hook's handlers looked up once, not per event.

``AddonManager.trigger_event`` walks the whole chain for every event: per addon a
generator over it and its children, a ``getattr``, the event's arguments rebuilt
from its dataclass fields, a ``safecall`` context manager and a coroutine; and
``handle_lifecycle`` does it all again for the ``update`` event after every flow
hook, which no addon of the gateway handles. :class:`HookTable` finds the handlers
of a hook once (again whenever an addon is added or removed), builds the arguments
once per event, and skips an event nobody handles. What it keeps of mitmproxy's
semantics: addons run in chain order, an addon's handlers (its own, then its
children's) run in order, an exception is logged as ``safecall`` logs it and the
next addon runs, ``AddonHalt`` ends the event, ``OptionsError`` propagates.

``taskgate run`` (proxy/server.py) and the benchmark's ``mitm-min`` use it alike,
so the benchmark compares taskgate's addons on the same data plane.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, cut_traceback, logger, traverse

__all__ = ["HookTable"]

Handlers = tuple[tuple[Callable[..., Any], ...], ...]  # per addon in the chain: its handlers
_FIELDS: dict[type, tuple[str, ...]] = {}  # per hook class: its argument fields, in order


def _args(event: hooks.Hook) -> list[Any]:
    """``event.args()`` without ``dataclasses.fields`` on every event (mitmproxy's own
    ``Hook.args`` is exactly the fields' values, in order)."""
    names = _FIELDS.get(type(event))
    if names is None:
        fields = dataclasses.fields(event)  # type: ignore[arg-type]  # every Hook is a dataclass
        names = _FIELDS[type(event)] = tuple(f.name for f in fields)
    return [getattr(event, name) for name in names]


class HookTable(AddonManager):
    """An :class:`AddonManager` whose ``trigger_event`` uses a table of handlers."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._table: dict[str, Handlers] = {}

    @classmethod
    def install(cls, master: Any) -> HookTable:
        """Put a table in place of a new master's (still empty) addon manager."""
        old = master.addons
        if len(old):
            raise exceptions.AddonManagerError("install the hook table before any addon")
        master.options.changed.disconnect(old._configure_all)
        master.addons = table = cls(master)
        return table

    def register(self, addon: Any) -> Any:
        self._table.clear()
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        self._table.clear()
        super().remove(addon)

    def clear(self) -> None:
        self._table.clear()
        super().clear()

    def handlers(self, name: str) -> Handlers:
        """Each chain addon's handlers of hook ``name`` (addons without any left out)."""
        found = self._table.get(name)
        if found is None:
            groups = []
            for addon in self.chain:
                funcs = []
                for a in traverse([addon]):
                    func = getattr(a, name, None)
                    if func is None or isinstance(func, types.ModuleType):
                        continue  # a module imported under a hook's name (`log`)
                    if not callable(func):
                        raise exceptions.AddonManagerError(
                            f"Addon handler {name} ({a}) not callable")
                    funcs.append(func)
                if funcs:
                    groups.append(tuple(funcs))
            found = self._table[name] = tuple(groups)
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        groups = self.handlers(event.name)
        if not groups:
            return
        args = _args(event)
        for funcs in groups:
            try:
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # noqa: BLE001 - what safecall does: log, go on
                tb = cut_traceback(e.__traceback__, "trigger_event")
                logger.error(f"Addon error: {e}", exc_info=(type(e), e, tb))

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self.handlers("update"):
            args = _args(event)
            if args and isinstance(args[0], flow.Flow):
                await self.trigger_event(hooks.UpdateHook([args[0]]))
