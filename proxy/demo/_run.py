"""The machinery of ``taskgate demo`` (proxy/cli/_demo.py): upstreams, gateway, tour, summary.

It starts the pieces a real deployment has — an HTTPS issue-tracker API and an
MCP server (proxy/demo/_upstream.py, in this process), and the gateway itself
as a ``taskgate run`` subprocess with a generated config (a workload with a
ceiling, an ``env`` secret whose random value only the gateway and the API
know, a short approval timeout) — then plays an orchestrator, an agent and an
approver (proxy/demo/_tour.py) and prints each call as it goes, the audit
log's verdict and where to look further.

Everything lives in a temp folder (or ``--home DIR``, kept), on free ports;
the gateway is stopped and the folder removed at the end, also on Ctrl-C,
SIGTERM or a tour that overruns :data:`TOUR_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import site
import socket
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from aiohttp import web
from ruamel.yaml import YAML

from proxy.audit import Report, verify
from proxy.demo._tls import DemoTls, make_tls
from proxy.demo._tour import APPROVER, OWNER, SECRET_NAME, WORKLOAD, Site, Tour
from proxy.demo._upstream import ApiUpstream, McpUpstream

__all__ = ["SECRET_ENV", "TOUR_SECONDS", "gateway_config", "run"]

TOUR_SECONDS = 20.0  # start-up and every step; then at most STOP_SECONDS to stop
START_SECONDS = 15.0
STOP_SECONDS = 5.0
# Variable names, not values: the gateway's env provider reads the secret from SECRET_VAR;
# SECRET_ENV, if set, is the value to use instead of a random one (tests look for leaks).
SECRET_VAR = "DEMO_GITHUB_TOKEN"  # noqa: S105
SECRET_ENV = "TASKGATE_DEMO_SECRET"  # noqa: S105
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy")


def run(home_arg: str | None, serve: bool) -> int:
    """Run the tour; the exit code of ``taskgate demo``."""
    home = os.path.abspath(home_arg) if home_arg else tempfile.mkdtemp(prefix="taskgate-demo-")
    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
        return asyncio.run(_main(home, home_arg is not None, serve))
    except KeyboardInterrupt:
        return 130
    finally:
        if home_arg is None:
            shutil.rmtree(home, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(home: str, proxy_port: int, control_port: int, api_port: int,
                   mcp_port: int, upstream_ca: str) -> dict[str, Any]:
    """The generated config: absolute paths, so ``taskgate logs -c`` works from anywhere."""
    api = {"host": "localhost", "allow_private": True, "port": api_port}
    return {
        "version": 1,
        "listen": {"proxy": f"127.0.0.1:{proxy_port}", "control": f"127.0.0.1:{control_port}"},
        "home": home,
        "admin_token_file": os.path.join(home, "admin-token"),
        "upstream": {"ca_file": upstream_ca},
        "audit": {"path": os.path.join(home, "audit.jsonl")},
        "workloads": {WORKLOAD: {"owner": "platform@acme.dev", "ceiling": [
            {"id": "github-read", **api, "methods": ["GET"], "paths": ["/repos/acme/**"],
             "secret": SECRET_NAME},
            {"id": "github-pulls", **api, "methods": ["POST"], "paths": ["/repos/acme/*/pulls"],
             "secret": SECRET_NAME, "approval": "required"},
            {"id": "docs-mcp", "host": "localhost", "allow_private": True,
             "port": mcp_port, "paths": ["/mcp"],
             "mcp": {"tools": ["search_docs"], "args": {"limit": {"maximum": 50}}}},
        ]}},
        "secrets": {SECRET_NAME: {"provider": "env", "var": SECRET_VAR, "inject": {
            "header": "Authorization", "value": "Bearer {token}"}}},
        "approval_timeout_seconds": 10,
        "proxy": {"shutdown_grace_seconds": 2},
    }


@dataclass
class _Upstreams:
    api: ApiUpstream
    mcp: McpUpstream
    api_port: int
    mcp_port: int
    runners: list[web.AppRunner]

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def _serve_upstreams(secret: str, tls: DemoTls) -> _Upstreams:
    """Both apps on 127.0.0.1, port 0 (the kernel picks a free one: no race)."""
    api, mcp = ApiUpstream(secret), McpUpstream()
    runners, ports = [], []
    ctx = tls.server_context()
    for app in (api.app(), mcp.app()):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        ports.append(int(runner.addresses[0][1]))
    return _Upstreams(api, mcp, ports[0], ports[1], runners)


class _GatewayProcess:
    """``python -m proxy run -c FILE`` with this build's code, output to a log file."""

    def __init__(self, home: str, secret: str) -> None:
        self.home, self.secret = home, secret
        self.log = os.path.join(home, "gateway.log")
        self.config_file = os.path.join(home, "taskgate.yaml")
        self.proc: asyncio.subprocess.Process | None = None
        self.proxy_port = self.control_port = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in PROXY_VARS and k not in ("TASKGATE_ADMIN_TOKEN", SECRET_ENV)}
        env[SECRET_VAR] = self.secret
        root = str(Path(__file__).resolve().parents[2])  # where this `proxy` package is
        if root not in (*site.getsitepackages(), site.getusersitepackages()):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    async def start(self, ups: _Upstreams, tls: DemoTls) -> bool:
        """Start on free ports, retrying when a port was taken meanwhile; True when ready."""
        for _ in range(3):
            self.proxy_port, self.control_port = _free_port(), _free_port()
            self._write_config(gateway_config(self.home, self.proxy_port, self.control_port,
                                              ups.api_port, ups.mcp_port, tls.ca_file))
            with self._open_log() as out:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "proxy", "run", "-c", self.config_file,
                    cwd=self.home, env=self.env(), stdin=asyncio.subprocess.DEVNULL,
                    stdout=out, stderr=out)
            if await self._ready():
                return True
            if self.proc.returncode != 2:  # 2: a listener could not bind; try other ports
                break
        return False

    def _write_config(self, config: dict[str, Any]) -> None:
        with open(self.config_file, "w", encoding="utf-8") as f:
            YAML(typ="safe", pure=True).dump(config, f)

    def _open_log(self) -> BinaryIO:
        return open(self.log, "ab")  # the caller closes it

    async def _ready(self) -> bool:
        assert self.proc is not None
        url = f"http://127.0.0.1:{self.control_port}/readyz"
        async with httpx.AsyncClient(timeout=1, trust_env=False) as client:
            for _ in range(int(START_SECONDS / 0.05)):
                if self.proc.returncode is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return True
                await asyncio.sleep(0.05)
        return False

    async def stop(self) -> int | None:
        """SIGTERM (the gateway drains and flushes its log), SIGKILL if it overstays."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


async def _main(home: str, kept: bool, serve: bool) -> int:
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    secret = os.environ.get(SECRET_ENV) or "demo_" + secrets.token_urlsafe(24)
    gateway = _GatewayProcess(home, secret)
    ups: _Upstreams | None = None
    code = 1
    try:
        async with asyncio.timeout(TOUR_SECONDS):
            tls = make_tls(home)
            ups = await _serve_upstreams(secret, tls)
            if not await gateway.start(ups, tls):
                print(f"taskgate demo: the gateway did not start; its log "
                      f"({gateway.log}):\n{gateway.tail()}", file=sys.stderr)
                return 2
            tour = Tour(_site(home, gateway, ups), ups.api, ups.mcp)
            _intro(tour, gateway, ups, home, keep=kept)
            await tour.run()
        if not serve:
            await gateway.stop()
        code = _summary(tour, gateway, home, secret, kept=kept, serve=serve)
        if serve:
            with contextlib.suppress(asyncio.CancelledError):  # Ctrl-C is how it ends
                await _serve_until_stopped(gateway)
    except TimeoutError:
        print(f"\ntaskgate demo: the tour did not finish within {TOUR_SECONDS:g} s; "
              f"gateway log:\n{gateway.tail()}", file=sys.stderr)
        code = 1
    except asyncio.CancelledError:
        print("\ntaskgate demo: interrupted; cleaning up", file=sys.stderr)
        code = 130
    except (httpx.HTTPError, OSError) as e:
        print(f"\ntaskgate demo: the tour failed: {e!r}; gateway log:\n{gateway.tail()}",
              file=sys.stderr)
        code = 1
    finally:
        await gateway.stop()
        if ups is not None:
            await ups.close()
    return code


def _site(home: str, gateway: _GatewayProcess, ups: _Upstreams) -> Site:
    with open(os.path.join(home, "admin-token"), encoding="utf-8") as f:
        admin = f.read().strip()
    return Site(api=f"https://localhost:{ups.api_port}",
                mcp=f"https://localhost:{ups.mcp_port}/mcp", api_port=ups.api_port,
                mcp_port=ups.mcp_port, control=f"http://127.0.0.1:{gateway.control_port}",
                admin_token=admin, gateway_ca=os.path.join(home, "ca", "mitmproxy-ca-cert.pem"),
                audit_path=os.path.join(home, "audit.jsonl"))


def _intro(tour: Tour, gateway: _GatewayProcess, ups: _Upstreams, home: str, *,
           keep: bool) -> None:
    assert gateway.proc is not None
    tour.print(f"""taskgate demo: an agent's calls through a real gateway, on loopback

  gateway     taskgate run (pid {gateway.proc.pid}): proxy 127.0.0.1:{gateway.proxy_port}, \
control plane http://127.0.0.1:{gateway.control_port}
  upstreams   issue tracker https://localhost:{ups.api_port}, \
docs MCP server https://localhost:{ups.mcp_port}/mcp
  workload    {WORKLOAD} (owner platform@acme.dev). Its ceiling, the most a
              task may get: GET /repos/acme/**, POST /repos/acme/*/pulls with approval (both
              with the secret) on the tracker; search_docs with limit <= 50 on the MCP server
  secret      {SECRET_NAME}: a random value in the gateway's environment (${SECRET_VAR});
              the agent never gets it, the API only says whether it got the right one
  home        {home}{'' if keep else ' (temporary: removed at the end)'}
  config      {gateway.config_file} (generated)

{OWNER}'s orchestrator asks for a task; the agent uses only the task's proxy_url;
{APPROVER} answers on the control plane.
""")


def _summary(tour: Tour, gateway: _GatewayProcess, home: str, secret: str, *, kept: bool,
             serve: bool) -> int:
    """What happened, the log's verdict and counts, the leak check; the exit code."""
    audit_path = os.path.join(home, "audit.jsonl")
    report = verify(audit_path)
    tour.audit.read()
    ours = [r for s in tour.steps if s.request_id for r in tour.audit.by_id.get(s.request_id, [])]
    counts = Counter(str(r.get("decision")) for r in ours)
    reached = [f"{s.method} {s.path} (Authorization {s.authorization})" for s in tour.api.seen]
    leaks = _leaks(secret, tour, gateway.log, audit_path)
    expected_reach = [("GET", "/repos/acme/widgets/issues"), ("POST", "/repos/acme/widgets/pulls")]
    reach_ok = [(s.method, s.path) for s in tour.api.seen] == expected_reach
    ok = tour.ok and report.ok and reach_ok and not leaks
    p = tour.print
    p("\nwhat reached the upstreams")
    p(f"  issue tracker: {len(reached)} requests: {'; '.join(reached) or 'none'}"
      + ("" if reach_ok else "   <-- UNEXPECTED: expected only GET issues and POST pulls"))
    ran = ", ".join(f"{name} x{tour.mcp.ran[name]}" for name in sorted(tour.mcp.tools))
    p(f"  MCP server:    tools run: {ran}; repositories deleted: {len(tour.mcp.deleted)}")
    p(f"  the secret's value: {'seen in ' + ', '.join(leaks) if leaks else 'nowhere'}"
      f" (checked: every answer the agent got, the audit log, the gateway's output)")
    p(f"\naudit log   {audit_path}{'' if kept or serve else ' (goes with the temp home)'}")
    p(f"  taskgate audit verify: {_verdict(report)}")
    p("  this tour's records by decision: "
      + ", ".join(f"{d} {n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    config = gateway.config_file
    if kept or serve:
        p("\nlook further")
        p(f"  taskgate logs -c {config}" + (f" --task {tour.task_id}" if tour.task_id else ""))
        p(f"  taskgate logs -c {config} --decision deny,rejected --json")
        p(f"  taskgate audit verify -c {config}")
        if serve:
            p(f"  http://127.0.0.1:{gateway.control_port}/ui   the review page (sign in with "
              f"the admin token in {home}/admin-token)")
        else:
            p(f"  taskgate demo --home {home} --serve   the tour again, then the gateway stays "
              f"up for its review page (/ui)")
    else:
        p("\nlook further: this home was temporary and is gone now; keep one with --home")
        p("  taskgate demo --home ./taskgate-demo --serve   the tour, then the gateway stays up")
        p("  taskgate logs -c ./taskgate-demo/taskgate.yaml   the calls, one line each")
        p("  taskgate audit verify -c ./taskgate-demo/taskgate.yaml")
        p("  http://127.0.0.1:<control port>/ui   the review page, while --serve runs")
    p("\n" + ("the tour went as scripted" if ok else "the tour did NOT go as scripted"))
    return 0 if ok else 1


def _verdict(report: Report) -> str:
    if not report.ok:
        return f"DAMAGED: {report.damage}"
    return (f"OK, intact: {report.records} records (seq {report.first_seq}.."
            f"{report.last_seq}), {'HMAC-SHA-256' if report.keyed else 'SHA-256'} chain")


def _leaks(secret: str, tour: Tour, *files: str) -> list[str]:
    """Where the secret's value shows up (it must not, anywhere)."""
    value = secret.encode()
    found = ["the agent's answers"] if any(value in b for b in tour.agent_saw) else []
    for path in files:
        try:
            with open(path, "rb") as f:
                if value in f.read():
                    found.append(path)
        except FileNotFoundError:
            pass
    return found


async def _serve_until_stopped(gateway: _GatewayProcess) -> None:
    print("\nserving until Ctrl-C (or SIGTERM)", flush=True)
    assert gateway.proc is not None
    await gateway.proc.wait()  # the gateway stops on the same Ctrl-C; SIGTERM cancels us
