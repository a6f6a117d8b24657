"""Ceiling containment: a task rule must lie within one ceiling rule (proxy/policy/_ceiling.py)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.policy import breach, check_mcp_shape, parse_rule


def rule(**kw: Any) -> Any:
    kw.setdefault("id", "t")
    if "mcp" not in kw:
        kw.setdefault("methods", ["GET"])
    return parse_rule(kw)


GH = dict(host="api.github.com", methods=["GET", "POST"], paths=["/repos/acme/**"])
WILD = dict(host="*.acme.dev", methods=["GET"])
MCP = dict(host="mcp.acme.dev", paths=["/mcp"],
           mcp={"tools": ["search_docs", "read_file"],
                "args": {"limit": {"maximum": 50, "minimum": 1},
                         "repo": {"enum": ["widgets", "gadgets"]},
                         "query": {"maxLength": 100},
                         "branch": {"pattern": "^feature/"},
                         "mode": {"const": "read"}}})
MCPM = {**MCP, "mcp": {**MCP["mcp"], "methods": ["resources/*", "prompts/get"]}}
STRICT_ARGS = {"limit": {"maximum": 10, "minimum": 5}, "repo": {"enum": ["widgets"]},
               "query": {"maxLength": 20}, "branch": {"pattern": "^feature/"},
               "mode": {"const": "read"}}


def mcp_args(**override: Any) -> dict[str, Any]:
    args = {k: dict(v) for k, v in STRICT_ARGS.items()}
    for k, v in override.items():
        if v is None:
            args.pop(k)
        else:
            args[k] = v
    return args


# (ceiling rule, task rule, None if within else the key that breaks it)
TABLE: list[tuple[dict[str, Any], dict[str, Any], str | None]] = [
    # -- host -----------------------------------------------------------------
    (GH, dict(host="api.github.com", paths=["/repos/acme/x"]), None),
    (GH, dict(host="API.GitHub.com.", paths=["/repos/acme/x"]), None),  # same host, spelt oddly
    (GH, dict(host="uploads.github.com", paths=["/repos/acme/x"]), "host"),
    (GH, dict(host="*.github.com", paths=["/repos/acme/x"]), "host"),
    (WILD, dict(host="api.acme.dev"), None),
    (WILD, dict(host="a.b.acme.dev"), None),
    (WILD, dict(host="*.acme.dev"), None),
    (WILD, dict(host="*.eu.acme.dev"), None),
    (WILD, dict(host="acme.dev"), "host"),               # '*.' needs at least one label
    (WILD, dict(host="evilacme.dev"), "host"),
    (WILD, dict(host="acme.dev.evil.com"), "host"),
    (WILD, dict(host="*.acme.com"), "host"),
    # -- scheme and port ------------------------------------------------------
    (GH, dict(host="api.github.com", port=443, paths=["/repos/acme/x"]), "port"),  # +http:443
    (GH, dict(host="api.github.com", scheme="https", port=443, paths=["/repos/acme/x"]), None),
    (GH, dict(host="api.github.com", scheme="https", paths=["/repos/acme/x"]), None),
    (GH, dict(host="api.github.com", scheme="http", paths=["/repos/acme/x"]), None),
    (GH, dict(host="api.github.com", scheme="https", port=8443, paths=["/repos/acme/x"]),
     "port"),
    ({**GH, "scheme": "https"}, dict(host="api.github.com", paths=["/repos/acme/x"]), "scheme"),
    ({**GH, "scheme": "https"}, dict(host="api.github.com", scheme="http",
                                     paths=["/repos/acme/x"]), "scheme"),
    ({**GH, "scheme": "https"}, dict(host="api.github.com", scheme="http", port=443,
                                     paths=["/repos/acme/x"]), "scheme"),
    ({**GH, "port": 8443}, dict(host="api.github.com", port=8443, paths=["/repos/acme/x"]),
     None),
    ({**GH, "port": 8443}, dict(host="api.github.com", paths=["/repos/acme/x"]), "port"),
    # -- methods --------------------------------------------------------------
    (GH, dict(host="api.github.com", methods=["GET", "POST"], paths=["/repos/acme/x"]), None),
    (GH, dict(host="api.github.com", methods=["post"], paths=["/repos/acme/x"]), None),
    (GH, dict(host="api.github.com", methods=["DELETE"], paths=["/repos/acme/x"]), "methods"),
    (GH, dict(host="api.github.com", methods=["GET", "PUT"], paths=["/repos/acme/x"]),
     "methods"),
    # -- paths ----------------------------------------------------------------
    (GH, dict(host="api.github.com", paths=["/repos/acme/widgets/issues/**"]), None),
    (GH, dict(host="api.github.com", paths=["/repos/acme"]), None),
    (GH, dict(host="api.github.com", paths=["/repos/acme/*", "/repos/acme/a/**"]), None),
    (GH, dict(host="api.github.com", paths=["/repos/**"]), "paths"),
    (GH, dict(host="api.github.com", paths=["/repos/acme/x", "/user"]), "paths"),
    (GH, dict(host="api.github.com", paths=["/repos/acme*"]), "paths"),
    (GH, dict(host="api.github.com"), "paths"),          # no paths = every path
    (dict(host="api.github.com", methods=["GET"]), dict(host="api.github.com",
                                                        paths=["/any/**"]), None),
    (dict(host="api.github.com", methods=["GET"]), dict(host="api.github.com"), None),
    # -- mcp ------------------------------------------------------------------
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["search_docs"], "args": mcp_args()}), None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["search_docs", "delete_repo"], "args": mcp_args()}), "mcp"),
    # no tools listed = no tool may be called: narrower than any ceiling
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"], mcp={"args": mcp_args()}), None),
    (dict(host="mcp.acme.dev", paths=["/mcp"], mcp={"args": {}}),
     dict(host="mcp.acme.dev", paths=["/mcp"], mcp={"tools": ["search_docs"]}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"], methods=["POST"]), "mcp"),  # no mcp at all
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit=None)}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"maximum": 51,
                                                                    "minimum": 5})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"maximum": 10})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"const": 7})}), None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"enum": [1, 50]})}), None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"enum": [0, 50]})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(limit={"const": True})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"],
                    "args": mcp_args(repo={"enum": ["widgets", "secrets"]})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(repo={"const": "gadgets"})}),
     None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(repo={"maxLength": 3})}), "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(query={"maxLength": 101})}),
     "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(query={"const": "short"})}),
     None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"],
                    "args": mcp_args(branch={"pattern": "^feature/x"})}), "mcp"),  # not identical
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"],
                    "args": mcp_args(branch={"pattern": "^feature/", "maxLength": 9})}), None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(mode={"const": "write"})}), "mcp"),
    # mcp.methods: a subset of the ceiling's patterns, as written; none when it has none
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(), "methods": ["resources/*"]}),
     "mcp"),
    (MCPM, dict(host="mcp.acme.dev", paths=["/mcp"],
                mcp={"tools": ["read_file"], "args": mcp_args()}), None),
    (MCPM, dict(host="mcp.acme.dev", paths=["/mcp"],
                mcp={"tools": ["read_file"], "args": mcp_args(), "methods": ["prompts/get"]}),
     None),
    (MCPM, dict(host="mcp.acme.dev", paths=["/mcp"],
                mcp={"tools": ["read_file"], "args": mcp_args(),
                     "methods": ["prompts/get", "resources/*"]}), None),
    (MCPM, dict(host="mcp.acme.dev", paths=["/mcp"],
                mcp={"tools": ["read_file"], "args": mcp_args(), "methods": ["prompts/*"]}),
     "mcp"),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"], "args": mcp_args(mode={"enum": ["read"]})}), None),
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp"],
               mcp={"tools": ["read_file"],
                    "args": {**mcp_args(), "extra": {"maxLength": 3}}}), None),  # stricter
    (MCP, dict(host="mcp.acme.dev", paths=["/mcp", "/other"],
               mcp={"tools": ["read_file"], "args": mcp_args()}), "paths"),
    (dict(host="mcp.acme.dev", paths=["/mcp"], methods=["POST"]),
     dict(host="mcp.acme.dev", paths=["/mcp"], methods=["POST"], mcp={"tools": ["x"]}), None),
    # -- secret and approval --------------------------------------------------
    ({**GH, "secret": "gh-read"}, dict(host="api.github.com", paths=["/repos/acme/x"],
                                       secret="gh-read"), None),
    ({**GH, "secret": "gh-read"}, dict(host="api.github.com", paths=["/repos/acme/x"]), None),
    ({**GH, "secret": "gh-read"}, dict(host="api.github.com", paths=["/repos/acme/x"],
                                       secret="gh-admin"), "secret"),
    (GH, dict(host="api.github.com", paths=["/repos/acme/x"], secret="gh-read"), "secret"),
    ({**GH, "approval": "required"}, dict(host="api.github.com", paths=["/repos/acme/x"],
                                          approval="required"), None),
    ({**GH, "approval": "required"}, dict(host="api.github.com", paths=["/repos/acme/x"]),
     "approval"),
    (GH, dict(host="api.github.com", paths=["/repos/acme/x"], approval="required"), None),
]


@pytest.mark.parametrize(("ceiling", "task", "key"), TABLE)
def test_within_table(ceiling: dict[str, Any], task: dict[str, Any], key: str | None) -> None:
    c = rule(**{"id": "ceil", **ceiling})
    why = breach(rule(**task), [c])
    if key is None:
        assert why is None, why
    else:
        assert why is not None, "expected a breach"
        assert why.key == key, why
        assert why.rule == "t"
        assert "ceil" in why.reason


def test_no_ceiling_grants_nothing() -> None:
    why = breach(rule(host="api.github.com"), [])
    assert why is not None and "no ceiling" in why.reason


def test_one_ceiling_rule_must_hold_the_whole_task_rule() -> None:
    """GET from one ceiling rule and POST from another do not add up."""
    ceiling = [rule(id="get", host="a.test", methods=["GET"]),
               rule(id="post", host="a.test", methods=["POST"])]
    assert breach(rule(host="a.test", methods=["GET"]), ceiling) is None
    why = breach(rule(host="a.test", methods=["GET", "POST"]), ceiling)
    assert why is not None and why.key == "methods"


def test_error_names_the_closest_ceiling_rule() -> None:
    ceiling = [rule(id="other-host", host="b.test", methods=["GET", "POST"]),
               rule(id="same-host", host="a.test", methods=["GET"], paths=["/x/**"])]
    why = breach(rule(host="a.test", methods=["GET"], paths=["/y"]), ceiling)
    assert why is not None and why.key == "paths"
    assert "'same-host'" in why.reason and "'/y'" in why.reason


def test_host_breach_lists_the_ceiling_hosts() -> None:
    why = breach(rule(host="c.test"), [rule(id="a", host="a.test"), rule(id="b", host="b.test")])
    assert why is not None and why.key == "host"
    assert "a.test" in why.reason and "b.test" in why.reason


@pytest.mark.parametrize(("mcp", "where"), [
    ([], "mcp"),
    ({"tools": "search"}, "mcp.tools"),
    ({"tools": [1]}, "mcp.tools"),
    ({"args": []}, "mcp.args"),
    ({"args": {"a": 5}}, "mcp.args.a"),
    ({"args": {"a": {"maxium": 5}}}, "mcp.args.a.maxium"),
    ({"args": {"a": {"maximum": "5"}}}, "mcp.args.a.maximum"),
    ({"args": {"a": {"maximum": True}}}, "mcp.args.a.maximum"),
    ({"args": {"a": {"maxLength": -1}}}, "mcp.args.a.maxLength"),
    ({"args": {"a": {"enum": []}}}, "mcp.args.a.enum"),
    ({"args": {"a": {"pattern": "("}}}, "mcp.args.a.pattern"),
    ({"tools": {"t": 5}}, "mcp.tools.t"),
    ({"tools": {"t": {"args": []}}}, "mcp.tools.t.args"),
    ({"tools": {"t": {"args": {"a": 5}}}}, "mcp.tools.t.args.a"),
    ({"tools": {"t": {"args": {"a": {"maxium": 5}}}}}, "mcp.tools.t.args.a.maxium"),
    ({"tools": {"t": {"args": {"a": {"pattern": "("}}}}}, "mcp.tools.t.args.a.pattern"),
    ({"tools": {"t": {"args": {"a": {"enum": []}}}}}, "mcp.tools.t.args.a.enum"),
])
def test_mcp_shape_errors_name_the_key(mcp: Any, where: str) -> None:
    with pytest.raises(ValueError, match=rf"^{where.replace('.', '[.]')}: "):
        check_mcp_shape(mcp, "mcp")


GH_APP = dict(host="api.github.com", methods=["GET", "POST"], paths=["/repos/acme/**"],
              secret="gh-app", repositories=["widgets", "gadgets"],
              permissions={"issues": "write", "contents": "read"})


@pytest.mark.parametrize(("task", "field"), [
    (dict(repositories=["widgets"], permissions={"issues": "read"}), None),
    (dict(repositories=["widgets", "gadgets"], permissions={"issues": "write"}), None),
    (dict(repositories=["widgets", "secret-repo"], permissions={"issues": "read"}), "secret"),
    (dict(permissions={"issues": "read"}), "secret"),          # no repositories = all of them
    (dict(repositories=["widgets"]), "secret"),                # no permissions = the app's all
    (dict(repositories=["widgets"], permissions={"contents": "write"}), "secret"),
    (dict(repositories=["widgets"], permissions={"admin": "read"}), "secret"),
])
def test_github_token_scope_within_ceiling(task: dict[str, Any], field: str | None) -> None:
    ceiling = parse_rule({"id": "c", **GH_APP})
    rule = parse_rule({"id": "t", "host": "api.github.com", "methods": ["GET"],
                       "paths": ["/repos/acme/widgets/issues"], "secret": "gh-app", **task})
    why = breach(rule, [ceiling])
    assert (why.key if why else None) == field, why


def test_a_rule_without_the_secret_needs_no_token_scope() -> None:
    """No secret, no token: the ceiling's repositories/permissions bound a token the
    task rule never gets, so they do not make it name any (it could not: a rule
    names a token's scope only together with its secret)."""
    ceiling = parse_rule({"id": "c", **GH_APP})
    rule = parse_rule({"id": "t", "host": "api.github.com", "methods": ["GET"],
                       "paths": ["/repos/acme/widgets/issues"]})
    assert breach(rule, [ceiling]) is None


# -- per-tool constraints within a ceiling ------------------------------------------
PER_TOOL_CEILING = dict(host="mcp.acme.dev", paths=["/mcp"], mcp={"tools": {
    "search_docs": {"args": {"limit": {"maximum": 50}}},
    "read_file": {"args": {"path": {"pattern": "^/docs/"}}}}})


@pytest.mark.parametrize(("ceiling", "task_mcp", "why"), [
    (PER_TOOL_CEILING, {"tools": {"search_docs": {"args": {"limit": {"maximum": 10}}}}}, None),
    (PER_TOOL_CEILING, {"tools": ["read_file"], "args": {"path": {"pattern": "^/docs/"}}},
     None),  # held for every tool is held for this one
    (PER_TOOL_CEILING, {"tools": {"search_docs": {"args": {"limit": {"maximum": 99}}}}},
     "tool 'search_docs': argument 'limit' must be held to the ceiling's maximum 50"),
    (PER_TOOL_CEILING, {"tools": ["search_docs"]},
     "tool 'search_docs': argument 'limit' must keep the ceiling's constraint"),
    (PER_TOOL_CEILING, {"tools": {"read_file": {"args": {"path": {"pattern": ".*"}}}}},
     "tool 'read_file': argument 'path' must be held to the ceiling's pattern"),
    (PER_TOOL_CEILING, {"tools": {"delete": {}}}, "tools ['delete'] are not among"),
    # a constraint the ceiling puts on every tool may be held per tool, for each tool
    (dict(MCP, mcp={"tools": ["search_docs", "read_file"], "args": {"limit": {"maximum": 50}}}),
     {"tools": {"search_docs": {"args": {"limit": {"maximum": 5}}},
                "read_file": {"args": {"limit": {"maximum": 50}}}}}, None),
    (dict(MCP, mcp={"tools": ["search_docs", "read_file"], "args": {"limit": {"maximum": 50}}}),
     {"tools": {"search_docs": {"args": {"limit": {"maximum": 5}}}, "read_file": {}}},
     "tool 'read_file': argument 'limit' must keep the ceiling's constraint"),
])
def test_per_tool_constraints_within_ceiling(ceiling: dict[str, Any], task_mcp: dict[str, Any],
                                             why: str | None) -> None:
    c = rule(**{"id": "ceil", **ceiling})
    got = breach(rule(host="mcp.acme.dev", paths=["/mcp"], mcp=task_mcp), [c])
    if why is None:
        assert got is None, got
    else:
        assert got is not None and got.key == "mcp" and why in got.reason, got
