"""Review-page sessions: expiry, eviction, and what the table keeps."""

from __future__ import annotations

from proxy.control import _session as ui_session
from proxy.control._session import IDLE_SECONDS, MAX_AGE_SECONDS, MAX_SESSIONS, Sessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_idle_and_absolute_expiry() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    sid, session = sessions.create()
    assert sessions.get(sid) is session
    clock.now += IDLE_SECONDS - 1
    assert sessions.get(sid) is session  # use keeps it alive…
    for _ in range(int(MAX_AGE_SECONDS // (IDLE_SECONDS - 1)) + 1):
        clock.now += IDLE_SECONDS - 1
        sessions.get(sid)
    assert sessions.get(sid) is None  # …but not past its maximum age
    sid, _ = sessions.create()
    clock.now += IDLE_SECONDS + 1
    assert sessions.get(sid) is None


def test_ids_are_random_and_only_their_hash_is_kept() -> None:
    sessions = Sessions(Clock())
    a, sa = sessions.create()
    b, sb = sessions.create()
    assert a != b and sa.csrf != sb.csrf and len(a) >= 43
    assert a not in repr(sessions._by_key) and b not in repr(sessions._by_key)
    assert sessions.get(None) is None and sessions.get("") is None
    assert sessions.get("x" * 4096) is None
    assert sessions.get(sa.csrf) is None  # the CSRF token is not a session id


def test_oldest_sessions_are_evicted_beyond_the_cap() -> None:
    sessions = Sessions(Clock())
    first, _ = sessions.create()
    ids = [sessions.create()[0] for _ in range(MAX_SESSIONS)]
    assert sessions.get(first) is None
    assert all(sessions.get(i) is not None for i in ids)
    assert ui_session.COOKIE == "taskgate_session"
