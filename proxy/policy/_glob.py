"""Is every path one glob matches also matched by another? Exactly, by automata.

A task's path globs must lie within its workload's ceiling. "Within" is
language containment: ``L(task globs) ⊆ L(ceiling globs)``, where ``L(g)`` is
the set of decoded paths :class:`proxy.policy._paths.PathGlob` matches. Globs are
regular, so containment is decided exactly rather than by string tricks:

* each glob becomes a small NFA over characters whose tokens mirror the
  regex :meth:`PathGlob.parse` builds — a literal character; ``*`` (any run of
  non-``/`` characters, possibly empty); a middle ``/**`` (zero or more
  ``/segment`` with non-empty segments); a trailing ``/**`` (nothing, or ``/``
  followed by anything);
* the infinite alphabet is folded into the characters that appear in either
  side plus one symbol, ``OTHER``, standing for every other character (no
  glob can tell two such characters apart);
* a breadth-first walk over pairs (state of the task glob's NFA, set of states
  of the ceiling's NFAs) looks for a path the task glob accepts and no
  ceiling glob does. Finding one yields a concrete counterexample path for
  the error message; exhausting the walk proves containment.

Only paths that can reach a rule count: the gateway refuses a path with an
empty segment (``//``) before matching (:func:`proxy.policy._paths.ambiguity`), so the
walk never puts ``/`` right after ``/``. That is why ``/a/*/c`` lies within
``/a/**/c`` although ``*`` alone would also match the empty segment of
``/a//c``.

The walk is bounded (:data:`MAX_STATES` per question, and an optional
:class:`Budget` shared by all the questions one request asks); a glob pair too
complex to decide is reported as not contained, so the answer errs on the
side of refusing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["MAX_STATES", "Budget", "accepts", "counterexample", "contains"]

MAX_STATES = 50_000

_LIT, _STAR, _MID, _LAST = 0, 1, 2, 3
_OTHER = ""  # the symbol for "any character not named in either glob"
_SLASH = "/"

State = tuple[int, int, int]  # (glob index, token position, sub-state)
_Node = tuple[State, frozenset[State], bool]  # task state, ceiling states, last was '/'


@dataclass(slots=True)
class Budget:
    """How many more automaton states the caller lets containment checks visit."""

    left: int


@dataclass(frozen=True, slots=True)
class _Glob:
    tokens: tuple[tuple[int, str], ...]


def _tokens(text: str) -> _Glob:
    """Tokens of a glob already accepted by :meth:`PathGlob.parse`."""
    out: list[tuple[int, str]] = []
    segments = text.split("/")[1:]
    for i, seg in enumerate(segments):
        if seg == "**":
            out.append((_LAST if i == len(segments) - 1 else _MID, ""))
            continue
        out.append((_LIT, "/"))
        for j, part in enumerate(seg.split("*")):
            if j:
                out.append((_STAR, ""))
            out.extend((_LIT, c) for c in part)
    return _Glob(tuple(out))


class _Nfa:
    """A union of globs as one NFA; states are (glob, position, sub-state)."""

    def __init__(self, globs: Sequence[_Glob]) -> None:
        self.globs = globs

    def start(self) -> frozenset[State]:
        return self.closure((g, 0, 0) for g in range(len(self.globs)))

    def accepting(self, state: State) -> bool:
        g, i, sub = state
        return sub == 0 and i == len(self.globs[g].tokens)

    def closure(self, states: Iterable[State]) -> frozenset[State]:
        seen: set[State] = set()
        todo = list(states)
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            g, i, sub = s
            toks = self.globs[g].tokens
            if i == len(toks):
                continue
            kind = toks[i][0]
            if sub == 0 and kind in (_STAR, _MID, _LAST):
                todo.append((g, i + 1, 0))  # each of these may match nothing
            elif kind == _MID and sub == 2:
                todo.append((g, i, 0))  # a segment ended; another may follow
            elif kind == _LAST and sub == 1:
                todo.append((g, i + 1, 0))  # '/...' ends wherever it likes
        return frozenset(seen)

    def step(self, state: State, sym: str) -> list[State]:
        g, i, sub = state
        toks = self.globs[g].tokens
        if i == len(toks):
            return []
        kind, ch = toks[i]
        if sub == 0:
            if kind == _LIT:
                return [(g, i + 1, 0)] if sym == ch and sym != _OTHER else []
            if kind == _STAR:
                return [(g, i, 0)] if sym != _SLASH else []
            return [(g, i, 1)] if sym == _SLASH else []  # _MID, _LAST start with '/'
        if kind == _MID:
            return [(g, i, 2)] if sym != _SLASH else []
        return [(g, i, 1)]  # _LAST after its '/': anything at all

    def move(self, states: frozenset[State], sym: str) -> frozenset[State]:
        nxt: list[State] = []
        for s in states:
            nxt.extend(self.step(s, sym))
        return self.closure(nxt)


def _alphabet(globs: Iterable[_Glob]) -> list[str]:
    chars = {ch for g in globs for kind, ch in g.tokens if kind == _LIT}
    chars.add(_SLASH)
    return sorted(chars) + [_OTHER]


def _render(symbols: list[str], taken: set[str]) -> str:
    """A readable path for a counterexample; OTHER becomes a character no glob names."""
    other = next(c for c in "xzqkjw0123456789~" if c not in taken)
    return "".join(other if s == _OTHER else s for s in symbols)


def counterexample(inner: Sequence[str], outer: Sequence[str],
                   budget: Budget | None = None) -> str | None:
    """A path some glob of ``inner`` matches and no glob of ``outer`` does, else ``None``.

    Raises ``ValueError`` when the walk exceeds :data:`MAX_STATES` or ``budget``
    (treat as not contained).
    """
    outer_globs = [_tokens(t) for t in outer]
    big = _Nfa(outer_globs)
    for text in inner:
        g = _tokens(text)
        small = _Nfa([g])
        alphabet = _alphabet([g, *outer_globs])
        taken = set(alphabet)
        start_out = big.start()
        parent: dict[_Node, tuple[_Node, str] | None] = {}
        queue: deque[_Node] = deque()
        for s in small.start():
            node0 = (s, start_out, False)
            parent[node0] = None
            queue.append(node0)
        while queue:
            node = queue.popleft()
            s, outs, after_slash = node
            if small.accepting(s) and not any(big.accepting(o) for o in outs):
                symbols: list[str] = []
                at: _Node | None = node
                while at is not None:
                    link = parent[at]
                    if link is None:
                        break
                    at, sym = link
                    symbols.append(sym)
                return _render(symbols[::-1], taken)
            for sym in alphabet:
                if after_slash and sym == _SLASH:
                    continue  # '//' never reaches a rule
                nexts = small.step(s, sym)
                if not nexts:
                    continue
                outs2 = big.move(outs, sym)
                for s2 in small.closure(nexts):
                    nxt = (s2, outs2, sym == _SLASH)
                    if nxt not in parent:
                        if len(parent) >= MAX_STATES or (budget is not None
                                                         and budget.left <= 0):
                            raise ValueError("the path globs are too complex to compare "
                                             "with the ceiling; use simpler globs")
                        if budget is not None:
                            budget.left -= 1
                        parent[nxt] = (node, sym)
                        queue.append(nxt)
    return None


def accepts(glob: str, path: str) -> bool:
    """Whether the automaton of ``glob`` accepts ``path`` (tests hold it to PathGlob)."""
    g = _tokens(glob)
    nfa = _Nfa([g])
    names = {ch for kind, ch in g.tokens if kind == _LIT} | {_SLASH}
    states = nfa.start()
    for c in path:
        states = nfa.move(states, c if c in names else _OTHER)
        if not states:
            return False
    return any(nfa.accepting(s) for s in states)


def contains(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """Whether every path matched by a glob of ``inner`` is matched by one of ``outer``."""
    try:
        return counterexample(inner, outer) is None
    except ValueError:
        return False
