"""proxy/policy/_paths.py: ambiguous raw paths are refused; the rest match globs exactly."""

from __future__ import annotations

import pytest

from proxy.policy import PathGlob, ambiguity, decode, split_target

# (raw path, the words the reason must contain). Every form some server reads
# differently from another: dot segments, encoded separators, double encoding,
# parameters, control bytes, malformed or non-UTF-8 escapes.
AMBIGUOUS = [
    (b"/a/../b", "dot segment"),
    (b"/a/..", "dot segment"),
    (b"/..", "dot segment"),
    (b"/a/./b", "dot segment"),
    (b"/.", "dot segment"),
    (b"/a/.", "dot segment"),
    (b"/a/%2e%2e/b", "encoded '.'"),
    (b"/a/%2E%2E/b", "encoded '.'"),
    (b"/a/.%2e/b", "encoded '.'"),
    (b"/a/%2e./b", "encoded '.'"),
    (b"/a/%2e/b", "encoded '.'"),
    (b"/a%2eb", "encoded '.'"),
    (b"/a%2fb", "encoded '/'"),
    (b"/a%2Fb", "encoded '/'"),
    (b"/allowed%2f..%2fsecret", "encoded '/'"),
    (b"/a%5cb", "encoded '\\'"),
    (b"/a%5Cb", "encoded '\\'"),
    (b"/a\\b", "'\\'"),
    (b"/a\\..\\b", "'\\'"),
    (b"//a", "empty segment"),
    (b"/a//b", "empty segment"),
    (b"/a/b//", "empty segment"),
    (b"/a%252fb", "double encoding"),
    (b"/a%252e%252e/b", "double encoding"),
    (b"/a%25", "double encoding"),
    (b"/a;x=1", "';' parameters"),
    (b"/a;/b", "';' parameters"),
    (b"/a/..;/b", "';' parameters"),
    (b"/a%3bx", "encoded ';'"),
    (b"/a%3Bx", "encoded ';'"),
    (b"/a%3fx", "encoded '?'"),
    (b"/a%23x", "encoded '#'"),
    (b"/a#frag", "fragment"),
    (b"/a\x00b", "control byte"),
    (b"/a\tb", "control byte"),
    (b"/a\rb", "control byte"),
    (b"/a\x1fb", "control byte"),
    (b"/a\x7fb", "control byte"),
    (b"/a%00b", "encoded control byte"),
    (b"/a%0a", "encoded control byte"),
    (b"/a%0D%0Ab", "encoded control byte"),
    (b"/a%09", "encoded control byte"),
    (b"/a%7f", "encoded control byte"),
    (b"/a%7F", "encoded control byte"),
    (b"/a%", "malformed percent escape"),
    (b"/a%2", "malformed percent escape"),
    (b"/a%zz", "malformed percent escape"),
    (b"/a%g0", "malformed percent escape"),
    (b"/a%%41", "malformed percent escape"),
    (b"/a%u002e", "malformed percent escape"),
    (b"/a%ff", "UTF-8"),
    (b"/a%c3", "UTF-8"),
    (b"/a%c0%ae", "UTF-8"),  # overlong '.'
    (b"/a%e0%80%af", "UTF-8"),  # overlong '/'
    (b"/a\xc3\xa9", "raw non-ASCII byte"),
    (b"/a\xff", "raw non-ASCII byte"),
    (b"", "must start with '/'"),
    (b"a/b", "must start with '/'"),
    (b"*", "must start with '/'"),
    (b"http://example.com/a", "must start with '/'"),
    # Characters NFKC folds into '.', '/', '\\' and other text: a server that
    # normalises reads a path the globs never saw.
    (b"/a/%EF%BC%8E%EF%BC%8E/b", "look-alike"),  # full-width '..'
    (b"/a/%ef%bc%8e/b", "look-alike"),  # full-width '.'
    (b"/a%EF%BC%8Fb", "look-alike"),  # full-width '/'
    (b"/a%EF%BC%BCb", "look-alike"),  # full-width '\\'
    (b"/a/%E2%80%A5/b", "look-alike"),  # two-dot leader, NFKC '..'
    (b"/a/%E2%80%A4/b", "look-alike"),  # one-dot leader, NFKC '.'
    (b"/a%EF%BC%9Bb", "look-alike"),  # full-width ';'
    (b"/%EF%BD%81dmin", "look-alike"),  # full-width 'a'
    (b"/%EF%AC%81le", "look-alike"),  # the 'fi' ligature
    (b"/a%C2%A0b", "look-alike"),  # no-break space, NFKC ' '
    (b"/e%CC%81", "look-alike"),  # 'e' + combining acute, NFKC 'é'
]


@pytest.mark.parametrize(("raw", "reason"), AMBIGUOUS)
def test_ambiguous_paths_are_refused(raw: bytes, reason: str) -> None:
    why = ambiguity(raw)
    assert why is not None, raw
    assert reason in why, why


@pytest.mark.parametrize(("raw", "decoded"), [
    (b"/", "/"),
    (b"/a/b", "/a/b"),
    (b"/a/", "/a/"),
    (b"/a%20b", "/a b"),
    (b"/a%41", "/aA"),
    (b"/a%c3%a9", "/a\u00e9"),
    (b"/~user/x-y_z", "/~user/x-y_z"),
    (b"/a..b/...", "/a..b/..."),  # dots inside a segment are no dot segment
    (b"/.well-known/x", "/.well-known/x"),
    (b"/a+b", "/a+b"),
    (b"/a:b@c", "/a:b@c"),
    (b"/%E6%97%A5%E6%9C%AC", "/\u65e5\u672c"),  # already NFKC: not a look-alike
])
def test_unambiguous_paths_decode_once(raw: bytes, decoded: str) -> None:
    assert ambiguity(raw) is None
    assert decode(raw) == decoded


@pytest.mark.parametrize(("target", "path", "query"), [
    (b"/a?x=1", b"/a", b"x=1"),
    (b"/a", b"/a", b""),
    (b"/a?", b"/a", b""),
    (b"/a?x=1?y", b"/a", b"x=1?y"),
])
def test_split_target(target: bytes, path: bytes, query: bytes) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize(("glob", "path", "matches"), [
    ("/a", "/a", True),
    ("/a", "/a/", False),
    ("/a", "/ab", False),
    ("/a/", "/a/", True),
    # '*' stays inside one segment
    ("/a/*", "/a/b", True),
    ("/a/*", "/a/b/c", False),
    ("/a/*", "/a", False),
    ("/a/*/c", "/a/b/c", True),
    ("/a/*/c", "/a/b/x/c", False),
    ("/a/*.json", "/a/x.json", True),
    ("/a/*.json", "/a/x.json/y", False),
    ("/a/*.json", "/a/xjson", False),
    ("/a/b*c", "/a/bxyzc", True),
    ("/a/b*c", "/a/b/c", False),
    ("/*", "/a", True),
    ("/*", "/a/b", False),
    # '**' crosses segments
    ("/a/**/c", "/a/c", True),
    ("/a/**/c", "/a/b/c", True),
    ("/a/**/c", "/a/b/x/c", True),
    ("/a/**/c", "/a/b/x/d", False),
    ("/a/**/c", "/ab/c", False),
    ("/**", "/", True),
    ("/**", "/anything/at/all", True),
    # a trailing '/**' also matches the directory itself
    ("/repos/acme/**", "/repos/acme", True),
    ("/repos/acme/**", "/repos/acme/", True),
    ("/repos/acme/**", "/repos/acme/widgets/issues/1", True),
    ("/repos/acme/**", "/repos/acmex", False),
    ("/repos/acme/**", "/repos/acmex/y", False),
    ("/repos/acme/**", "/repos", False),
    # regex characters in globs are literal
    ("/a.b", "/axb", False),
    ("/a+b", "/a+b", True),
    ("/a(b)", "/a(b)", True),
    ("/a$", "/a$", True),
    ("/a$", "/a", False),
])
def test_glob_matches(glob: str, path: str, matches: bool) -> None:
    assert PathGlob.parse(glob).matches(path) is matches


@pytest.mark.parametrize(("glob", "message"), [
    ("a/b", "must start with '/'"),
    ("", "must start with '/'"),
    ("/a//b", "empty or dot segment"),
    ("/a/../b", "empty or dot segment"),
    ("/./a", "empty or dot segment"),
    ("/a?x=1", "never matched with"),
    ("/a#f", "never matched with"),
    ("/a;b", "never matched with"),
    ("/a\\b", "never matched with"),
    ("/a\x01", "never matched with"),
    ("/a/**b", "'**' must be a whole segment"),
    ("/a/b**", "'**' must be a whole segment"),
])
def test_bad_globs(glob: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        PathGlob.parse(glob)
    assert message in str(err.value)


@pytest.mark.parametrize("glob", [None, 3, ["/a"]])
def test_glob_must_be_a_string(glob: object) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        PathGlob.parse(glob)  # type: ignore[arg-type]


def test_glob_str_is_its_text() -> None:
    assert str(PathGlob.parse("/a/**")) == "/a/**"


def test_the_quick_reading_agrees_with_every_check() -> None:
    """A path with none of the bytes the checks look at is read as it is at once; on
    any path the answer is the one the full checks give (here: forced for all)."""
    import random
    import re

    from proxy.policy import _paths

    alphabet = [b"/", b"a", b".", b"..", b"%", b"%2f", b"%2e", b"%41", b"%e2%80%a5", b"%zz",
                b";", b"#", b"\\", b"\x00", b"\x7f", b"\xc3\xa9", b"~", b"-", b"_", b"//",
                b"%ef%bc%8f", b"%25", b"@", b":", b"!"]
    rng = random.Random(12)
    paths = [b"/" + b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
             for _ in range(20_000)]
    quick = [ambiguity(p) for p in paths]
    full = _paths._SUSPECT
    try:
        _paths._SUSPECT = re.compile(rb"")  # every path takes the full checks
        assert [ambiguity(p) for p in paths] == quick
    finally:
        _paths._SUSPECT = full
    assert quick.count(None) > 1000 and len(set(quick)) > 10  # both kinds were seen
