"""The github_app token-scope rule, checked in one place (proxy.secrets.check_token_scope)
for the config's rules and a task's: repositories/permissions only on a github_app
secret, where they limit the minted token."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.errors import InvalidField
from proxy.policy import parse_rule
from proxy.secrets import check_token_scope, parse_secret

# The rule reads only the provider (a github_app spec would need its key file).
SECRETS: dict[str, Any] = {
    "gh": SimpleNamespace(provider="github_app"),
    "db": parse_secret("db", {"provider": "env", "var": "DB_TOKEN"}),
}


def rule(**kw: Any) -> Any:
    return parse_rule({"id": "r", "host": "api.github.com", "methods": ["GET"], **kw})


@pytest.mark.parametrize("kw", [
    {},
    {"secret": "gh", "repositories": ["widgets"], "permissions": {"issues": "read"}},
    {"secret": "db"},
    {"secret": "undefined", "repositories": ["widgets"]},  # the config names that error
], ids=["no-secret", "github-app", "plain-secret", "undefined-secret"])
def test_allowed(kw: dict[str, Any]) -> None:
    check_token_scope(rule(**kw), SECRETS)


@pytest.mark.parametrize(("kw", "path"), [
    ({"secret": "db", "repositories": ["widgets"]}, ("repositories",)),
    ({"secret": "db", "permissions": {"issues": "read"}}, ("permissions",)),
    ({"secret": "db", "repositories": ["w"], "permissions": {"issues": "read"}},
     ("repositories",)),
], ids=["repositories", "permissions", "both"])
def test_refused_on_a_secret_that_mints_no_github_token(kw: dict[str, Any],
                                                        path: tuple[str, ...]) -> None:
    with pytest.raises(InvalidField) as e:
        check_token_scope(rule(**kw), SECRETS)
    assert e.value.path == path and e.value.extra == {"rule": "r"}
    assert e.value.reason == ("rule 'r' limits repositories/permissions, which only a "
                              "github_app secret can do; secret 'db' is env")
    assert e.value.at("rules", 0).field == f"rules[0].{path[0]}"
