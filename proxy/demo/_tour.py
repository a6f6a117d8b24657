"""The scripted agent of ``taskgate demo``: a task, then calls through its proxy_url.

An orchestrator asks the control plane for a task; the agent then acts only
through the task's ``proxy_url`` (httpx, trusting the gateway's CA) while an
approver answers on the control plane. Every step says what it expects (the
status, and the decision the audit log records for that request id); each row
shows what came back, and the tour fails if any step did not go as scripted.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson

from proxy.audit import BadLine, read_record
from proxy.demo._upstream import SESSION_HEADER, VERSION_HEADER, ApiUpstream, McpUpstream
from proxy.gateway import REQUEST_ID_HEADER

__all__ = ["APPROVER", "OWNER", "SECRET_NAME", "WORKLOAD", "AuditTail", "Site", "Step",
           "Tour"]

WORKLOAD = "spiffe://acme.dev/agent/triage"
OWNER = "alice@acme.dev"
APPROVER = "bob@acme.dev"
SECRET_NAME = "github-token"  # noqa: S105 - the name under `secrets:`
REPO = "/repos/acme/widgets"
MCP_VERSION = "2025-11-25"
CALL_WIDTH = 50


@dataclass(frozen=True, slots=True)
class Site:
    """Where everything listens, and what the orchestrator and the agent are given."""

    api: str  # https://localhost:PORT, the issue tracker
    mcp: str  # https://localhost:PORT/mcp, the docs MCP server
    api_port: int
    mcp_port: int
    control: str
    admin_token: str
    gateway_ca: str
    audit_path: str


@dataclass(slots=True)
class Step:
    """One row of the table: what was called, what came back, what the log says."""

    number: int
    call: str
    status: int | None = None
    decision: str = "-"
    reason: str = ""
    request_id: str | None = None
    unexpected: str | None = None  # what the script expected, when it went otherwise

    def row(self) -> str:
        call = _cut(self.call, CALL_WIDTH)
        line = (f"{self.number:>3}  {call:<{CALL_WIDTH}}  {self.status or '-':>3}  "
                f"{self.decision:<8}  {self.reason}")
        if self.unexpected:
            line += f"   <-- UNEXPECTED: expected {self.unexpected}"
        return "".join(c if c.isprintable() else "?" for c in line)


HEADER = f"{'#':>3}  {'CALL':<{CALL_WIDTH}}  {'ST':>3}  {'DECISION':<8}  REASON"


class AuditTail:
    """The audit log as it grows, by request id. A call's record is written before
    its answer reaches the agent, so it is there when the call returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0  # this run only
        self.by_id: dict[str, list[dict[str, Any]]] = {}
        self._partial = b""

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    rec = read_record(line)
                except BadLine:  # the verdict at the end reports damage; the tour goes on
                    continue
                self.by_id.setdefault(rec.get("request_id") or "", []).append(rec)

    async def records(self, request_id: str | None) -> list[dict[str, Any]]:
        """The call's records (a held call has two), waiting up to 2 s for the last."""
        for _ in range(40):
            self.read()
            recs = self.by_id.get(request_id or "", [])
            if recs and recs[-1].get("decision") != "held":
                return recs
            await asyncio.sleep(0.05)
        return self.by_id.get(request_id or "", [])


@dataclass
class Tour:
    """The script. ``run`` prints the table as it goes and says whether all went as planned."""

    site: Site
    api: ApiUpstream
    mcp: McpUpstream
    out: TextIO = field(default_factory=lambda: sys.stdout)
    steps: list[Step] = field(default_factory=list)
    agent_saw: list[bytes] = field(default_factory=list)  # every answer, for the leak check
    task_id: str | None = None
    _session: str | None = None  # the MCP session, from initialize's answer
    _last_session: str | None = None
    _rpc_id: int = 0

    def __post_init__(self) -> None:
        self.audit = AuditTail(self.site.audit_path)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and not any(s.unexpected for s in self.steps)

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _step(self, call: str) -> Step:
        step = Step(len(self.steps) + 1, call)
        self.steps.append(step)
        return step

    async def run(self) -> bool:
        self.print(HEADER)
        headers = {"Authorization": f"Bearer {self.site.admin_token}"}
        async with httpx.AsyncClient(base_url=self.site.control, headers=headers, timeout=10,
                                     trust_env=False) as ctl:
            await self.over_ceiling(ctl)
            task = await self.create_task(ctl)
            if task is None:
                return False
            tls = ssl.create_default_context(cafile=self.site.gateway_ca)
            async with httpx.AsyncClient(proxy=task["proxy_url"], verify=tls, timeout=10,
                                         trust_env=False) as agent:
                await self.api_calls(agent)
                await self.mcp_calls(agent)
                await self.approved_call(agent, ctl)
                await self.revoke(ctl)
                await self.http(agent, "GET", f"{REPO}/issues", 407, "deny")
        return self.ok

    # the orchestrator ----------------------------------------------------------------
    def task_rules(self) -> list[dict[str, Any]]:
        api = {"host": "localhost", "allow_private": True, "port": self.site.api_port}
        return [
            {"id": "read-issues", **api, "methods": ["GET"], "paths": [f"{REPO}/issues/**"],
             "secret": SECRET_NAME},
            {"id": "docs-search", "host": "localhost", "allow_private": True,
             "port": self.site.mcp_port,
             "paths": ["/mcp"], "mcp": {"tools": ["search_docs"],
                                        "args": {"limit": {"maximum": 20}}}},
            {"id": "open-pr", **api, "methods": ["POST"], "paths": [f"{REPO}/pulls"],
             "secret": SECRET_NAME, "approval": "required"},
        ]

    def task_request(self, rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {"workload": WORKLOAD, "owner": OWNER, "purpose": "triage issue 42",
                "ttl_seconds": 300, "max_calls": 25, "rules": rules}

    async def over_ceiling(self, ctl: httpx.AsyncClient) -> None:
        step = self._step("ctl POST /v1/tasks (DELETE /repos/acme/**)")
        wipe = {"id": "wipe-repos", "host": "localhost", "allow_private": True,
                "port": self.site.api_port,
                "methods": ["DELETE"], "paths": ["/repos/acme/**"], "secret": SECRET_NAME}
        resp = await ctl.post("/v1/tasks", json=self.task_request([wipe]))
        step.status, step.reason = resp.status_code, _reason(resp)
        self._expect(step, 422, "-")

    async def create_task(self, ctl: httpx.AsyncClient) -> dict[str, Any] | None:
        step = self._step("ctl POST /v1/tasks (issues, docs, open PR)")
        resp = await ctl.post("/v1/tasks", json=self.task_request(self.task_rules()))
        step.status = resp.status_code
        if resp.status_code != 201:
            step.reason = _reason(resp)
            self._expect(step, 201, "-")
            return None
        task = resp.json()
        self.task_id = task["task_id"]
        step.reason = (f"task {self.task_id[:8]} for {OWNER}: 3 rules, 300 s, "
                       f"at most 25 calls; agent gets its proxy_url")
        self._expect(step, 201, "-")
        return task

    async def revoke(self, ctl: httpx.AsyncClient) -> None:
        assert self.task_id is not None
        step = self._step(f"ctl DELETE /v1/tasks/{self.task_id[:8]}...")
        resp = await ctl.delete(f"/v1/tasks/{self.task_id}")
        step.status = resp.status_code
        body = resp.json() if resp.status_code == 200 else {}
        step.reason = (f"task {body.get('status') or body.get('state') or 'revoked'}; "
                       f"{body.get('calls_used', '?')} calls used"
                       if resp.status_code == 200 else _reason(resp))
        self._expect(step, 200, "-")

    # the agent: plain HTTPS -------------------------------------------------------------
    async def api_calls(self, agent: httpx.AsyncClient) -> None:
        await self.http(agent, "GET", f"{REPO}/issues", 200, "allow")
        await self.http(agent, "GET", f"{REPO}/collaborators", 403, "deny")
        await self.http(agent, "DELETE", f"{REPO}/issues/42", 403, "deny")
        await self.http(agent, "GET", f"{REPO}/issues/../../admin", 403, "deny", raw=True)

    async def http(self, agent: httpx.AsyncClient, method: str, path: str, status: int,
                   decision: str, *, raw: bool = False, body: Any = None,
                   step: Step | None = None) -> None:
        step = step or self._step(f"api {method} {path}")
        # httpx removes dot segments from URLs; the "target" extension sends the path as is.
        ext = {"target": path.encode()} if raw else None
        resp = await agent.request(method, self.site.api + (f"{REPO}/issues" if raw else path),
                                   json=body, extensions=ext)
        await self._judged(step, resp)
        self._expect(step, status, decision)

    # the agent: MCP ---------------------------------------------------------------------
    async def rpc(self, agent: httpx.AsyncClient, method: str, params: dict[str, Any] | None
                  = None, *, notify: bool = False) -> tuple[httpx.Response, dict[str, Any]]:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if not notify:
            self._rpc_id += 1
            msg["id"] = self._rpc_id
        headers = {"Accept": "application/json, text/event-stream",
                   "Content-Type": "application/json"}
        if self._session is not None:
            headers.update({SESSION_HEADER: self._session, VERSION_HEADER: MCP_VERSION})
        resp = await agent.post(self.site.mcp, content=orjson.dumps(msg), headers=headers)
        try:
            answer = orjson.loads(resp.content) if resp.content else {}
        except orjson.JSONDecodeError:
            answer = {}
        return resp, answer if isinstance(answer, dict) else {}

    async def mcp_call(self, agent: httpx.AsyncClient, label: str, method: str,
                       params: dict[str, Any] | None, status: int, decision: str, *,
                       notify: bool = False) -> dict[str, Any]:
        step = self._step(f"mcp {label}")
        resp, answer = await self.rpc(agent, method, params, notify=notify)
        await self._judged(step, resp)
        err = answer.get("error")
        if answer.get("jsonrpc") == "2.0" and isinstance(err, dict):
            step.reason = f"JSON-RPC error {err.get('code')}: {err.get('message')}"
        self._expect(step, status, decision)
        return answer

    async def mcp_calls(self, agent: httpx.AsyncClient) -> None:
        init = {"protocolVersion": MCP_VERSION, "capabilities": {},
                "clientInfo": {"name": "demo-agent", "version": "1.0"}}
        await self.mcp_call(agent, "initialize", "initialize", init, 200, "allow")
        self._session = self._last_session
        if self._session is None:
            self._fail(self.steps[-1], "an Mcp-Session-Id from the server")
        await self.mcp_call(agent, "notifications/initialized", "notifications/initialized",
                            None, 202, "allow", notify=True)
        answer = await self.mcp_call(agent, "tools/list", "tools/list", None, 200, "allow")
        names = [t.get("name") for t in answer.get("result", {}).get("tools", [])]
        self._note(f"agent sees {names} of the server's {sorted(self.mcp.tools)}",
                   names == ["search_docs"], "only ['search_docs'] listed")
        answer = await self.mcp_call(agent, "tools/call search_docs(limit=5)", "tools/call",
                                     {"name": "search_docs", "arguments": {
                                         "query": "rate limits", "limit": 5}}, 200, "allow")
        text = (answer.get("result", {}).get("content") or [{}])[0].get("text", "")
        self._note(f"the tool answered: {_cut(text, 60)}", self.mcp.ran["search_docs"] == 1,
                   "search_docs to run once")
        await self.mcp_call(agent, "tools/call delete_repo(repo='acme/widgets')",
                            "tools/call", {"name": "delete_repo",
                                           "arguments": {"repo": "acme/widgets"}},
                            200, "deny")
        self._note(f"delete_repo ran {self.mcp.ran['delete_repo']} times; "
                   f"repositories deleted: {len(self.mcp.deleted)}",
                   self.mcp.ran["delete_repo"] == 0 and not self.mcp.deleted,
                   "delete_repo never to run")
        await self.mcp_call(agent, "tools/call search_docs(limit=500)", "tools/call",
                            {"name": "search_docs", "arguments": {
                                "query": "everything", "limit": 500}}, 200, "deny")
        self._note(f"search_docs ran {self.mcp.ran['search_docs']} time(s) in all: "
                   "the refused search never reached it",
                   self.mcp.ran["search_docs"] == 1, "the refused search never to run")

    # approval ---------------------------------------------------------------------------
    async def approved_call(self, agent: httpx.AsyncClient, ctl: httpx.AsyncClient) -> None:
        step = self._step(f"api POST {REPO}/pulls")
        call = asyncio.create_task(self.http(
            agent, "POST", f"{REPO}/pulls", 201, "approved", step=step,
            body={"title": "Fix upside-down widgets (#42)", "head": "fix-42", "base": "main"}))
        held = None
        for _ in range(100):  # up to 5 s for the hold to show
            if call.done():
                break
            waiting = (await ctl.get("/v1/approvals")).json().get("approvals", [])
            held = next((h for h in waiting if h.get("task") == self.task_id), None)
            if held is not None:
                break
            await asyncio.sleep(0.05)
        if held is not None:
            self.print(f"{'':>3}  {'  ... held for approval ' + held['id'][:8]:<{CALL_WIDTH}}"
                       f"  {'':>3}  {'held':<8}  {APPROVER} reads it on the control plane "
                       f"and approves")
            answer = await ctl.post(f"/v1/approvals/{held['id']}/approve", json={
                "by": APPROVER, "comment": "PR title and branch look right"})
            if answer.status_code != 200:
                self._fail(step, f"the approval to be taken, not {answer.status_code} "
                           f"{_reason(answer)}")
        await call
        if held is None:
            self._fail(step, "the call to be held for approval")

    # bookkeeping ------------------------------------------------------------------------
    async def _judged(self, step: Step, resp: httpx.Response) -> None:
        """Fill the row from the answer and the audit record of its request id."""
        self.agent_saw.append(resp.content)
        self.agent_saw.append(orjson.dumps(dict(resp.headers)))
        self._last_session = resp.headers.get(SESSION_HEADER) or self._last_session
        step.status = resp.status_code
        step.request_id = resp.headers.get(REQUEST_ID_HEADER)
        recs = await self.audit.records(step.request_id)
        if not recs:
            step.decision, step.reason = "?", "no audit record for this request id"
            return
        rec = recs[-1]
        step.decision = rec.get("decision") or "?"
        reason = str(rec.get("reason") or "")
        if rec.get("rule"):  # "allowed by rule" says less than the rule's name
            reason = reason.replace(" by rule", "").removeprefix("allowed").lstrip(": ")
        parts = [f"rule {rec['rule']}" if rec.get("rule") else "", reason]
        if rec.get("secret"):
            parts.append(f"secret {rec['secret']} injected")
        try:
            answer = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict) and "authorization" in answer:
            parts.append(f"upstream: Authorization {answer['authorization']}")
        step.reason = "; ".join(p for p in parts if p)

    def _expect(self, step: Step, status: int, decision: str) -> None:
        if step.status != status or step.decision != decision:
            step.unexpected = f"{status} {decision}"
        if step.status in (200, 201) and decision in ("allow", "approved") \
                and "upstream: Authorization" in step.reason \
                and "Authorization valid" not in step.reason:
            step.unexpected = "the upstream to get the right Authorization"
        self.print(step.row())

    def _note(self, text: str, ok: bool, expected: str) -> None:
        """A line under the last row: what the upstream saw."""
        self.print(f"{'':>3}  {'':<{CALL_WIDTH}}  {'':>3}  {'':<8}  -> {text}")
        if not ok:
            self._fail(self.steps[-1], expected)

    def _fail(self, step: Step, expected: str) -> None:
        step.unexpected = step.unexpected or expected
        self.print(f"{'':>3}  <-- UNEXPECTED at step {step.number}: expected {expected}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _reason(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:120]
    return str(body.get("reason") or body.get("error") or "") if isinstance(body, dict) \
        else ""
