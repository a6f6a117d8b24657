"""Which rules hold for a caller at this moment: a workload's standing rules, or its task's.

The gateway core asks a :class:`Policy`; the builder (proxy/gateway/_build.py) gives it
a :class:`TaskPolicy` over the task registry, tests a :class:`StandingPolicy` alone.
"""

from __future__ import annotations

from proxy.config import Config
from proxy.identity import Caller
from proxy.policy import Decision, RuleSet
from proxy.tasks._registry import TaskRegistry

__all__ = ["Policy", "StandingPolicy", "TaskPolicy"]


class Policy:
    """Which rules hold for a caller at this moment. Task grants plug in here."""

    def rules_for(self, caller: Caller) -> RuleSet:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, caller: Caller) -> None:
        """Raise :class:`Refused` if the caller's grant ended (task expired, revoked, spent)."""

    def check_live(self, caller: Caller) -> None:
        """Like :meth:`check`, for a call already admitted (counted): only whether the
        grant ended (expired, revoked) — a budget it used up itself does not refuse it."""
        self.check(caller)

    async def admit(self, caller: Caller, decision: Decision, request_id: str) -> Decision:
        """An allowed call is about to go ahead: take it from the caller's budget (tasks)."""
        return decision

    def budgeted(self, caller: Caller) -> bool:
        """Does :meth:`admit` have anything to do for ``caller``'s allowed calls? If not,
        the gateway skips it (and the coroutine it costs) on every call."""
        return False

    def reporting(self, caller: Caller) -> bool:
        """Report mode: a call the rules refuse goes through, recorded ``would_deny``."""
        return False

    def check_client(self, caller: Caller, client: str | None) -> None:
        """Raise (407) if the caller's credential is bound to other client addresses."""


class StandingPolicy(Policy):
    """Each workload's ``standing`` rules from the config; nothing for unknown workloads."""

    def __init__(self, config: Config) -> None:
        self._empty = RuleSet()
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the standing rules and modes of ``config`` (a reload), in one assignment."""
        self._sets = {name: RuleSet(wl.standing) for name, wl in config.workloads.items()}
        self._report = frozenset(n for n, wl in config.workloads.items() if wl.mode == "report")

    def rules_for(self, caller: Caller) -> RuleSet:
        return self._sets.get(caller.workload, self._empty)

    def reporting(self, caller: Caller) -> bool:
        return caller.workload in self._report



class TaskPolicy(StandingPolicy):
    """A task caller gets its task's rules (and only those); others their standing rules."""

    def __init__(self, config: Config, registry: TaskRegistry) -> None:
        super().__init__(config)
        self.registry = registry
        self._none = RuleSet()

    def rules_for(self, caller: Caller) -> RuleSet:
        if caller.task is None:
            return super().rules_for(caller)
        task = self.registry.tasks.get(caller.task)
        return task.ruleset if task is not None else self._none

    def check(self, caller: Caller) -> None:
        self.registry.check(caller)

    def check_live(self, caller: Caller) -> None:
        self.registry.check_live(caller)

    async def admit(self, caller: Caller, decision: Decision, request_id: str) -> Decision:
        return await self.registry.admit(caller, decision, request_id)

    def budgeted(self, caller: Caller) -> bool:
        return caller.task is not None  # a task's calls are counted (registry.admit)

    def reporting(self, caller: Caller) -> bool:
        return self.registry.reporting(caller)

    def check_client(self, caller: Caller, client: str | None) -> None:
        self.registry.check_client(caller, client)


