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
begins at ``seq`` 1 with ``prev`` :data:`GENESIS`. ``proxy/audit_verify.py``
checks it; ``proxy/audit_query.py`` reads it.

Head (``proxy/audit_head.py``): after every batch the writer records the last
seq and hash in ``<path>.head``, so records cut from the end are detected too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from .audit_head import Head, read_head, write_head
from .batching import WorkQueue
from .errors import Unavailable

__all__ = [
    "FIELDS",
    "GENESIS",
    "AuditLog",
    "chain_hash",
    "load_hmac_key",
    "log_files",
    "new_record",
    "redact_target",
    "rfc3339",
]

log = logging.getLogger(__name__)

FIELDS = (
    "ts", "seq", "request_id", "workload", "task", "owner", "client", "method",
    "scheme", "host", "port", "upstream_ip", "path", "tool", "decision", "rule", "reason",
    "secret", "approval", "status", "bytes_in", "bytes_out", "duration_ms", "prev", "hash",
)
DECISIONS = ("allow", "deny", "error", "approved", "rejected", "held")
GENESIS = "0" * 64
HEAD_LAG_SECONDS = 0.1  # under load, how far the chain head may trail the log
REDACTED = "REDACTED"


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-28T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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


def new_record(**values: Any) -> dict[str, Any]:
    """A record with every field present; unknown field names are a bug."""
    rec = dict.fromkeys(FIELDS)
    for key, value in values.items():
        if key not in rec:
            raise KeyError(f"unknown audit field {key!r}")
        rec[key] = value
    return rec


def canonical(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in record.items() if k != "hash"},
                        option=orjson.OPT_SORT_KEYS)


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
                    rec = orjson.loads(line)
                    return int(rec["seq"]), str(rec["hash"]), ends_clean
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
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
    """Append-only, hash-chained JSON-lines log with an asynchronous, awaited write."""

    def __init__(self, path: str, *, hmac_key: bytes | None = None, max_bytes: int = 0) -> None:
        self.path = path
        self._key = hmac_key
        self.max_bytes = max_bytes
        self._size = 0
        self._suspect = False  # a failed write may have left part of a batch behind
        self._fd: int | None = None
        self._queue: WorkQueue[tuple[dict[str, Any], asyncio.Future[None]]] = WorkQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.seq = 0
        self.last_hash = GENESIS
        self.write_errors = 0
        self.healthy = True
        self._head_failed = False
        self._head_written = False  # by this process: then synced again on close
        self._head_at = 0.0  # monotonic time of the last head write

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._run, name="taskgate-audit", daemon=True)
        self._thread.start()

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

    def _check_head(self) -> None:
        """Never re-chain silently over records cut from the end: when the log is behind
        its head, go on from the head, so the gap stays in the chain for verify to name."""
        try:
            head = read_head(self.path, self._key)
        except ValueError as e:
            log.error("%s; records cut from the end of the audit log cannot be detected",
                      e)
            return
        if head is None:
            if self.seq:
                log.error("audit log %s has no chain head (%s.head): if records were cut "
                          "from its end, that cannot be detected (fine once, for a log "
                          "written by an older version)", self.path, self.path)
            return
        if head.seq > self.seq or (head.seq == self.seq and head.hash != self.last_hash):
            log.error("audit log %s ends at seq %d but its chain head says seq %d: records "
                      "were removed from its end; the chain goes on from the head, so "
                      "`taskgate audit verify` shows the gap", self.path, self.seq, head.seq)
            self.seq, self.last_hash = head.seq, head.hash

    def _write_head(self, *, sync: bool = False) -> None:
        """Record the chain's end; a failure is logged (the records are in the log)."""
        try:
            write_head(self.path, Head(self.seq, self.last_hash), self._key, sync=sync)
        except OSError as e:
            if not self._head_failed:
                log.error("audit chain head %s.head could not be written: %s", self.path, e)
            self._head_failed = True
        else:
            self._head_failed = False
            self._head_written = True

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
        """Append ``record`` (fills seq, prev, hash); returns once it is in the file."""
        if self._loop is None or self._queue.closing:
            raise Unavailable("the audit log is not open; the call was refused")
        fut = self._loop.create_future()
        self._queue.put((record, fut))
        await fut

    def _run(self) -> None:
        while (batch := self._queue.take()) is not None:
            self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            assert self._fd is not None
            if self._suspect:
                self._recover()
            seq, prev = self.seq, self.last_hash
            lines = []
            for record, _ in batch:
                seq += 1
                record["seq"] = seq
                record["prev"] = prev
                record.pop("hash", None)
                prev = record["hash"] = chain_hash(record, self._key)
                lines.append(orjson.dumps(record))
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
            self.healthy = True
        except OSError as e:
            error = e
            self.write_errors += len(batch)
            self.healthy = False
            log.error("audit log write failed: %s", e)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._settle, batch, error)
        if error is None:  # after the callers were released: they wait on the log only
            more = not self._queue.empty()
            now = time.monotonic()
            # Under load the next batch is already waiting: the head follows it, at
            # least every HEAD_LAG_SECONDS (and on close), not after every batch.
            if not more or now - self._head_at >= HEAD_LAG_SECONDS:
                self._head_at = now
                self._write_head()

    @staticmethod
    def _settle(batch: list[tuple[dict[str, Any], asyncio.Future[None]]],
                error: BaseException | None) -> None:
        for _, fut in batch:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(Unavailable("the audit log could not be written; "
                                              "the call was refused"))

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        self._queue.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
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
