"""One reading of ``host[:port]`` (Host headers, URL authorities, CONNECT targets)."""

from __future__ import annotations

__all__ = ["split_hostport"]


def split_hostport(value: str) -> tuple[str, int | None]:
    """A Host header or URL authority as (name, port): port ``None`` when absent, ``-1``
    when it is not a port number (so it never equals one)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if port:
        return host, int(port) if port.isdigit() and len(port) <= 5 else -1
    return host, None
