"""The secret providers, by the name ``secrets.<name>.provider`` gives them."""

from __future__ import annotations

from typing import Any

from proxy.secrets.spec import SecretSpec

from .base import Clock, Provider
from .github import GitHubAppProvider
from .oauth2 import OAuth2Provider
from .static import EnvProvider, FileProvider
from .vault import VaultProvider

__all__ = ["PROVIDER_TYPES", "Provider", "make_provider"]

PROVIDER_TYPES: dict[str, type[Provider]] = {
    "env": EnvProvider,
    "file": FileProvider,
    "oauth2_client_credentials": OAuth2Provider,
    "github_app": GitHubAppProvider,
    "vault": VaultProvider,
}


def make_provider(spec: SecretSpec, session: Any, clock: Clock) -> Provider:
    return PROVIDER_TYPES[spec.provider](spec, session, clock)
