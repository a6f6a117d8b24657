"""The gateway's services for in-process tests, built as `taskgate run` builds them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from proxy.config import Config
from proxy.gateway import Services, build


@contextlib.asynccontextmanager
async def services(home: Path, **config: Any) -> AsyncIterator[Services]:
    """Every service of a gateway whose home (state, audit log) is ``home``."""
    async with build(Config(home=str(home), audit_path=str(home / "audit.jsonl"),
                            **config)) as built:
        yield built
