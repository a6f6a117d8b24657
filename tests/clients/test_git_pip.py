"""git and pip through the gateway, set up from the environment (lower-case
``https_proxy``; ``GIT_SSL_CAINFO``, ``PIP_CERT``): a clone of a repository served over
HTTPS and an install from a local simple index pass, every request recorded. git asks
the proxy without credentials first: those 407s are ``challenge`` records, not denials,
and ``GIT_HTTP_PROXY_AUTHMETHOD=basic`` sends the token at once."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.clients.conftest import World

GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_TERMINAL_PROMPT": "0"}


@pytest.fixture(scope="module")
def served_repo(world: World, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bare repository with one commit, served the "dumb" HTTP way."""
    work = tmp_path_factory.mktemp("repo-work")
    bare = world.upstream.files / "repo.git"

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env={**world.env(), **GIT_ENV})

    git("init", "-q", "-b", "main")
    (work / "README").write_text("through the gateway\n")
    git("add", "README")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    git("clone", "-q", "--bare", str(work), str(bare))
    git("update-server-info", cwd=bare)
    return f"{world.origin}/repo.git"


def _records(world: World, before: int) -> list[dict[str, object]]:
    return world.gw.audit()[before:]


@pytest.mark.parametrize("authmethod", [None, "basic"], ids=["probe-first", "basic"])
def test_git_clone_passes_and_its_probes_are_challenges(
        world: World, served_repo: str, tmp_path: Path, authmethod: str | None) -> None:
    env = {**world.env(), **GIT_ENV}
    if authmethod:
        env["GIT_HTTP_PROXY_AUTHMETHOD"] = authmethod
    before = len(world.gw.audit())
    out = subprocess.run(["git", "clone", "-q", served_repo, str(tmp_path / "c")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / "README").read_text() == "through the gateway\n"
    recs = _records(world, before)
    decisions = {str(r["decision"]) for r in recs}
    assert "deny" not in decisions, recs  # a probe without credentials is no denial
    assert any(r["decision"] == "allow" and str(r["path"]).startswith("/repo.git/")
               for r in recs)
    challenges = [r for r in recs if r["decision"] == "challenge"]
    if authmethod:
        assert not challenges, challenges  # the token went with the first CONNECT
    else:
        assert challenges and all(r["status"] == 407 for r in challenges)


def test_git_refused_path_is_recorded(world: World, tmp_path: Path) -> None:
    before = len(world.gw.audit())
    out = subprocess.run(["git", "clone", "-q", f"{world.origin}/other.git",
                          str(tmp_path / "c")], env={**world.env(), **GIT_ENV,
                                                     "GIT_HTTP_PROXY_AUTHMETHOD": "basic"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "403" in out.stderr, out.stderr
    assert any(r["decision"] == "deny" and str(r["path"]).startswith("/other.git/")
               for r in _records(world, before))


# -- pip ------------------------------------------------------------------------------
def _wheel(dest: Path) -> Path:
    """A one-module wheel, ``tgprobe 1.0``."""
    files = {"tgprobe/__init__.py": b"VIA = 'gateway'\n",
             "tgprobe-1.0.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: tgprobe\nVersion: 1.0\n",
             "tgprobe-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"  # noqa: E501
        for name, data in files.items()) + "tgprobe-1.0.dist-info/RECORD,,\n"
    path = dest / "tgprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("tgprobe-1.0.dist-info/RECORD", record)
    return path


def test_pip_installs_from_an_index_through_the_gateway(world: World, tmp_path: Path) -> None:
    files = world.upstream.files
    (files / "packages").mkdir(exist_ok=True)
    wheel = _wheel(files / "packages")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (files / "simple" / "tgprobe").mkdir(parents=True, exist_ok=True)
    (files / "simple" / "tgprobe" / "index.html").write_text(
        f'<a href="/packages/{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    before = len(world.gw.audit())
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir",
         "--disable-pip-version-check", "--index-url", f"{world.origin}/simple/",
         "--target", str(tmp_path / "t"), "tgprobe"],
        env=world.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t" / "tgprobe" / "__init__.py").exists()
    paths = {str(r["path"]) for r in _records(world, before) if r["decision"] == "allow"}
    assert {"/simple/tgprobe/", f"/packages/{wheel.name}"} <= paths, paths
