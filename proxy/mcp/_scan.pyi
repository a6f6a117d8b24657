"""Type stub of the compiled scanner (proxy/mcp/_scan.c)."""

from typing import Any

# (key, value start, value end, the value's members or None), in the canonical bytes
Members = list[tuple[str, int, int, Any]]

def canonical(data: bytes, /) -> bytes | None: ...
def read(data: bytes, levels: int, /) -> tuple[bytes, Members | None] | None: ...
