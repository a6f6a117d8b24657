"""HashiCorp Vault: KV v2 reads and dynamic secrets with leases.

- ``engine: kv2`` reads ``GET /v1/{mount}/data/{path}`` and takes
  ``data.data[field]``; the value is shared by every caller and read again
  after ``default_ttl_seconds``.
- ``engine: dynamic`` reads ``GET /v1/{path}`` (``database/creds/readonly``…)
  and takes ``data[field]`` with the lease: one lease per task, its
  ``lease_duration`` the value's lifetime, revoked with
  ``PUT /v1/sys/leases/revoke`` when the task ends.

Docs: https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2#read-secret-version
https://developer.hashicorp.com/vault/api-docs/secret/databases#generate-credentials
https://developer.hashicorp.com/vault/api-docs/system/leases#revoke-lease
"""

from __future__ import annotations

from collections.abc import Hashable

from proxy.identity import Caller
from proxy.policy import Rule
from proxy.secrets.spec import VaultOptions
from proxy.secrets.value import Minted, SecretValue

from .base import Provider, field_of, request_json

__all__ = ["VaultProvider"]


class VaultProvider(Provider):
    revocable = True
    credential_kind = "vault_lease"

    @property
    def opts(self) -> VaultOptions:
        assert isinstance(self.spec.options, VaultOptions)
        return self.spec.options

    def scope(self, caller: Caller, rule: Rule) -> tuple[str | None, Hashable]:
        if self.opts.engine == "dynamic":  # a lease of its own per workload and task
            return caller.task, caller.workload
        return None, ()

    async def _headers(self) -> dict[str, str]:
        o = self.opts
        headers = {"X-Vault-Token": await self.credential(o.token_env, o.token_file,
                                                          "Vault token")}
        if o.namespace:
            headers["X-Vault-Namespace"] = o.namespace
        return headers

    async def fetch(self, task: str | None, rule: Rule) -> Minted:
        o = self.opts
        if o.engine == "kv2":
            body = await request_json(self, "GET", f"{o.address}/v1/{o.mount}/data/{o.path}",
                                      expect=(200,), headers=await self._headers())
            value = field_of(self, body, "data", "data", o.field)
            if not isinstance(value, str):
                raise self.fail("bad_response", f"field {o.field!r} is not a string")
            return self.minted(value, ttl=self.spec.default_ttl_seconds)
        body = await request_json(self, "GET", f"{o.address}/v1/{o.path}", expect=(200,),
                                  headers=await self._headers())
        value = field_of(self, body, "data", o.field)
        if not isinstance(value, str):
            raise self.fail("bad_response", f"field {o.field!r} is not a string")
        lease_id = body.get("lease_id") or None
        duration = body.get("lease_duration")
        if isinstance(duration, int) and not isinstance(duration, bool) and duration > 0:
            return self.minted(value, ttl=float(duration), reported=True, task=task,
                               revoke=lease_id)
        return self.minted(value, ttl=self.spec.default_ttl_seconds, task=task,
                           revoke=lease_id)

    def handle(self, minted: Minted) -> SecretValue | None:
        lease = minted.revoke
        return SecretValue(lease) if isinstance(lease, str) and lease else None

    def revoke_target(self) -> tuple[str, str]:
        return "PUT", f"{self.opts.address}/v1/sys/leases/revoke"

    async def revoke(self, handle: SecretValue) -> None:
        method, url = self.revoke_target()
        await request_json(self, method, url, expect=(204, 200),
                           headers=await self._headers(), json={"lease_id": handle.reveal()})
