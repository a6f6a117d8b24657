"""Static secrets for development and simple deployments: ``env`` and ``file``.

An environment variable cannot change under a running process, so its value
never expires. A file can be rotated on disk: it is read again (off the event
loop) once ``default_ttl_seconds`` has passed, and if it cannot be read the
value in hand is used until then.
"""

from __future__ import annotations

import os

from proxy.policy import Rule
from proxy.secrets.spec import EnvOptions, FileOptions
from proxy.secrets.value import Minted

from .base import Provider, read_text_file

__all__ = ["EnvProvider", "FileProvider"]


class EnvProvider(Provider):
    async def fetch(self, task: str | None, rule: Rule) -> Minted:
        opts = self.spec.options
        assert isinstance(opts, EnvOptions)
        value = os.environ.get(opts.var, "").strip()
        if not value:
            raise self.fail("misconfigured", f"environment variable {opts.var} is not set")
        return self.minted(value, ttl=None)


class FileProvider(Provider):
    async def fetch(self, task: str | None, rule: Rule) -> Minted:
        opts = self.spec.options
        assert isinstance(opts, FileOptions)
        value = await read_text_file(opts.path,
                                     lambda: self.fail("misconfigured", "the file cannot be read"))
        return self.minted(value, ttl=self.spec.default_ttl_seconds)
