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
from proxy.audit._replicas import Replica, anchor_log, host_logs, log_replica, logs_in, merged
from proxy.audit._verify import AnchorState, Report, read_anchor, verify, verify_files

__all__ = [
    "AnchorState",
    "AuditAnchor",
    "AuditFilter",
    "AuditLog",
    "BadLine",
    "DECISIONS",
    "FILTER_KEYS",
    "Page",
    "Replica",
    "Report",
    "anchor_log",
    "follow",
    "host_logs",
    "load_hmac_key",
    "log_files",
    "log_replica",
    "logs_in",
    "merged",
    "new_record",
    "query",
    "read_anchor",
    "read_record",
    "records",
    "redact_target",
    "rfc3339",
    "verify",
    "verify_files",
]
