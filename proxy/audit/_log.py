"""The audit log: one JSON line per call and per refusal, hash-chained.

Field names are defined once (:data:`FIELDS`); every record carries all of
them, ``None`` where a value does not apply. Records are written by one
writer thread in batches (so the event loop never blocks on the disk), and
:meth:`AuditLog.write` returns only once its record is in the file: the
gateway awaits it before the response reaches the agent, and a failed write
fails the call closed.

Chain: ``seq`` counts records across restarts; ``prev`` is the previous
record's ``hash``; ``hash`` is SHA-256 (or HMAC-SHA-256 with a key) over the
record's canonical encoding (orjson, sorted keys, without ``hash``).

Rotation (``audit.max_bytes``): when the file would grow past the limit it is
renamed ``<path>.<n>`` (n = 1, 2, … oldest first) and a new file starts; the
chain simply goes on, so the first record of each file carries the previous
file's last hash as ``prev`` and the next ``seq``. A removed or truncated file
therefore breaks the chain where the next file starts, and the whole set
begins at ``seq`` 1 with ``prev`` :data:`GENESIS`. ``proxy/audit/_verify.py``
checks it; ``proxy/audit/_query.py`` reads it.

Head (``proxy/audit/_head.py``): the writer records the last seq and hash in
``<path>.head``, so records cut from the end are detected too, and the same in the
state store (``AuditAnchor``, proxy/audit/_anchor.py), where the log's own folder
cannot roll it back. Both trail the log by at most :data:`HEAD_LAG_SECONDS`: a
batch written more than that after the last head write records it at once; a
later one marks it due, and the writer records it when the lag is up, whether or
not more records came (on close, always).

Values: every value is made encodable before it is chained (:func:`clean`, by the
writer, in place, for every record; :func:`new_record` cleans too, for records read
before they are written; a call's record is built without it). A
string that is not valid Unicode (a lone surrogate U+D800–U+DFFF: a ``\\ud800``
escape in an agent's JSON, or a byte that is not UTF-8 that a library kept as
U+DC80–U+DCFF) keeps its code point as the six characters ``\\udXXX``, so the
record says what was sent (a backslash already there is not doubled: the text is
for reading, not for decoding back). Integers past 64 bits become their decimal
text, and nesting deeper than :data:`MAX_DEPTH` is replaced by a note.

The writer never dies: a record it still cannot encode (a bug: a value of a
type JSON has not) is replaced, in the chain, by one that says so (decision
``error``, the fields it had to drop); its call is refused. A batch that fails
as a whole fails its calls (503), and the thread goes on; if the thread is gone,
or a write hangs for :data:`STALL_SECONDS` (a disk that stopped answering),
every waiting call and every new one is refused at once and the log reports
unhealthy (``/readyz``) until writes go through again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from proxy.audit._head import Head, check_mac, head_mac, head_path, read_head, write_head
from proxy.audit._reader import BadLine, read_record
from proxy.batching import FAILURES, WorkQueue, consume
from proxy.errors import Unavailable

__all__ = [
    "FIELDS",
    "Anchor",
    "GENESIS",
    "AuditLog",
    "chain_hash",
    "clean",
    "load_hmac_key",
    "log_files",
    "new_record",
    "redact_target",
    "rfc3339",
]

log = logging.getLogger(__name__)

FIELDS = (
    "ts", "seq", "replica", "request_id", "connect_id", "workload", "task", "owner", "client",
    "method",
    "scheme", "host", "port", "upstream_ip", "path", "tool", "decision", "rule", "reason",
    "secret", "approval", "status", "bytes_in", "bytes_out", "websocket", "duration_ms", "prev",
    "hash",
)
DECISIONS = ("allow", "deny", "error", "approved", "rejected", "held", "would_deny",
             "challenge")
GENESIS = "0" * 64
HEAD_LAG_SECONDS = 0.1  # how far the chain head (file and anchor) may trail the log
REDACTED = "REDACTED"
MAX_DEPTH = 32  # nesting a record keeps (orjson refuses past 254)
TOO_DEEP = "[nested too deep; not recorded]"
STALL_SECONDS = 10.0  # a batch taking longer: the disk stopped answering, fail closed
WATCH_SECONDS = 0.5  # how often the watchdog looks at the writer thread
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what orjson writes as a JSON integer


class Anchor(Protocol):
    """Where the chain's end is kept outside the log's folder (proxy/store/_store.py's
    ``AuditAnchor``): it only moves forward."""

    path: str

    def read(self) -> tuple[Head, str | None] | None:
        """The stored end and its MAC, ``None`` when none is stored."""

    def advance(self, seq: int, digest: str, mac: str | None, *, sync: bool = False,
                force: bool = False) -> None:
        """Store the end unless a later one is stored (``force``: replace it anyway)."""

    def close(self) -> None: ...


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Types clean() passes through untouched (exact types: a subclass goes through clean()).
# The writer checks them inline: the call per field was half of its work per record,
# and the writer's work holds the GIL the event loop needs.
_PLAIN = frozenset({type(None), bool, float})

_last_second: tuple[int, str] = (-1, "")  # the second last written, as text


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-28T12:00:00.123Z``.

    Every record has one: the text of the second is kept and only the milliseconds
    written per call (``strftime`` was a few microseconds of each call)."""
    global _last_second
    frac, whole = math.modf(ts)
    if ts < 0 or not math.isfinite(whole):  # as datetime has it (or refuses it)
        return _rfc3339(ts)
    second, us = int(whole), round(frac * 1e6)  # microseconds rounded as datetime does
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    last = _last_second
    if last[0] != second:
        last = _last_second = (second, _rfc3339(second)[:-5])
    return f"{last[1]}.{us // 1000:03d}Z"


def redact_target(path: str, query: str) -> str:
    """Path with every query value replaced: keys say what was asked, values may be secret.

    An item without '=' may be a value too (``?sk-live-…``): it is replaced whole.
    """
    if not query:
        return path
    parts = []
    for item in query.split("&"):
        key, sep, _ = item.partition("=")
        parts.append(f"{key}={REDACTED}" if sep else REDACTED if item else "")
    return f"{path}?{'&'.join(parts)}"


def _clean_str(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep the code point, as text
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _clean_int(value: int) -> Any:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    try:
        return str(value)
    except ValueError:  # more digits than Python converts
        return f"[an integer of {value.bit_length()} bits; not recorded]"


def clean(value: Any, depth: int = 0) -> Any:
    """``value`` in a form every encoder takes (the log, a log line, a JSON response).

    Strings lose lone surrogates (written ``\\udXXX``), integers past 64 bits
    become text, mapping keys become strings, tuples lists, and nesting past
    :data:`MAX_DEPTH` a note. Values of other types are left as they are: the
    writer replaces a record it cannot encode.
    """
    if isinstance(value, str):
        return value if value.isascii() else _clean_str(value)
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return _clean_int(value)
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return {clean(k if isinstance(k, str) else str(k)): clean(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return [clean(v, depth + 1) for v in value]
    return value


def new_record(**values: Any) -> dict[str, Any]:
    """A record with every field present, every value :func:`clean`; unknown field
    names are a bug."""
    rec = dict.fromkeys(FIELDS)
    for key, value in values.items():
        if key not in rec:
            raise KeyError(f"unknown audit field {key!r}")
        rec[key] = clean(value)
    return rec


def substitute(record: Mapping[Any, Any], error: BaseException) -> dict[str, Any]:
    """The record written in place of one that cannot be encoded: every field that
    encodes on its own is kept; the decision becomes ``error`` and the reason says
    which fields were dropped and that the call was refused."""
    sub: dict[str, Any] = dict.fromkeys(FIELDS)
    dropped: list[str] = []
    for key, value in record.items():
        if key in ("seq", "prev", "hash"):
            continue
        if key not in sub:
            dropped.append(_clean_str(repr(key))[:64])
            continue
        try:
            orjson.dumps(value)
        except Exception:  # noqa: BLE001 - any failure: the field is dropped
            dropped.append(key)
        else:
            sub[key] = value
    if sub["ts"] is None:
        sub["ts"] = rfc3339(time.time())
    was = sub["decision"] if isinstance(sub["decision"], str) else None
    sub["decision"], sub["status"] = "error", None
    sub["reason"] = (f"the call's audit record could not be encoded "
                     f"({type(error).__name__}); fields dropped: "
                     f"{', '.join(dropped) or 'none'}; the call was refused"
                     + (f" (it had been decided: {was[:32]})" if was else ""))
    return sub


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: the record without its ``hash``, keys sorted
    (copied only when it has one: the writer hashes records before they do)."""
    if "hash" in record:
        record = {k: v for k, v in record.items() if k != "hash"}
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def chain_hash(record: Mapping[str, Any], key: bytes | None = None) -> str:
    data = canonical(record)
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def rotated_files(path: str) -> list[str]:
    """``<path>.1``, ``<path>.2``, … that exist, oldest first."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.([0-9]+)")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name))]
    prefix = os.path.dirname(path)
    return [os.path.join(prefix, name) for _, name in sorted(found)]


def log_files(path: str) -> list[str]:
    """Every file of the log in chain order: the rotated ones, then the current one."""
    files = rotated_files(path)
    if os.path.exists(path):
        files.append(path)
    return files


def load_hmac_key(key_file: str | None) -> bytes | None:
    """The chain key from ``audit.hmac_key_file`` (``None`` without one); empty is an error."""
    if not key_file:
        return None
    with open(key_file, "rb") as f:
        key = f.read().strip()
    if not key:
        raise ValueError(f"{key_file}: the audit HMAC key file is empty")
    return key


def _read_tail(path: str) -> tuple[int, str, bool]:
    """(last seq, last hash, ends with newline) of an existing log, for chain continuity."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0, GENESIS, True
    if size == 0:
        return 0, GENESIS, True
    with open(path, "rb") as f:
        block = 64 * 1024
        pos = max(0, size - block)
        while True:
            f.seek(pos)
            data = f.read(size - pos)
            lines = data.split(b"\n")
            ends_clean = data.endswith(b"\n")
            complete = lines[:-1] if pos == 0 else lines[1:-1]
            for line in reversed(complete):
                try:
                    rec = read_record(line)
                except BadLine:
                    continue  # torn or damaged: the chain goes on from the last record
                return rec["seq"], rec["hash"], ends_clean
            if pos == 0:
                return 0, GENESIS, ends_clean
            pos = max(0, pos - block)


def _chain_tail(path: str) -> tuple[int, str, bool]:
    """Like :func:`_read_tail`, falling back to the newest rotated file when the current
    one holds no complete record yet (the chain goes on across files)."""
    seq, last, clean = _read_tail(path)
    if seq == 0:
        for older in reversed(rotated_files(path)):
            older_seq, older_hash, _ = _read_tail(older)
            if older_seq:
                return older_seq, older_hash, clean
    return seq, last, clean


class AuditLog:
    """Append-only, hash-chained JSON-lines log with an asynchronous, awaited write.

    ``anchor``: where the chain's end is also kept, outside the log's folder (the
    state store's :class:`~proxy.audit._anchor.AuditAnchor`); ``None`` keeps only the head file.
    """

    def __init__(self, path: str, *, hmac_key: bytes | None = None, max_bytes: int = 0,
                 anchor: Anchor | None = None, replica: str | None = None) -> None:
        self.path = path
        self.replica = replica  # the ``replica`` of every record (proxy/audit/_replicas.py)
        self._key = hmac_key
        self.max_bytes = max_bytes
        self._anchor = anchor
        self._anchor_force = False  # the stored anchor is not ours (bad MAC): overwrite it
        self._size = 0
        self._suspect = False  # a failed write may have left part of a batch behind
        self._fd: int | None = None
        self._queue: WorkQueue[tuple[dict[str, Any], asyncio.Future[None]]] = WorkQueue()
        # Records of the current loop iteration, handed to the writer at its end.
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.seq = 0
        self.last_hash = GENESIS
        self.write_errors = 0
        self._ok = True  # the last write went through
        self._busy_since: float | None = None  # monotonic start of the batch being written
        self._inflight: list[tuple[dict[str, Any], asyncio.Future[None]]] | None = None
        self._stall_reported = False
        self._head_failed = False
        self._head_written = False  # by this process: then synced again on close
        self._head_at = 0.0  # monotonic time of the last head write
        self._head_due = False  # records were written since the last head write
        self._ended: threading.Thread | None = None  # the writer thread that last ended

    # -- health -------------------------------------------------------------------
    @property
    def writer_alive(self) -> bool:
        # Asked on every call: the thread says when it ends (``_run``), cheaper than
        # Thread.is_alive (a lock); the watchdog still asks the thread itself.
        return self._thread is None or self._ended is not self._thread or self._queue.closing

    @property
    def stalled(self) -> bool:
        """A batch has been in the writer's hands for over :data:`STALL_SECONDS`."""
        since = self._busy_since
        return since is not None and time.monotonic() - since > STALL_SECONDS

    @property
    def healthy(self) -> bool:
        """Records go in: the last write succeeded, the writer runs and answers."""
        return self._ok and self.writer_alive and not self.stalled

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)
        self._thread = self._spawn()
        self._watchdog = self._loop.create_task(self._watch())

    def _spawn(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="taskgate-audit", daemon=True)
        thread.start()
        return thread

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.seq, self.last_hash, clean = _chain_tail(self.path)
        self._check_head()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if not clean:
            # A torn last line (crash mid-write) stays where it is, on a line of
            # its own, for `audit verify` to report; the chain goes on after it.
            log.error("audit log %s ends in a partial record; continuing on a new line",
                      self.path)
            os.write(self._fd, b"\n")
        self._size = os.fstat(self._fd).st_size

    def _read_anchor(self) -> Head | None:
        """The chain's end as the state store has it; ``None`` without one (or unusable)."""
        if self._anchor is None:
            return None
        try:
            found = self._anchor.read()
        except Exception as e:  # noqa: BLE001 - a store we cannot read anchors nothing
            log.error("the audit chain anchor in %s cannot be read: %s", self._anchor.path, e)
            return None
        if found is None:
            return None
        head, mac = found
        try:
            check_mac(head, mac, self._key, f"the audit chain anchor in {self._anchor.path}")
        except ValueError as e:
            log.error("%s; it is replaced by this log's own", e)
            self._anchor_force = True
            return None
        return head

    def _check_head(self) -> None:
        """Never re-chain silently over records cut from the end: when the log is behind
        its head (or the state store's anchor), go on from there, so the gap stays in
        the chain for verify to name."""
        ends: list[tuple[Head, str]] = []
        try:
            head = read_head(self.path, self._key)
        except (OSError, ValueError) as e:
            log.error("%s; records cut from the end of the audit log cannot be detected "
                      "by the head file", e)
            head = None
        if head is not None:
            ends.append((head, "its chain head"))
        anchor = self._read_anchor()
        if anchor is not None:
            ends.append((anchor, f"its anchor in the state store ({self._anchor_path()})"))
        if head is None and self.seq:
            log.error("audit log %s has no chain head (%s.head): if records were cut "
                      "from its end, only the state store's anchor can show it (fine once, "
                      "for a log written by an older version)", self.path, self.path)
        if not ends:
            return
        end, source = max(ends, key=lambda e: e[0].seq)
        if end.seq > self.seq or (end.seq == self.seq and end.hash != self.last_hash):
            log.error("audit log %s ends at seq %d but %s says seq %d: records were removed "
                      "from its end; the chain goes on from there, so `taskgate audit "
                      "verify` shows the gap", self.path, self.seq, source, end.seq)
            self.seq, self.last_hash = end.seq, end.hash

    def _anchor_path(self) -> str:
        return self._anchor.path if self._anchor is not None else ""

    def _write_head(self, *, sync: bool = False) -> None:
        """Record the chain's end in the head file and the state store's anchor; a
        failure is logged and counted (the records are in the log)."""
        head = Head(self.seq, self.last_hash)
        failed: list[str] = []
        try:
            write_head(self.path, head, self._key, sync=sync)
        except Exception as e:  # noqa: BLE001 - reported below, never fatal
            failed.append(f"{head_path(self.path)}: {e}")
        else:
            self._head_written = True
        if self._anchor is not None:
            try:
                self._anchor.advance(head.seq, head.hash,
                                     head_mac(head, self._key) if self._key else None,
                                     sync=sync, force=self._anchor_force)
                self._anchor_force = False
            except Exception as e:  # noqa: BLE001
                failed.append(f"the anchor in {self._anchor.path}: {e}")
        if failed:
            FAILURES.add("audit-head")
            if not self._head_failed:
                log.error("audit chain end could not be recorded: %s", "; ".join(failed))
            self._head_failed = True
        elif self._head_failed:
            log.info("audit chain end recorded again (seq %d)", head.seq)
            self._head_failed = False

    def _rotate(self) -> None:
        """Rename the full file to the next ``<path>.<n>`` and start a new one."""
        assert self._fd is not None
        rotated = rotated_files(self.path)
        last = int(rotated[-1].rsplit(".", 1)[1]) if rotated else 0
        os.fsync(self._fd)
        os.rename(self.path, f"{self.path}.{last + 1}")
        old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                          0o600)
        os.close(old)
        self._size = 0

    def _recover(self) -> None:
        """After a failed write, resync with what reached the file: records that made it
        stay in the chain, and a cut-off record is left on a line of its own."""
        assert self._fd is not None
        if os.fstat(self._fd).st_size != self._size:
            self.seq, self.last_hash, clean = _chain_tail(self.path)
            if not clean:
                os.write(self._fd, b"\n")
            self._size = os.fstat(self._fd).st_size
        self._suspect = False

    async def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (fills seq, prev, hash); returns once it is in the file.

        Raises :class:`Unavailable` at once when the log is closed, its writer is
        gone or stalled; later when the record could not be written (or encoded).
        """
        if self._loop is None or self._queue.closing:
            raise Unavailable("the audit log is not open; the call was refused")
        if not self.writer_alive or self.stalled:
            raise Unavailable("the audit log is not answering; the call was refused")
        fut = self._loop.create_future()
        if not self._pending:
            self._loop.call_soon(self._hand_over)
        self._pending.append((record, fut))
        await fut

    def _hand_over(self) -> None:
        """The records of one loop iteration go to the writer together: one wake-up of
        its thread per iteration, not one per record (each cost a thread switch)."""
        batch, self._pending = self._pending, []
        if batch:
            self._queue.put_all(batch)

    def _run(self) -> None:
        try:
            consume("audit", self._queue, self._write_batch, self._batch_failed,
                    idle=self._head_if_due)
        finally:  # the thread ends at close only: refuse its waiting calls now
            self._ended = threading.current_thread()
            if not self._queue.closing and self._loop is not None:
                FAILURES.add("audit")
                log.error("the audit writer thread stopped; its waiting calls are refused")
                with contextlib.suppress(RuntimeError):  # the loop is gone already
                    self._loop.call_soon_threadsafe(
                        self._fail_waiting, "the audit log's writer stopped; the call was "
                        "refused")

    def _chain(self, record: dict[str, Any], seq: int, prev: str
               ) -> tuple[bytes, str, BaseException | None]:
        """The line for ``record`` as the ``seq``-th (filled in place), its hash, and the
        error its caller gets when it had to be replaced by :func:`substitute`."""
        for key, value in record.items():  # values replaced in place: the size stays
            kind = type(value)
            if kind in _PLAIN or (kind is str and value.isascii()) or (
                    kind is int and _INT_MIN <= value <= _INT_MAX):
                continue  # what clean() returns as it is, without the call (most fields)
            record[key] = clean(value)
        record["seq"], record["prev"] = seq, prev
        record["replica"] = self.replica
        record.pop("hash", None)
        try:
            digest = record["hash"] = chain_hash(record, self._key)
            return orjson.dumps(record), digest, None
        except Exception as e:  # noqa: BLE001 - a record we cannot encode is replaced
            FAILURES.add("audit")
            log.error("audit record %.80r could not be encoded (%s: %s); a record saying "
                      "so is written in its place and the call is refused",
                      record.get("request_id"), type(e).__name__, e)
            sub = substitute(record, e)
            sub["seq"], sub["prev"] = seq, prev
            digest = sub["hash"] = chain_hash(sub, self._key)
            return orjson.dumps(sub), digest, Unavailable(
                "the call's audit record could not be encoded; the call was refused")

    def _write_batch(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        self._inflight, self._busy_since = batch, time.monotonic()
        try:
            self._write_and_settle(batch)
        except Exception:
            self._inflight = self._busy_since = None
            raise
        # Not in a `finally`: a thread that dies keeps its batch here, for the watchdog.
        self._inflight = self._busy_since = None

    def _write_and_settle(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]
                          ) -> None:
        results: list[BaseException | None]
        try:
            assert self._fd is not None
            if self._suspect:
                self._recover()
            seq, prev = self.seq, self.last_hash
            lines, results = [], []
            for record, _ in batch:
                seq += 1
                line, prev, error = self._chain(record, seq, prev)
                lines.append(line)
                results.append(error)
            data = b"\n".join(lines) + b"\n"
            if self.max_bytes and self._size and self._size + len(data) > self.max_bytes:
                try:
                    self._rotate()
                except OSError as e:  # keep writing the full file rather than refuse calls
                    log.error("audit log rotation failed: %s", e)
            view = memoryview(data)
            self._suspect = True
            while view:
                view = view[os.write(self._fd, view):]
            self._suspect = False
            self._size += len(data)
            self.seq, self.last_hash = seq, prev
            self._ok = True
        except OSError as e:
            results = [_write_failed() for _ in batch]
            self.write_errors += len(batch)
            self._ok = False
            log.error("audit log write failed: %s", e)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._settle, batch, results)
        if self._ok:  # after the callers were released: they wait on the log only
            self._head_due = True
            # Rewriting the head file and the anchor after every batch cost more than
            # the records (profile: bench/README.md): they follow within HEAD_LAG_SECONDS.
            if time.monotonic() - self._head_at >= HEAD_LAG_SECONDS:
                self._record_head()

    def _record_head(self) -> None:
        self._head_at, self._head_due = time.monotonic(), False
        self._write_head()

    def _head_if_due(self) -> float | None:
        """Between batches: record the head once its lag is up; how long until then."""
        if not self._head_due or not self._ok:
            return None
        left = HEAD_LAG_SECONDS - (time.monotonic() - self._head_at)
        if left > 0:
            return left
        self._busy_since = time.monotonic()  # a hanging head write is a stall too
        try:
            self._record_head()
        finally:
            self._busy_since = None
        return None

    def _batch_failed(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]],
                      error: BaseException) -> None:
        """A batch failed other than by a write error (a bug): its calls are refused."""
        self._ok = False
        self.write_errors += len(batch)
        assert self._loop is not None
        failed: list[BaseException | None] = [_write_failed() for _ in batch]
        self._loop.call_soon_threadsafe(self._settle, batch, failed)

    @staticmethod
    def _settle(batch: list[tuple[dict[str, Any], asyncio.Future[None]]],
                results: list[BaseException | None]) -> None:
        for (_, fut), error in zip(batch, results, strict=True):
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    # -- the watchdog (on the event loop) -------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                self.check_writer()
            except Exception:  # noqa: BLE001 - the watchdog outlives its own bugs
                FAILURES.add("audit")
                log.exception("audit watchdog failed")

    def check_writer(self) -> None:
        """Refuse every waiting call when the writer is gone (and start a new one) or a
        write hangs; the watchdog calls this every :data:`WATCH_SECONDS`."""
        if self._queue.closing or self._thread is None:
            return
        if not self._thread.is_alive():  # counted and logged by the thread as it ended
            log.error("the audit writer thread stopped; a new writer is started")
            self._fail_waiting("the audit log's writer stopped; the call was refused")
            self._inflight = self._busy_since = None
            self._thread = self._spawn()
            return
        if self.stalled:
            if not self._stall_reported:
                FAILURES.add("audit")
                log.error("audit log %s: a write has not finished for %.0f s; calls are "
                          "refused until it does", self.path, STALL_SECONDS)
                self._stall_reported = True
            self._fail_waiting("the audit log is not answering; the call was refused")
        elif self._stall_reported:
            log.info("audit log %s answers again", self.path)
            self._stall_reported = False

    def _fail_waiting(self, reason: str) -> None:
        waiting = list(self._inflight or ()) + self._queue.drain() + self._pending
        self._pending = []
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(Unavailable(reason))

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        self._hand_over()
        self._queue.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STALL_SECONDS)
            if self._thread.is_alive():  # a write hangs: leave the file to it
                log.error("audit log %s: the writer did not finish; not closed", self.path)
                self._fail_waiting("the audit log is not answering; the call was refused")
                return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                await asyncio.to_thread(os.fsync, fd)
                if self._head_written:
                    await asyncio.to_thread(self._write_head, sync=True)
            except OSError as e:  # reported; the descriptor is closed all the same
                log.error("audit log %s could not be synced: %s", self.path, e)
            finally:
                os.close(fd)
        if self._anchor is not None:
            await asyncio.to_thread(self._anchor.close)


def _write_failed() -> Unavailable:
    return Unavailable("the audit log could not be written; the call was refused")
