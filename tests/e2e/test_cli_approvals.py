"""``taskgate approvals list|approve|deny`` against a running gateway."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from proxy.safe_text import safe as _safe
from tests.e2e.test_approve import admin_token, agent, approval_config, control, held, https
from tests.support import REPO, Gateway, Upstream, free_port


@pytest.fixture(scope="module")
def cgw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("cli"),
                 approval_config(shared_files, upstream, approval_timeout_seconds=60)).start()
    yield gw
    gw.stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TASKGATE_ADMIN_TOKEN", "TASKGATE_CONTROL_URL")}
    # An agent's proxy settings must not capture the CLI's calls to the control plane.
    env.update(PYTHONPATH=str(REPO), HTTP_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", **extra)
    return env


async def taskgate(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_list_approve_deny_from_the_config(cgw: Gateway, upstream: Upstream,
                                                 token: str) -> None:
    """Address from listen.control, token from admin_token_file, run where the config is."""
    env = clean_env()
    m = uuid.uuid4().hex
    rc, out, _ = await taskgate("approvals", "list", "-c", "taskgate.yaml", cwd=cgw.dir, env=env)
    assert (rc, out.strip()) == (0, "no calls are waiting for approval")
    async with agent(cgw, token) as c, control(cgw) as ctl:
        ok = asyncio.create_task(c.post(https(upstream, f"/approve/{m}/ok"), content=b"a"))
        no = asyncio.create_task(c.post(https(upstream, f"/approve/{m}/no"), content=b"b"))
        waiting = {h["url"].rsplit("/", 1)[1]: h for h in await held(ctl, m, 2)}
        rc, out, err = await taskgate("approvals", "list", "-c", "taskgate.yaml",
                                      cwd=cgw.dir, env=env)
        assert rc == 0, err
        for h in waiting.values():
            assert h["id"] in out and h["url"] in out
        assert "spiffe://acme.test/agent/triage" in out and "POST" in out

        rc, out, err = await taskgate("approvals", "approve", waiting["ok"]["id"], "--by",
                                      "carol", "--comment", "fine", "-c", "taskgate.yaml",
                                      cwd=cgw.dir, env=env)
        assert rc == 0, err
        assert out.startswith(f"approved {waiting['ok']['id']} ") and "by carol" in out
        rc, out, err = await taskgate("approvals", "deny",
                                      waiting["no"]["id"], "--by", "dave",
                                      "--comment", "not now", "-c", "taskgate.yaml",
                                      cwd=cgw.dir, env=env)
        assert rc == 0, err
        r_ok, r_no = await asyncio.wait_for(asyncio.gather(ok, no), 10)
    assert r_ok.status_code == 200 and r_ok.json()["path"] == f"/approve/{m}/ok"
    assert r_no.status_code == 403 and r_no.json()["reason"] == "denied by dave: not now"
    final = cgw.records_for(r_ok.headers["x-taskgate-request-id"])[-1]
    assert final["approval"]["by"] == "carol" and final["approval"]["comment"] == "fine"

    rc, _, err = await taskgate("approvals", "approve", waiting["ok"]["id"], "--by", "eve",
                                "-c", "taskgate.yaml", cwd=cgw.dir, env=env)
    assert rc == 1 and "409" in err and "already ended (approved by carol)" in err
    rc, _, err = await taskgate("approvals", "deny", "0000000000000000", "--by", "eve",
                                "-c", "taskgate.yaml", cwd=cgw.dir, env=env)
    assert rc == 1 and "404" in err


async def test_address_and_token_from_the_environment(cgw: Gateway, upstream: Upstream,
                                                      token: str, tmp_path: Path) -> None:
    env = clean_env(TASKGATE_CONTROL_URL=cgw.control_url,
                    TASKGATE_ADMIN_TOKEN=admin_token(cgw))
    m = uuid.uuid4().hex
    async with agent(cgw, token) as c, control(cgw) as ctl:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        rc, out, err = await taskgate("approvals", "list", "--json", cwd=tmp_path, env=env)
        assert rc == 0, err
        assert h["id"] in [a["id"] for a in orjson.loads(out)["approvals"]]
        rc, _, err = await taskgate("approvals", "approve", h["id"], "--by", "frank",
                                    cwd=tmp_path, env=env)
        assert rc == 0, err
        assert (await asyncio.wait_for(call, 10)).status_code == 200


@pytest.mark.parametrize(("extra", "args", "code", "message"), [
    ({"TASKGATE_ADMIN_TOKEN": "wrong"}, ("list",), 1, "401"),
    ({"TASKGATE_ADMIN_TOKEN": "x", "TASKGATE_CONTROL_URL": f"http://127.0.0.1:{free_port()}"},
     ("list",), 2, "cannot reach the control plane"),
    ({"TASKGATE_ADMIN_TOKEN": "x", "TASKGATE_CONTROL_URL": "file:///etc/passwd"},
     ("list",), 2, "is not an http(s) URL"),
    ({}, ("list",), 2, "no admin token"),
    ({"TASKGATE_ADMIN_TOKEN": "x"}, ("approve", "abc"), 2, "--by"),
])
async def test_cli_failures(cgw: Gateway, tmp_path: Path, extra: dict[str, str],
                            args: tuple[str, ...], code: int, message: str) -> None:
    extra = {"TASKGATE_CONTROL_URL": cgw.control_url, **extra}
    rc, _, err = await taskgate("approvals", *args, cwd=tmp_path, env=clean_env(**extra))
    assert rc == code and message in err, err


@pytest.mark.parametrize(("text", "shown"), [
    ("POST https://api.example/pulls", "POST https://api.example/pulls"),
    ("pay \x1b[2J\x1b[31m", "pay \\x1b[2J\\x1b[31m"),
    ("evil\u202eexe.txt", "evil\\u202eexe.txt"),
    ("line\nbreak", "line\\nbreak"),
    ("café", "café"),
])
def test_listing_never_drives_the_terminal(text: str, shown: str) -> None:
    assert _safe(text) == shown
