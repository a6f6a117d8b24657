"""Reading one mapping of the config, with the key path in every message."""

from __future__ import annotations

import builtins  # the method Keys.str shadows the type name inside the class
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Keys"]

_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class Keys:
    """Reads one mapping, remembering the path for messages."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where, self.data = where, data

    def fail(self, key: str | None, msg: str) -> ValueError:
        return ValueError(f"{self.where}.{key}: {msg}" if key else f"{self.where}: {msg}")

    def str(self, key: str, default: str | None = None, *, required: bool = False
            ) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise self.fail(key, f"{value!r} is not a non-empty string")
        return str(value)

    def number(self, key: builtins.str, default: float, lo: float, hi: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self.fail(key, f"{value!r} is not a number between {lo:g} and {hi:g}")
        return float(value)

    def flag(self, key: builtins.str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"{value!r} is not true or false")
        return value

    def one_of(self, key: builtins.str, choices: tuple[builtins.str, ...],
               default: builtins.str) -> builtins.str:
        value = self.data.get(key, default)
        if value not in choices:
            raise self.fail(key, f"{value!r}: use one of {', '.join(choices)}")
        return value

    def env_var(self, key: builtins.str, *, required: bool = False) -> builtins.str | None:
        value = self.str(key, required=required)
        if value is not None and not _ENV_VAR.match(value):
            raise self.fail(key, f"{value!r} is not an environment variable name")
        return value

    def file(self, key: builtins.str, *, required: bool = False) -> builtins.str | None:
        value = self.str(key, required=required)
        if value is not None and not os.path.isfile(value):
            raise self.fail(key, f"{value!r} does not exist")
        return value

    def url(self, key: builtins.str, default: builtins.str | None = None) -> builtins.str:
        value = self.str(key, default, required=default is None)
        assert value is not None
        value = value.rstrip("/")
        if value.startswith("http://") and self.flag("unsafe_allow_http"):
            return value
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise self.fail(key, f"{value!r}: providers are called over https only "
                                 "(set unsafe_allow_http: true to allow http)")
        return value
