"""The audit log: writer, chain head, one line reader, verify, query."""

# -- the one audit-line reader (branch l-cli; merge with the package's other names) --
from proxy.audit._reader import BadLine, Flaw, read_record

__all__ = ["BadLine", "Flaw", "read_record"]
