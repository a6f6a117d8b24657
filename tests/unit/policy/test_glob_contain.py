"""Path-glob containment: a table of cases, and the automaton held to PathGlob's regex."""

from __future__ import annotations

import random

import pytest

from proxy.policy import PathGlob
from proxy.policy._glob import MAX_STATES, accepts, contains, counterexample

# (ceiling globs, task globs, contained?)
TABLE = [
    (["/**"], ["/anything/at/all"], True),
    (["/**"], ["/**"], True),
    (["/a/**"], ["/a/**"], True),
    (["/a/**"], ["/a"], True),                      # '/a/**' includes the directory itself
    (["/a/**"], ["/a/"], True),
    (["/a/**"], ["/a/b/c"], True),
    (["/a/**"], ["/a/*"], True),
    (["/a/**"], ["/a/*/c/**"], True),
    (["/a/**"], ["/a/**/c"], True),
    (["/a/**"], ["/ab"], False),                    # not a path below /a
    (["/a/**"], ["/a*"], False),
    (["/a/**"], ["/**"], False),
    (["/a/*"], ["/a/b"], True),
    (["/a/*"], ["/a/b*"], True),
    (["/a/*"], ["/a/*"], True),
    (["/a/*"], ["/a/**"], False),                   # '**' reaches deeper than one segment
    (["/a/*"], ["/a/b/c"], False),
    (["/a/*"], ["/a"], False),
    (["/a/*/c"], ["/a/b/c"], True),
    (["/a/*/c"], ["/a/**/c"], False),               # '**' may be zero or several segments
    (["/a/**/c"], ["/a/*/c"], True),                # ('/a//c' is refused before matching)
    (["/a/**/c"], ["/a/*b/c"], True),
    (["/a/**/c"], ["/a/c"], True),
    (["/a/**/c"], ["/a/x/y/c"], True),
    (["/a/**/c"], ["/a/**/c/d"], False),
    (["/repos/acme/*/issues/**"], ["/repos/acme/widgets/issues/42"], True),
    (["/repos/acme/*/issues/**"], ["/repos/acme/widgets/issues/**"], True),
    (["/repos/acme/*/issues/**"], ["/repos/*/widgets/issues/**"], False),
    (["/repos/acme/*/issues/**"], ["/repos/acme/widgets/pulls"], False),
    (["/v1/*.json"], ["/v1/a.json"], True),
    (["/v1/*.json"], ["/v1/*.json"], True),
    (["/v1/*.json"], ["/v1/*"], False),
    (["/v1/*.json"], ["/v1/a*.json"], True),
    (["/v1/*.json"], ["/v1/*json"], False),         # 'xjson' lacks the dot
    (["/v1/a*"], ["/v1/ab*c"], True),
    (["/v1/*b"], ["/v1/a*"], False),
    (["/x"], ["/x"], True),
    (["/x"], ["/x/"], False),
    (["/x/"], ["/x"], False),
    (["/x", "/y"], ["/x"], True),
    (["/a/b/**", "/a/c/**"], ["/a/*/d"], False),    # '/a/e/d' escapes both
    (["/a/b/**", "/a/*"], ["/a/*"], True),
    (["/a/*", "/a/*/**"], ["/a/**"], False),        # '/a' itself escapes
    (["/a", "/a/*", "/a/*/**"], ["/a/**"], True),   # ...covered only by the union
    (["/*"], ["/"], True),                          # '*' may match an empty segment
    (["/mcp"], ["/mcp"], True),
    (["/mcp"], ["/mcp/**"], False),
]


@pytest.mark.parametrize(("outer", "inner", "expected"), TABLE)
def test_containment_table(outer: list[str], inner: list[str], expected: bool) -> None:
    for g in outer + inner:
        PathGlob.parse(g)  # every glob in the table is one a rule may carry
    assert contains(outer, inner) is expected
    example = counterexample(inner, outer)
    if expected:
        assert example is None
    else:
        # The counterexample is a real witness: some inner glob matches it, no outer does.
        assert example is not None and "//" not in example
        assert any(PathGlob.parse(g).matches(example) for g in inner), example
        assert not any(PathGlob.parse(g).matches(example) for g in outer), example


def _random_globs(rnd: random.Random, n: int) -> list[str]:
    segs = ["a", "b", "ab", "*", "a*", "*b", "a*b", "**", "", "x.y"]
    out = set()
    while len(out) < n:
        text = "/" + "/".join(rnd.choice(segs) for _ in range(rnd.randint(1, 4)))
        try:
            PathGlob.parse(text)
        except ValueError:
            continue
        out.add(text)
    return sorted(out)


def test_automaton_agrees_with_pathglob_regex() -> None:
    """The automaton is a faithful model of what the matcher does (else containment lies)."""
    rnd = random.Random(7)
    globs = _random_globs(rnd, 120)
    paths = sorted({"/" + "".join(rnd.choice("ab/x.") for _ in range(rnd.randint(0, 7)))
                    for _ in range(1500)})
    for g in globs:
        pg = PathGlob.parse(g)
        for p in paths:
            assert accepts(g, p) == pg.matches(p), (g, p)


def test_containment_is_sound_on_samples() -> None:
    """Whenever containment is claimed, no sampled path breaks it."""
    rnd = random.Random(11)
    globs = _random_globs(rnd, 50)
    paths = sorted({"/" + "".join(rnd.choice("ab/x.") for _ in range(rnd.randint(0, 7)))
                    for _ in range(1500)})
    compiled = {g: PathGlob.parse(g) for g in globs}
    claims = 0
    for outer in globs:
        for inner in globs:
            if contains([outer], [inner]):
                claims += 1
                assert not any(compiled[inner].matches(p) and not compiled[outer].matches(p)
                               for p in paths if "//" not in p), (outer, inner)
    assert claims > len(globs)  # more than the trivial g ⊆ g


def test_too_complex_counts_as_not_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.policy._glob as gc

    monkeypatch.setattr(gc, "MAX_STATES", 3)
    assert contains(["/a/**"], ["/a/*/b/*/c"]) is False
    assert MAX_STATES >= 10_000
