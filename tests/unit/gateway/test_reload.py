"""proxy/gateway/_reload.py in-process: nothing to reload on the embedded defaults, and
no task checked against the old ceiling slips in while a reload lowers it."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import orjson
import pytest
import yaml

from proxy.config import load_config
from proxy.errors import InvalidField
from proxy.gateway import build, reload
from proxy.tasks import parse_task_request

WL = "spiffe://acme.test/agent/unit"


def _write(path: Path, ceiling_paths: list[str]) -> None:
    path.write_text(yaml.safe_dump({
        "home": str(path.parent / "home"), "audit": {"path": str(path.parent / "audit.jsonl")},
        "workloads": {WL: {"ceiling": [{"id": "api", "host": "api.test", "methods": ["GET"],
                                        "paths": ceiling_paths}]}}}))


def _request(path: str) -> bytes:
    return orjson.dumps({"workload": WL, "ttl_seconds": 600, "rules": [
        {"id": "r", "host": "api.test", "methods": ["GET"], "paths": [path]}]})


async def test_embedded_defaults_have_nothing_to_reload(tmp_path: Path) -> None:
    file = tmp_path / "taskgate.yaml"
    _write(file, ["/v1/**"])
    config = dataclasses.replace(load_config(str(file)), source="<embedded defaults>")
    async with build(config) as services:
        result = await reload(services, who="test")
        assert not result.applied and "no config file to reload" in (result.error or "")
        assert services.config is config


async def test_no_task_slips_past_a_lowered_ceiling(tmp_path: Path) -> None:
    file = tmp_path / "taskgate.yaml"
    _write(file, ["/v1/**", "/v2/**"])
    async with build(load_config(str(file))) as services:
        tasks = services.tasks
        made: list[str] = []
        refused = 0

        async def create_many() -> None:
            nonlocal refused
            for _ in range(40):
                try:
                    task, _ = await tasks.create(parse_task_request(_request("/v2/**")))
                except InvalidField as e:
                    assert e.error == "beyond_ceiling"
                    refused += 1
                else:
                    made.append(task.id)
                await asyncio.sleep(0)

        _write(file, ["/v1/**"])
        creating = asyncio.create_task(create_many())
        await asyncio.sleep(0.01)
        result = await reload(services, who="test")
        await creating
        assert result.applied
        assert made and refused, (made, refused)  # some before the reload, some after
        live = {t.id for t in tasks.live()}
        assert not live & set(made)  # each was revoked at the reload, or refused after it
        assert result.revoked and set(result.revoked) <= set(made)
        stored = {row.id: row for row in await tasks.store.load()}
        assert all(stored[i].revoked_at is not None for i in result.revoked)  # persisted


@pytest.mark.parametrize("bad", ["workloads: [", "workloads:\n  x:\n    mode: loud\n"])
async def test_a_bad_file_changes_nothing(tmp_path: Path, bad: str) -> None:
    file = tmp_path / "taskgate.yaml"
    _write(file, ["/v1/**"])
    async with build(load_config(str(file))) as services:
        before = services.config
        file.write_text(bad)
        result = await reload(services, who="test")
        assert not result.applied and result.error is not None
        assert result.error.startswith(f"{file}:")
        assert services.config is before and services.gateway.config is before


# The file of a gateway started on port 0 everywhere; the ports it got at start.
_PORT_ZERO = {"proxy": "127.0.0.1:0", "control": "127.0.0.1:0", "transparent": "0.0.0.0:0"}


@pytest.mark.parametrize(("listen", "restart"), [
    (_PORT_ZERO, []),  # reloading the file it started from changes no listener
    ({**_PORT_ZERO, "transparent": "0.0.0.0:8082"}, []),  # the port it runs on
    ({**_PORT_ZERO, "transparent": "0.0.0.0:9"}, ["listen.transparent"]),
    ({**_PORT_ZERO, "transparent": "127.0.0.2:0"}, ["listen.transparent"]),  # another host
    ({"proxy": "127.0.0.1:0", "control": "127.0.0.1:0"}, ["listen.transparent"]),  # dropped
    ({**_PORT_ZERO, "proxy": "127.0.0.1:9"}, ["listen.proxy"]),
])
async def test_listeners_asked_for_again_need_no_restart(tmp_path: Path, listen: dict[str, str],
                                                         restart: list[str]) -> None:
    file = tmp_path / "taskgate.yaml"
    _write(file, ["/v1/**"])
    cfg = yaml.safe_load(file.read_text())
    file.write_text(yaml.safe_dump({**cfg, "listen": _PORT_ZERO}))
    async with build(load_config(str(file))) as services:
        gw = services.gateway
        # As `taskgate run` does once listening: the running config names the bound ports.
        gw.config = dataclasses.replace(gw.config, proxy_listen=("127.0.0.1", 8080),
                                        control_listen=("127.0.0.1", 8081),
                                        transparent_listen=("0.0.0.0", 8082))  # noqa: S104
        file.write_text(yaml.safe_dump({**cfg, "listen": listen}))
        result = await reload(services, who="test")
        assert result.applied and list(result.restart_needed) == restart
        assert gw.config.transparent_listen == ("0.0.0.0", 8082)  # noqa: S104 - kept
