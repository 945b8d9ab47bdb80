"""A throwaway PostgreSQL server for the tests that run several workers on one study
(tests/test_workers.py, tests/test_outage.py): initdb in a temporary folder, run by a non-root
user (the server refuses root), on a free loopback port. Without Debian's server binaries or the
psycopg driver the test is skipped, unless TARFLOW_TUNER_REQUIRE_POSTGRES=1 (CI) makes that a
failure."""

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class Server:
    """A throwaway PostgreSQL server that a test may stop and start again on the same port."""

    def __init__(self, bindir: Path, root: Path, user: str | None):
        self.bindir, self.root, self.data, self.port = bindir, root, root / "data", free_port()
        self.as_user = ["runuser", "-u", user, "--"] if user else []
        subprocess.run([*self.as_user, str(bindir / "initdb"), "-D", str(self.data), "-U", "tuner", "--auth=trust"],
                       check=True, capture_output=True)
        self.start()

    def pg_ctl(self, *args):
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self):
        self.pg_ctl("-l", str(self.root / "log"), "-w", "start",
                    "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1")

    def stop(self, mode="fast"):
        self.pg_ctl("-m", mode, "-w", "stop")

    def url(self, password="") -> str:
        return f"postgresql://tuner{':' + password if password else ''}@127.0.0.1:{self.port}/postgres"


@contextlib.contextmanager
def throwaway_server():
    """A running Server, stopped and deleted afterwards (or the test skipped/failed, see above)."""
    bindir = _pg_bin()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        bindir = None
    if bindir is None:
        if os.environ.get("TARFLOW_TUNER_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries or the psycopg driver are missing")
        pytest.skip("needs Debian's postgresql package and `pip install -e .[postgres]`")
    root = Path(tempfile.mkdtemp(prefix="tt-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres" if _has_user("postgres") else "nobody"
        shutil.chown(root, user)
    srv = Server(bindir, root, user)
    try:
        yield srv
    finally:
        subprocess.run([*srv.as_user, str(bindir / "pg_ctl"), "-D", str(srv.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
