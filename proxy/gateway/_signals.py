"""Which signals stop the gateway, and the one that reloads its config (proxy/server.py
installs the handlers).

SIGHUP (:data:`RELOAD_SIGNAL`) reloads the config (proxy/gateway/_reload.py). Every
other signal another process can send whose default action would end the process
stops the gateway the way SIGTERM does: stop listening, refuse calls held for
approval, let calls in flight finish within the grace period, flush the audit log,
exit 0. None of them may kill it mid-call with no audit record.
"""

from __future__ import annotations

import signal

__all__ = ["RELOAD_SIGNAL", "stop_signals"]

RELOAD_SIGNAL = signal.SIGHUP  # the daemon convention: read the config again

# Signals whose default action ends the process but that are not a request to stop:
# the kernel's own faults (a handler cannot resume after them), those raised by the
# process itself, and two whose default Python already replaced (SIGPIPE is ignored:
# a write to a closed socket fails with EPIPE on that connection only) or that this
# gateway ignores (SIGXFSZ: a write past the file-size limit then fails with EFBIG,
# which the audit log treats as a failed write: calls are refused, fail closed).
_NOT_STOP = frozenset(getattr(signal, name) for name in (
    "SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGSYS", "SIGTRAP",
    "SIGABRT", "SIGIOT", "SIGEMT", "SIGPIPE", "SIGXFSZ") if hasattr(signal, name))
# Signals whose default action is not to end the process: left alone.
_HARMLESS = frozenset(getattr(signal, name) for name in (
    "SIGCHLD", "SIGCLD", "SIGCONT", "SIGURG", "SIGWINCH", "SIGTSTP", "SIGTTIN", "SIGTTOU",
    "SIGINFO") if hasattr(signal, name))


def stop_signals() -> list[int]:
    """Every signal another process can send that would end the gateway by default:
    each stops it the way SIGTERM does (stop listening, drain, flush the audit log).
    SIGINT, SIGTERM, SIGQUIT, SIGUSR1/2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO,
    SIGPWR, SIGXCPU (the soft CPU limit: the hard one is SIGKILL), the real-time ones."""
    found: list[int] = []
    for num in sorted(signal.valid_signals()):
        if num in _NOT_STOP or num in _HARMLESS or num == RELOAD_SIGNAL:
            continue
        try:
            found.append(signal.Signals(num))
        except ValueError:  # a real-time signal without a name
            found.append(num)
    return found
