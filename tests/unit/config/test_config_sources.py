"""proxy/config/_model.py, transparent mode: ``listen.transparent`` and ``workloads.*.sources``
(every bad value an error naming file, line, key and fix; overlaps name both workloads)."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.errors import ConfigError


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "taskgate.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return load_config(str(path))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    return str(err.value)


def test_transparent_listener_and_sources(tmp_path: Path) -> None:
    c = load(tmp_path, """
        listen:
          transparent: "0.0.0.0:8082"
        workloads:
          "spiffe://acme.dev/agent/triage":
            sources: ["10.77.0.0/24", "fd77::/64", "10.78.0.5"]
          "spiffe://acme.dev/agent/other":
            sources: ["10.77.1.0/24"]
        """)
    assert c.transparent_listen == ("0.0.0.0", 8082)
    assert c.workloads["spiffe://acme.dev/agent/triage"].sources == (
        ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77::/64"),
        ipaddress.ip_network("10.78.0.5/32"))


def test_no_transparent_listener_by_default(tmp_path: Path) -> None:
    c = load(tmp_path, "workloads: {w: {standing: []}}\n")
    assert c.transparent_listen is None and c.workloads["w"].sources == ()


@pytest.mark.parametrize(("sources", "message"), [
    ('["10.77.0.0/33"]', "'10.77.0.0/33' is not a network; write a CIDR"),
    ('["not-a-net"]', "'not-a-net' is not a network"),
    ('["10.77.0.5/24"]', "'10.77.0.5/24' has host bits set; use '10.77.0.0/24'"),
    ('["fd77::1/64"]', "'fd77::1/64' has host bits set; use 'fd77::/64'"),
    ("[7]", "7 is not a network"),
    ('"10.77.0.0/24"', "expected a list of client networks"),
])
def test_bad_source_names_file_line_and_key(tmp_path: Path, sources: str, message: str) -> None:
    err = load_error(tmp_path, f"""
        workloads:
          "spiffe://acme.dev/agent/triage":
            owner: a@acme.dev
            sources: {sources}
        """)
    assert err.startswith("taskgate.yaml:4: ") or f"{tmp_path}" in err
    assert ':4: workloads["spiffe://acme.dev/agent/triage"].sources' in err
    assert message in err


def test_bad_source_in_a_block_list_names_its_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        workloads:
          w:
            sources:
              - 10.77.0.0/24
              - 10.77.0.300/32
        """)
    assert ":5: workloads[\"w\"].sources[1]: '10.77.0.300/32' is not a network" in err


@pytest.mark.parametrize(("a", "b"), [
    ("10.77.0.0/16", "10.77.3.0/24"),   # the second inside the first
    ("10.77.3.0/24", "10.77.0.0/16"),   # the first inside the second
    ("10.77.0.9/32", "10.77.0.9/32"),   # the same address
    ("fd77::/64", "fd77::5/128"),
])
def test_overlap_across_workloads_names_both(tmp_path: Path, a: str, b: str) -> None:
    err = load_error(tmp_path, f"""
        workloads:
          "spiffe://acme.dev/agent/triage":
            sources: ["192.168.9.0/24", "{a}"]
          "spiffe://acme.dev/agent/other":
            sources: ["{b}"]
        """)
    assert ':5: workloads["spiffe://acme.dev/agent/other"].sources[0]:' in err
    assert (f"'{ipaddress.ip_network(b)}' overlaps '{ipaddress.ip_network(a)}' of workload "
            "'spiffe://acme.dev/agent/triage'") in err


def test_overlap_within_one_workload_is_allowed(tmp_path: Path) -> None:
    c = load(tmp_path, """
        workloads:
          w: {sources: ["10.77.0.0/16", "10.77.3.0/24"]}
          v: {sources: ["10.78.0.0/16", "::ffff:10.77.0.0/112"]}
        """)
    assert len(c.workloads["w"].sources) == 2


@pytest.mark.parametrize(("value", "message"), [
    ('"8082"', "'8082' is not host:port; use e.g. '127.0.0.1:8080'"),
    ('"0.0.0.0:99999"', "is not host:port"),
    ("8082", "8082 is not a non-empty string"),
])
def test_bad_transparent_listener(tmp_path: Path, value: str, message: str) -> None:
    err = load_error(tmp_path, f"listen:\n  transparent: {value}\n")
    assert "taskgate.yaml:2: listen.transparent: " in err and message in err


@pytest.mark.parametrize(("listen", "other"), [
    ('proxy: "127.0.0.1:0"\n  transparent: "127.0.0.1:0"', "proxy"),
    ('transparent: "127.0.0.1:8081"', "control"),
])
def test_transparent_listener_of_its_own(tmp_path: Path, listen: str, other: str) -> None:
    err = load_error(tmp_path, f"listen:\n  {listen}\n")
    assert "listen.transparent: " in err and f"is the {other} listener's address too" in err
