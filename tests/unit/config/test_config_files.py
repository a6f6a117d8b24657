"""Issue 10 item 14: a config that passes ``check-config`` also starts.

Every file the config names is loaded the way the gateway loads it (JWKS, CA bundle,
audit HMAC key, secret provider files), and a value of the wrong type is refused
(1.5, "10" or true for a whole number, negatives, fractions). ``check-config`` and
``run`` both exit 2 with the same one-line message naming file, line, key and fix;
never a traceback. One fixture per failure; each runs the real CLI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support import PYTHON, Keys, python_env

MARK = "#here"


def pem_private(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    ca = trustme.CA()
    rsa_key = rsa.generate_private_key(65537, 2048)
    contents: dict[str, bytes] = {
        "jwks": json.dumps(keys.jwks()).encode(),
        "ca": ca.cert_pem.bytes(),
        "hmac": b"0123456789abcdef0123456789abcdef\n",
        "secret": b"s3cret-value\n",
        "rsa": pem_private(rsa_key),
        "ec": pem_private(ec.generate_private_key(ec.SECP256R1())),
        "rsa_public": rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "empty": b"",
        "blank": b" \n\t\n",
        "garbage": b"\x00\xff\xfe not text at all \x80",
        "text": b"hello, this is not what you think\n",
        "json_list": b"[1, 2, 3]",
        "keys_not_list": b'{"keys": "rsa1"}',
        "no_keys": b'{"kty": "RSA", "n": "abc", "e": "AQAB"}',
        "hmac_only_jwks": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "use": "sig"}]}',
        "broken_jwk": b'{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB", "use": "sig"}]}',
        "enc_only_jwks": json.dumps({"keys": [dict(keys.jwks()["keys"][0], use="enc")]}
                                    ).encode(),
    }
    out = {}
    for name, data in contents.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    (d / "a_dir").mkdir()
    out["a_dir"] = d / "a_dir"
    out["missing"] = d / "missing"
    return out


def config_text(files: dict[str, Path], **over: str) -> str:
    """A full config; ``over`` replaces one line's value (and marks that line)."""
    lines = {
        "jwks": f'      jwks_file: "{files["jwks"]}"',
        "ca": f'  ca_file: "{files["ca"]}"',
        "hmac": f'  hmac_key_file: "{files["hmac"]}"',
        "max_bytes": "  max_bytes: 1048576",
        "version": "version: 1",
        "max_connections": "  max_connections: 100",
        "idle": "  idle_timeout_seconds: 600",
        "header_bytes": "  max_header_bytes: 65536",
        "header_timeout": "  header_timeout_seconds: 30",
        "grace": "  shutdown_grace_seconds: 10",
        "stream": "  stream_threshold_bytes: 1048576",
        "control_max": "  max_connections: 64",
        "control_head": "  header_timeout_seconds: 10",
        "control_idle": "  idle_timeout_seconds: 60",
        "mcp_body": "  max_body_bytes: 1048576",
        "leeway": "  leeway_seconds: 30",
        "file_secret": f'    path: "{files["secret"]}"',
        "oauth_secret": f'    client_secret_file: "{files["secret"]}"',
        "github_key": f'    private_key_file: "{files["rsa"]}"',
        "vault_token": f'    token_file: "{files["secret"]}"',
    }
    for key, value in over.items():
        indent = lines[key][: len(lines[key]) - len(lines[key].lstrip())]
        name = lines[key].strip().split(":")[0]
        lines[key] = f"{indent}{name}: {value}  {MARK}"
    L = lines  # noqa: N806
    return f"""{L["version"]}
upstream:
{L["ca"]}
audit:
{L["hmac"]}
{L["max_bytes"]}
identity:
{L["leeway"]}
  issuers:
    - issuer: "https://issuer.test"
      audience: taskgate
{L["jwks"]}
proxy:
{L["max_connections"]}
{L["idle"]}
{L["header_bytes"]}
{L["header_timeout"]}
{L["grace"]}
{L["stream"]}
control:
{L["control_max"]}
{L["control_head"]}
{L["control_idle"]}
mcp:
{L["mcp_body"]}
secrets:
  plain:
    provider: file
{L["file_secret"]}
    inject: {{header: Authorization, value: "Bearer {{token}}"}}
  oauth:
    provider: oauth2_client_credentials
    token_url: https://auth.example/token
    client_id: gateway
{L["oauth_secret"]}
    inject: {{header: Authorization, value: "Bearer {{token}}"}}
  gh:
    provider: github_app
    app_id: "1"
    installation_id: "2"
{L["github_key"]}
    inject: {{header: Authorization, value: "Bearer {{token}}"}}
  vault:
    provider: vault
    address: https://vault.example
    path: apps/gateway
    field: token
{L["vault_token"]}
    inject: {{header: Authorization, value: "Bearer {{token}}"}}
"""


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYTHON, "-m", "proxy", *args], cwd=tmp_path, env=python_env(),
                          capture_output=True, text=True, timeout=60)


def test_the_full_config_with_every_file_kind_checks(tmp_path: Path,
                                                     files: dict[str, Path]) -> None:
    path = tmp_path / "taskgate.yaml"
    path.write_text(config_text(files))
    out = cli(tmp_path, "check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def f(name: str) -> str:
    """The path of the fixture file ``name``, quoted for YAML."""
    return '"{' + name + '}"'


CASES = [
    # (override key, value (file names in braces), key path in the message, words of it)
    ("jwks", f("text"), "identity.issuers[0].jwks_file", "is not JSON"),
    ("jwks", f("garbage"), "identity.issuers[0].jwks_file", "is not JSON"),
    ("jwks", f("empty"), "identity.issuers[0].jwks_file", "is not JSON"),
    ("jwks", f("json_list"), "identity.issuers[0].jwks_file", "is not a JWKS"),
    ("jwks", f("keys_not_list"), "identity.issuers[0].jwks_file", "is not a JWKS"),
    ("jwks", f("no_keys"), "identity.issuers[0].jwks_file", "is not a JWKS"),
    ("jwks", f("hmac_only_jwks"), "identity.issuers[0].jwks_file", "no signing key"),
    ("jwks", f("broken_jwk"), "identity.issuers[0].jwks_file", "no signing key"),
    ("jwks", f("enc_only_jwks"), "identity.issuers[0].jwks_file", "no signing key"),
    ("jwks", f("ca"), "identity.issuers[0].jwks_file", "is not JSON"),
    ("jwks", f("a_dir"), "identity.issuers[0].jwks_file", "is a directory"),
    ("jwks", f("missing"), "identity.issuers[0].jwks_file", "does not exist"),
    ("ca", f("text"), "upstream.ca_file", "no PEM certificate"),
    ("ca", f("empty"), "upstream.ca_file", "no PEM certificate"),
    ("ca", f("jwks"), "upstream.ca_file", "no PEM certificate"),
    ("ca", f("rsa"), "upstream.ca_file", "no PEM certificate"),
    ("ca", f("a_dir"), "upstream.ca_file", "is a directory"),
    ("ca", f("missing"), "upstream.ca_file", "does not exist"),
    ("hmac", f("empty"), "audit.hmac_key_file", "is empty"),
    ("hmac", f("blank"), "audit.hmac_key_file", "is empty"),
    ("hmac", f("a_dir"), "audit.hmac_key_file", "is a directory"),
    ("hmac", f("missing"), "audit.hmac_key_file", "does not exist"),
    ("file_secret", f("empty"), 'secrets.plain.path', "is empty"),
    ("file_secret", f("garbage"), 'secrets.plain.path', "is not UTF-8"),
    ("file_secret", f("a_dir"), 'secrets.plain.path', "does not exist"),  # not a file
    ("oauth_secret", f("blank"), "secrets.oauth.client_secret_file", "is empty"),
    ("github_key", f("text"), "secrets.gh.private_key_file", "not a PEM private key"),
    ("github_key", f("rsa_public"), "secrets.gh.private_key_file", "not a PEM private key"),
    ("github_key", f("ec"), "secrets.gh.private_key_file", "not an RSA private key"),
    ("github_key", f("empty"), "secrets.gh.private_key_file", "is empty"),
    ("vault_token", f("empty"), "secrets.vault.token_file", "is empty"),
    ("vault_token", f("a_dir"), "secrets.vault.token_file", "does not exist"),
    # wrong types
    ("max_connections", "1.5", "proxy.max_connections", "1.5 is not a whole number"),
    ("max_connections", "2.0", "proxy.max_connections", "2.0 is not a whole number"),
    ("max_connections", '"10"', "proxy.max_connections", "without quotes: 10"),
    ("max_connections", "true", "proxy.max_connections", "True is not a number"),
    ("max_connections", "-1", "proxy.max_connections", "-1 is not a number between 1"),
    ("max_connections", "0", "proxy.max_connections", "0 is not a number between 1"),
    ("idle", "1e3", "proxy.idle_timeout_seconds", "is not a whole number"),
    ("idle", "null", "proxy.idle_timeout_seconds", "None is not a number"),
    ("header_bytes", "10", "proxy.max_header_bytes", "10 is not a number between 1024"),
    ("header_bytes", "65536.5", "proxy.max_header_bytes", "not a whole number"),
    ("header_timeout", '"30"', "proxy.header_timeout_seconds", "without quotes: 30"),
    ("header_timeout", "0", "proxy.header_timeout_seconds", "0 is not a number between 1"),
    ("stream", "1.5", "proxy.stream_threshold_bytes", "not a whole number"),
    ("stream", "-5", "proxy.stream_threshold_bytes", "-5 is not a number"),
    ("grace", "-1", "proxy.shutdown_grace_seconds", "-1 is not a number between 0"),
    ("grace", '"10"', "proxy.shutdown_grace_seconds", "'10' is not a number"),
    ("grace", "false", "proxy.shutdown_grace_seconds", "False is not a number"),
    ("control_max", "1.5", "control.max_connections", "1.5 is not a whole number"),
    ("control_max", "yes", "control.max_connections", "'yes' is not a number"),
    ("control_head", "-3", "control.header_timeout_seconds", "-3 is not a number"),
    ("control_idle", "[60]", "control.idle_timeout_seconds", "is not a number"),
    ("mcp_body", "1048576.0", "mcp.max_body_bytes", "not a whole number"),
    ("max_bytes", "1.5", "audit.max_bytes", "1.5 is not a whole number"),
    ("max_bytes", "false", "audit.max_bytes", "False is not a number"),
    ("max_bytes", '"0"', "audit.max_bytes", "without quotes: 0"),
    ("leeway", '"30"', "identity.leeway_seconds", "'30' is not a number"),
    ("leeway", "-1", "identity.leeway_seconds", "-1 is not a number"),
    ("version", "true", "version", "unsupported config version True"),
    ("version", "1.0", "version", "unsupported config version 1.0"),
    ("version", '"1"', "version", "unsupported config version '1'"),
]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("key,value,where,words", CASES,
                         ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_bad_config_is_refused_by_check_and_run(tmp_path: Path, files: dict[str, Path],
                                                command: str, key: str, value: str,
                                                where: str, words: str) -> None:
    value = value.format(**{k: str(v) for k, v in files.items()})
    text = config_text(files, **{key: value})
    path = tmp_path / "taskgate.yaml"
    path.write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if MARK in ln)
    args = ["check-config", str(path)] if command == "check-config" else ["run", "-c", str(path)]
    out = cli(tmp_path, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"taskgate: {path}:{line}: {where}: "), out.stderr
    assert words in out.stderr
    assert "s3cret-value" not in out.stderr  # a secret file's content is never shown
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".taskgate").exists() or command == "run"
