"""The tamper-evident audit log: the writer and its head and anchor, one line reader,
verification and queries.
"""

from __future__ import annotations

from proxy.audit._anchor import AuditAnchor
from proxy.audit._log import (
    DECISIONS,
    AuditLog,
    load_hmac_key,
    log_files,
    new_record,
    redact_target,
    rfc3339,
)
from proxy.audit._query import FILTER_KEYS, AuditFilter, Page, follow, query, records
from proxy.audit._reader import BadLine, read_record
from proxy.audit._replicas import (
    Cursor,
    LogsPage,
    Replica,
    anchor_log,
    host_logs,
    log_replica,
    log_tail,
    logs_in,
    merged,
    query_logs,
)
from proxy.audit._verify import AnchorState, Report, read_anchor, verify, verify_files

__all__ = [
    "AnchorState",
    "AuditAnchor",
    "AuditFilter",
    "AuditLog",
    "BadLine",
    "Cursor",
    "DECISIONS",
    "FILTER_KEYS",
    "LogsPage",
    "Page",
    "Replica",
    "Report",
    "anchor_log",
    "follow",
    "host_logs",
    "load_hmac_key",
    "log_files",
    "log_replica",
    "log_tail",
    "logs_in",
    "merged",
    "new_record",
    "query",
    "query_logs",
    "read_anchor",
    "read_record",
    "records",
    "redact_target",
    "rfc3339",
    "verify",
    "verify_files",
]
