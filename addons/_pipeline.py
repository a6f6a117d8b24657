"""The one addon mitmproxy sees in ``taskgate run``: the concerns, run in chain order.

mitmproxy's addon manager pays for every addon on every hook, whether it defines
the hook or not: a ``safecall`` context manager, a generator walk over the addon
and its children, the hook's arguments rebuilt, a coroutine per call, and all of
it once more for the ``update`` event after each flow hook. With ten concerns
that was most of what taskgate cost per call (bench/README.md, "Profiling").

:class:`Pipeline` keeps the concerns as they are — one module each, hook methods
named as mitmproxy's hooks, each still loadable on its own with ``mitmdump -s`` —
and at construction collects, for every mitmproxy hook, the bound methods of the
concerns that define it, in chain order. A hook no concern defines is not an
attribute of the pipeline, so mitmproxy skips it. A hook runs its methods as
plain calls; one that returns an awaitable (an ``async def`` hook, or a sync hook
that has to wait this time) is awaited before the next concern runs, so the
order of effects is mitmproxy's own. What mitmproxy does between addons is kept:
every concern runs (each opens with its own guard: a response set, a flow killed),
an exception in one is logged and the next one runs (``addonmanager.safecall``),
and ``AddonHalt`` stops the chain.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import mitmproxy.addonmanager
import mitmproxy.eventsequence
import mitmproxy.proxy.server_hooks  # noqa: F401 - registers the connection hooks
from mitmproxy import exceptions, hooks

__all__ = ["DONE", "Pipeline"]

log = logging.getLogger("taskgate")

Method = Callable[..., Any]
# Hooks the pipeline handles itself rather than by the table: `load` runs in
# mitmproxy's sync context and registers the concerns by name.
_OWN = frozenset({"load"})


class _Done:
    """An awaitable that is already done: what a guarded hook (addons/_base.py) returns
    when it finished without waiting, so a test can still ``await`` it while the
    pipeline, seeing it, skips the await."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


DONE = _Done()


def _hook_names() -> frozenset[str]:
    """Every hook mitmproxy knows (the modules that declare them are imported above)."""
    assert mitmproxy.addonmanager and mitmproxy.eventsequence  # imported for their hooks
    return frozenset(hooks.all_hooks) - _OWN


def _failed(method: Method) -> None:
    """What ``addonmanager.safecall`` does with a concern's exception: log it, go on."""
    log.exception("taskgate: %s raised; the next concern runs",
                  getattr(method, "__qualname__", method))


def _dispatcher(name: str, methods: tuple[Method, ...]) -> Method:
    """One callable for mitmproxy's hook ``name`` that runs ``methods`` in order.

    Sync as long as every method returns without an awaitable; at the first that
    returns one, the rest of the chain continues in a coroutine mitmproxy awaits."""

    async def rest(pending: Awaitable[Any], method: Method, start: int,
                   args: tuple[Any, ...]) -> None:
        try:
            await pending
        except exceptions.AddonHalt:
            return
        except Exception:  # noqa: BLE001 - safecall: logged, the chain goes on
            _failed(method)
        for i in range(start, len(methods)):
            method = methods[i]
            try:
                res = method(*args)
                if res is not None and res is not DONE and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return
            except Exception:  # noqa: BLE001
                _failed(method)

    def dispatch(*args: Any) -> Awaitable[None] | None:
        for i, method in enumerate(methods):
            try:
                res = method(*args)
            except exceptions.AddonHalt:
                return None
            except Exception:  # noqa: BLE001
                _failed(method)
                continue
            if res is not None and res is not DONE and inspect.isawaitable(res):
                return rest(res, method, i + 1, args)
        return None

    dispatch.__name__ = dispatch.__qualname__ = name
    return dispatch


class Pipeline:
    """The concerns as one mitmproxy addon: for each hook, their methods in order."""

    name = "taskgate"

    def __init__(self, concerns: Sequence[object]) -> None:
        self.concerns = tuple(concerns)
        self.hooks: dict[str, tuple[Method, ...]] = {}
        for hook in sorted(_hook_names()):
            methods = tuple(m for c in self.concerns
                            if callable(m := getattr(c, hook, None)))
            if methods:
                self.hooks[hook] = methods
                setattr(self, hook, _dispatcher(hook, methods))

    def load(self, loader: mitmproxy.addonmanager.Loader) -> None:
        """Each concern's ``load`` (options), and its name in the addon manager, so
        ``ctx.master.addons.get(name)`` finds a concern as when it was an addon."""
        lookup = loader.master.addons.lookup
        for concern in self.concerns:
            named = getattr(concern, "name", None)
            if isinstance(named, str) and named not in lookup:
                lookup[named] = concern
            load = getattr(concern, "load", None)
            if callable(load):
                if inspect.iscoroutinefunction(load):
                    raise exceptions.AddonManagerError(
                        f"{type(concern).__name__}.load cannot be async")
                load(loader)
