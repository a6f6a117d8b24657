"""Issue 10 item 13: every signal that would end the gateway stops it the way SIGTERM
does: stop listening, let the call in flight finish, write its audit record, exit 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from proxy.gateway import stop_signals
from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream

# SIGPIPE is not among them: Python ignores it (a write to a closed socket fails with
# EPIPE on that one connection), and so must a gateway whose agents hang up all the time.
SIGNALS = ["SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
           "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGXCPU", "SIGRTMIN"]


def test_which_signals_stop_the_gateway() -> None:
    handled = set(stop_signals())
    for name in SIGNALS:
        assert getattr(signal, name) in handled, name
    for name in ("SIGHUP", "SIGPIPE", "SIGCHLD", "SIGWINCH", "SIGCONT", "SIGSEGV", "SIGKILL",
                 "SIGSTOP", "SIGTSTP", "SIGXFSZ"):
        assert getattr(signal, name) not in handled, name
    assert signal.SIGRTMAX in handled


@pytest.mark.parametrize("name", SIGNALS)
def test_signal_mid_call_drains_and_audits(tmp_path: Path, shared_files: dict[str, Path],
                                           upstream: Upstream, keys: Keys, name: str) -> None:
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    result: dict[str, object] = {}

    def call() -> None:
        try:
            with gw.client(keys.token()) as c:
                r = c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=0.6",
                          timeout=20)
                result.update(status=r.status_code, id=r.headers.get("x-taskgate-request-id"))
        except httpx.HTTPError as e:
            result["error"] = repr(e)

    seen = len(upstream.seen)
    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while len(upstream.seen) == seen and time.monotonic() < deadline:  # the call is upstream
        time.sleep(0.02)
    assert len(upstream.seen) > seen
    assert gw.proc is not None
    gw.proc.send_signal(getattr(signal, name))
    assert t.is_alive()  # the signal came while the call was in flight (0.6 s upstream)
    t.join(30)
    code = gw.proc.wait(30)  # it exits by itself
    gw.stop()
    assert result.get("status") == 200, (result, gw.output()[-2000:])
    assert code == 0, gw.output()[-2000:]
    records = gw.records_for(str(result["id"]))
    assert len(records) == 1 and records[0]["status"] == 200
    assert records[0]["decision"] == "allow"
    assert f"{name} received; stopping" in gw.output() or name == "SIGRTMIN"
    # it stopped listening: nothing answers on the proxy port now
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{gw.control_url}/healthz", timeout=2)


def test_a_second_signal_while_draining_does_not_cut_the_call(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream,
        keys: Keys) -> None:
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    result: dict[str, object] = {}

    def call() -> None:
        with gw.client(keys.token()) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=1.5", timeout=20)
            result.update(status=r.status_code, id=r.headers.get("x-taskgate-request-id"))

    seen = len(upstream.seen)
    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while len(upstream.seen) == seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    gw.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert gw.proc.wait(30) == 0
    gw.stop()
    assert result.get("status") == 200
    assert len(gw.records_for(str(result["id"]))) == 1
