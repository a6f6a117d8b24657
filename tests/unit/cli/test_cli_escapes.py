"""No agent-controlled text drives the operator's terminal (issue 17.3).

Every command that prints values that came from a request, an agent or an
upstream — ``task list|show|create|revoke|rotate-key``, ``approvals
list|show|approve|deny``, ``logs`` (table, ``--json``, ``--follow``), ``audit
verify`` — is run with terminal-control payloads in those values: a stand-in
control plane answers with them in every field (as an old store, a hostile
proxy in between, or a future field could), a real gateway holds calls whose
bodies, headers and MCP arguments carry them, the audit log has them in path,
host, tool names and reasons. No raw control byte may reach stdout or stderr,
and no payload may start a line of its own. The real control plane refuses
them where people write text (422 naming the field).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.audit._log import new_record, rfc3339
from proxy.cli import _main as cli
from proxy.safe_text import bad_char, safe, safe_json
from tests.e2e.test_approval_view import plain, raw_up, vgw, waiting_for  # noqa: F401
from tests.e2e.test_approve import admin_token, control
from tests.e2e.test_cli_approvals import clean_env, taskgate
from tests.support import REPO, WORKLOAD, Gateway, Upstream, free_port
from tests.unit.audit.test_audit_query import T0, seed

FORGED = "status    active (approved by security)"
PAYLOADS = {
    "csi-clear-screen": "\x1b[2J\x1b[H",
    "osc52-clipboard": "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07",
    "osc8-hyperlink": "\x1b]8;;https://evil.example/\x1b\\click me\x1b]8;;\x1b\\",
    "hidden-text": "\x1b[8mhidden\x1b[28m",
    "cr-overwrite": "ok\r" + FORGED,
    "lf-forged-line": "ok\n" + FORGED,
    "crlf-forged-line": "ok\r\n" + FORGED,
    "bidi-override": "invoice\u202egpj.exe",
    "bidi-isolate": "\u2066admin\u2069",
    "c1-csi": "\x9b2J\x9b31m",
    "c1-osc": "\x9d52;c;x\x9c",
    "zero-width": "pay\u200bpal\u200d\ufeff",
    "line-separator": "a\u2028" + FORGED,
    "del-and-nul": "a\x7f\x00b",
}


def assert_clean(*outputs: str) -> None:
    """Only printable characters and line feeds, and no payload on a line of its own."""
    for text in outputs:
        for c in text:
            assert c == "\n" or c.isprintable(), f"raw {c!r} reached the terminal: {text!r}"
        for line in text.split("\n"):
            assert not line.lstrip().startswith(FORGED[:6] + "    active (approved"), text


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


# -- the helper, as a table -------------------------------------------------------------
@pytest.mark.parametrize(("value", "shown"), [
    ("plain text / ok", "plain text / ok"),
    ("café ünïcode 日本", "café ünïcode 日本"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x9b2J", "\\x9b2J"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("x\u202ey", "x\\u202ey"),
    ("x\u2066y\u2069", "x\\u2066y\\u2069"),
    ("a\u200bb\u200c\u200d\ufeff", "a\\u200bb\\u200c\\u200d\\ufeff"),
    ("\x7f\x00", "\\x7f\\x00"),
    ("a\u2028b\u2029", "a\\u2028b\\u2029"),
    ("tag\U000e0041", "tag\\U000e0041"),
    (None, ""),
    (42, "42"),
])
def test_safe(value: Any, shown: str) -> None:
    assert safe(value) == shown


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_safe_json_is_json_and_inert(name: str) -> None:
    doc = {"k": PAYLOADS[name], PAYLOADS[name]: [1, PAYLOADS[name]]}
    for indent in (True, False):
        text = safe_json(doc, indent=indent)
        assert_clean(text)
        assert orjson.loads(text) == doc  # the same values, escaped


@pytest.mark.parametrize(("text", "allowed", "bad"), [
    ("alice@acme.test", "", None),
    ("Fix the bug — ünïcode", "", None),
    ("a\x1bb", "", "\x1b"),
    ("a\nb", "", "\n"),
    ("a\nb", "\n\t", None),
    ("a\x9bb", "\n", "\x9b"),
    ("a\u202eb", "", "\u202e"),
    ("a\u200bb", "", "\u200b"),
    ("a\x7f", "", "\x7f"),
])
def test_bad_char(text: str, allowed: str, bad: str | None) -> None:
    assert bad_char(text, allowed) == bad


# -- a stand-in control plane with payloads in every field -------------------------------
def hostile(p: str) -> dict[str, Any]:
    task = {"task_id": f"t-{p}", "status": f"active{p}", "workload": f"spiffe://w/{p}",
            "owner": f"alice{p}", "purpose": f"fix{p}", "created_at": f"2026{p}",
            "expires_at": f"2027{p}", "revoked_at": f"2026{p}", "calls_used": 1,
            "max_calls": 5, "calls_left": 4, "rules": [{"id": f"r{p}", "host": f"h{p}"}],
            "proxy_url": f"http://t:{p}@127.0.0.1:8080", "expires_in_seconds": 60}
    held = {"id": f"h{p}", "request_id": f"r{p}", "task": f"t{p}", "workload": f"w{p}",
            "owner": f"o{p}", "purpose": f"p{p}", "method": f"POST{p}",
            "url": f"https://api.example/{p}?q={p}", "tool": {"name": f"n{p}",
                                                                "method": f"m{p}"},
            "calls": [{"name": f"pay{p}", "arguments": {f"k{p}": f"v{p}"}}],
            "held_at": f"2026{p}", "age_seconds": 3.0, "expires_at": f"2027{p}",
            "state": f"waiting{p}",
            "request": {"method": f"POST{p}", "url": f"https://api.example/{p}",
                        "headers": [[f"x-{p}", f"v{p}"]], "secret": f"s{p}",
                        "body": {"size": 9, "sha256": f"d{p}", "encoding": f"utf-8{p}",
                                 "shown": f"line1{p}\nline2{p}", "shown_bytes": 9,
                                 "truncated": False},
                        "digest": f"g{p}"}}
    return {"task": task, "held": held,
            "error": {"error": f"e{p}", "reason": f"no such thing{p}", "field": f"f{p}"}}


class StandIn:
    """A control plane on loopback answering every call with the current payload."""

    def __init__(self) -> None:
        self.port = free_port()
        self.doc: dict[str, Any] = hostile("")
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(obj), status=status,
                            content_type="application/json")

    async def handle(self, request: web.Request) -> web.Response:
        path, d = request.path, self.doc
        if "fail" in path:
            return self._json(d["error"], 409)
        if path.startswith("/v1/approvals"):
            return self._json({"approvals": [d["held"]]} if path == "/v1/approvals"
                              else d["held"])
        if path == "/v1/task-keys/rotate":
            return self._json({"current": d["task"]["task_id"], "keys": [1, 2]})
        if path == "/v1/tasks" and request.method == "GET":
            return self._json({"tasks": [d["task"]], "total": 3})
        return self._json(d["task"])

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> StandIn:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    s = StandIn().start()
    yield s
    s.stop()


COMMANDS = [
    ("task", "list"), ("task", "list", "--json"), ("task", "show", "x"),
    ("task", "show", "x", "--json"), ("task", "revoke", "x"),
    ("task", "create", "--workload", "w", "--rules", "RULES"), ("task", "rotate-key"),
    ("task", "show", "fail"),
    ("approvals", "list"), ("approvals", "list", "--json"), ("approvals", "show", "x"),
    ("approvals", "show", "x", "--json"), ("approvals", "approve", "x", "--by", "me"),
    ("approvals", "deny", "x", "--by", "me"), ("approvals", "approve", "fail", "--by", "me"),
]


def in_process(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``taskgate ARGS`` run by the CLI's own ``main`` in this process (14 payloads ×
    15 commands: a process each would take minutes). What it writes to stdout and
    stderr, bytes included, is what a terminal would get. The subprocess runs below
    cover the real entry point."""
    out, err = io.BytesIO(), io.BytesIO()
    out_text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    err_text = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
            try:
                rc = cli.main(args)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue().decode(), err.getvalue().decode()


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_every_control_plane_command_escapes_what_it_prints(
        standin: StandIn, tmp_path: Path, name: str) -> None:
    p = PAYLOADS[name]
    standin.doc = hostile(p)
    (tmp_path / "rules.yaml").write_text("- {id: r, host: h, methods: [GET]}\n")
    env = {"TASKGATE_CONTROL_URL": f"http://127.0.0.1:{standin.port}",
           "TASKGATE_ADMIN_TOKEN": "x"}
    for cmd in COMMANDS:
        args = [str(tmp_path / "rules.yaml") if a == "RULES" else a for a in cmd]
        rc, out, err = await asyncio.to_thread(in_process, args, env)
        assert rc == (1 if "fail" in cmd else 0), (cmd, err)
        assert_clean(out, err)
        if "--json" in cmd:
            assert any(p in v for v in strings(orjson.loads(out)))  # the same data
        else:
            assert safe(p) in out + err, (cmd, out + err)  # there, visibly escaped


# -- the real control plane refuses control characters where people write text --------
@pytest.fixture(scope="module")
def tgw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream) -> Iterator[Gateway]:
    from tests.conftest import ceiling_config

    gw = Gateway(tmp_path_factory.mktemp("escapes"),
                 ceiling_config(shared_files, upstream, approval_timeout_seconds=60)).start()
    yield gw
    gw.stop()


def task_body(up: Upstream, **extra: Any) -> dict[str, Any]:
    return {"workload": WORKLOAD, "ttl_seconds": 60, "rules": [
        {"id": "r", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
         "methods": ["GET"], "paths": ["/allowed/**"]}], **extra}


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("field", ["purpose", "owner", "workload"])
async def test_task_text_with_control_characters_is_refused_naming_the_field(
        tgw: Gateway, upstream: Upstream, field: str, name: str) -> None:
    value = ("spiffe://acme.test/agent/" if field == "workload" else "x") + PAYLOADS[name]
    async with control(tgw) as ctl:
        r = await ctl.post("/v1/tasks", json=task_body(upstream, **{field: value}))
        assert r.status_code == 422, r.text
        doc = r.json()
        assert doc["field"] == field and "control" in doc["reason"], doc
        assert all(t[field] != value for t in (await ctl.get("/v1/tasks")).json()["tasks"])


async def test_plain_unicode_text_is_still_accepted(tgw: Gateway, upstream: Upstream) -> None:
    async with control(tgw) as ctl:
        r = await ctl.post("/v1/tasks", json=task_body(
            upstream, purpose="Fix ünïcode — 日本 issue #42", owner="zoë@acme.test"))
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_the_cli_shows_the_refusal_escaped(tgw: Gateway, upstream: Upstream,
                                                 tmp_path: Path, name: str) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(task_body(upstream)["rules"]))
    env = clean_env(TASKGATE_CONTROL_URL=tgw.control_url, TASKGATE_ADMIN_TOKEN=admin_token(tgw))
    rc, out, err = await taskgate("task", "create", "--workload", WORKLOAD, "--rules",
                                  str(tmp_path / "rules.yaml"), "--purpose",
                                  "x" + PAYLOADS[name].replace("\x00", ""),
                                  cwd=tmp_path, env=env)
    assert rc == 1 and "purpose" in err, err
    assert_clean(out, err)


# A comment may span lines (printed escaped): a payload that is only a line break is
# refused in `by` alone.
@pytest.mark.parametrize(("field", "name"), [
    *(("by", n) for n in PAYLOADS),
    *(("comment", n) for n, p in PAYLOADS.items() if not p.replace("\n", "").isprintable())])
async def test_approver_text_with_control_characters_is_refused(
        tgw: Gateway, field: str, name: str) -> None:
    p = PAYLOADS[name]
    body = {"by": "carol", field: "x" + p}
    async with control(tgw) as ctl:
        r = await ctl.post("/v1/approvals/0123456789abcdef/approve", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


# -- real held calls: the agent writes bodies, headers and MCP arguments ---------------
@pytest.mark.parametrize("name", ["csi-clear-screen", "osc52-clipboard", "lf-forged-line",
                                  "cr-overwrite", "bidi-override", "c1-csi", "zero-width"])
async def test_held_calls_from_an_agent_print_escaped(
        vgw: Gateway, raw_up: Upstream, token: str, tmp_path: Path,  # noqa: F811
        name: str) -> None:
    p = PAYLOADS[name]
    m = uuid.uuid4().hex
    env = clean_env(TASKGATE_CONTROL_URL=vgw.control_url, TASKGATE_ADMIN_TOKEN=admin_token(vgw))
    body = f"memo={m}{p}&to={p}".encode()  # raw bytes, as an agent may send them
    mcp = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": "pay", "arguments": {"to": f"{m}{p}"}}})
    # A header value cannot carry C0 controls; C1, bidi and zero-width ones as UTF-8 can.
    header = "x-note", ("v" + p).encode("utf-8").translate(None, bytes(range(32)) + b"\x7f")
    async with httpx.AsyncClient(proxy=vgw.proxy_url_with(token), timeout=30,
                                 trust_env=False) as c, control(vgw) as ctl:
        call = asyncio.create_task(c.post(plain(raw_up, f"/view/{m}"), content=body,
                                          headers={header[0]: header[1]}))
        tool = asyncio.create_task(c.post(plain(raw_up, "/mcp"), content=mcp, headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream"}))
        h = await waiting_for(ctl, m)
        async with asyncio.timeout(10):
            while True:
                found = [x for x in (await ctl.get("/v1/approvals")).json()["approvals"]
                         if m in str(x["calls"])]
                if found:
                    break
                await asyncio.sleep(0.05)
        outs = []
        for cmd in (("list",), ("show", h["id"]), ("show", found[0]["id"]),
                    ("approve", h["id"], "--by", "erin"),
                    ("deny", found[0]["id"], "--by", "erin", "--comment", "no\nway")):
            rc, out, err = await taskgate("approvals", *cmd, cwd=tmp_path, env=env)
            assert rc == 0, (cmd, err)
            assert_clean(out, err)
            outs.append(out)
        # Shown, escaped (a body's lines each behind "| ", so none passes for output).
        assert safe(p.split("\n")[-1]) in outs[1] and f"{m}" in outs[2]
        assert (await asyncio.wait_for(call, 20)).status_code == 200
        await asyncio.wait_for(tool, 20)
    # The records those calls left: the table and the JSON lines, escaped.
    cfg = tmp_path / "taskgate.yaml"
    cfg.write_text(yaml.safe_dump({"audit": {"path": str(vgw.audit_path)}}))
    for extra in ((), ("--json",)):
        rc, out, err = await taskgate("logs", "-c", str(cfg), *extra, cwd=tmp_path, env=env)
        assert rc == 0, err
        assert_clean(out, err)


# -- values that arrive through the audit log -------------------------------------------
def hostile_records(p: str, start: int = 0) -> list[dict[str, Any]]:
    return [new_record(
        ts=rfc3339(T0 + start + i), request_id=f"esc{start + i}", workload=f"spiffe://w/{p}",
        task=f"t{p}", decision=["deny", "error", "approved"][i % 3], method="POST",
        scheme="https", host=f"api{p}.example", port=443, path=f"/x/{p}?q=REDACTED",
        tool={"name": f"pay{p}", "args_sha256": "0" * 64}, status=403, rule=f"r{p}",
        reason=f"refused{p}", approval={"id": "a", "outcome": "approved", "by": f"b{p}"})
        for i in range(3)]


def logs_config(tmp_path: Path, log: Path) -> Path:
    cfg = tmp_path / "taskgate.yaml"
    cfg.write_text(yaml.safe_dump({"audit": {"path": str(log)}}))
    return cfg


@pytest.mark.parametrize("name", list(PAYLOADS))
async def test_logs_table_and_json_escape_record_values(tmp_path: Path, name: str) -> None:
    p = PAYLOADS[name]
    log = tmp_path / "audit.jsonl"
    seed(log, hostile_records(p))
    cfg = logs_config(tmp_path, log)
    env = clean_env()
    rc, out, err = await taskgate("logs", "-c", str(cfg), cwd=tmp_path, env=env)
    assert rc == 0, err
    assert_clean(out, err)
    assert len(out.strip().split("\n")) == 4  # the header and one line per record
    assert safe(p)[:8] in out
    rc, out, err = await taskgate("logs", "-c", str(cfg), "--json", cwd=tmp_path, env=env)
    assert rc == 0, err
    assert_clean(out, err)
    assert [orjson.loads(line)["reason"] for line in out.strip().split("\n")] == [
        f"refused{p}"] * 3


@pytest.mark.parametrize("name", ["csi-clear-screen", "osc8-hyperlink", "lf-forged-line",
                                  "cr-overwrite", "bidi-override", "c1-csi", "zero-width"])
@pytest.mark.parametrize("as_json", [False, True])
def test_logs_follow_escapes_new_records(tmp_path: Path, name: str, as_json: bool) -> None:
    p = PAYLOADS[name]
    log = tmp_path / "audit.jsonl"
    seed(log, [new_record(ts=rfc3339(T0), request_id="first", decision="allow")])
    cfg = logs_config(tmp_path, log)
    cmd = [sys.executable, "-m", "proxy", "logs", "-c", str(cfg), "--follow"]
    proc = subprocess.Popen([*cmd, *(["--json"] if as_json else [])], cwd=tmp_path,
                            env=clean_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the header, or the first record: it follows now
        assert first
        seed(log, hostile_records(p, 10))
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out_rest, err = proc.communicate(timeout=10)
    text = (first + b"".join(lines)).decode()
    assert_clean(text, err.decode())
    assert text.count("\n") == 4
    assert ("esc12" if as_json else safe(p)[:6]) in text


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("as_json", [False, True])
async def test_audit_verify_escapes_file_names_and_damage(tmp_path: Path, name: str,
                                                          as_json: bool) -> None:
    p = PAYLOADS[name].replace("\x00", "").replace("/", "")
    d = tmp_path / "logs"
    d.mkdir()
    log = d / f"audit{p}.jsonl"
    seed(log, hostile_records(PAYLOADS[name]))
    env = clean_env()
    extra = ("--json",) if as_json else ()
    rc, out, err = await taskgate("audit", "verify", str(log), *extra, cwd=tmp_path, env=env)
    assert rc == 0, err
    assert_clean(out, err)
    lines = log.read_bytes().split(b"\n")
    rec = orjson.loads(lines[1])
    rec["reason"] = "edited" + PAYLOADS[name]
    lines[1] = orjson.dumps(rec)
    log.write_bytes(b"\n".join(lines))
    rc, out, err = await taskgate("audit", "verify", str(log), *extra, cwd=tmp_path, env=env)
    assert rc == 1, out + err
    assert_clean(out, err)
    missing = d / f"gone{p}.jsonl"
    rc, out, err = await taskgate("audit", "verify", str(missing), cwd=tmp_path, env=env)
    assert rc == 2 and "no such file" in err
    assert_clean(out, err)


def test_no_command_module_prints_around_the_helper() -> None:
    """The CLI modules print through safe()/safe_json(): no raw orjson dump of
    control-plane or audit data reaches print() or stdout."""
    for name in ("_tasks.py", "_approvals.py", "_audit.py"):
        text = (REPO / "proxy" / "cli" / name).read_text()
        assert "OPT_INDENT_2" not in text, name
        assert "stdout.buffer.write(orjson" not in text, name

