"""A throwaway PostgreSQL cluster for tests: ``pg_url`` gives each test a fresh database URL.

The cluster is started once per test session (initdb into a temporary directory, a free port on
127.0.0.1, the unix socket in that directory) and stopped when the session ends. Postgres refuses
to run as root, so as root the server runs as the ``postgres`` system user (``nobody`` if absent).
Without server binaries (``/usr/lib/postgresql/*/bin``, or ``GUARD_TEST_PG_BINDIR``) or psycopg,
tests that need it are skipped, or fail when ``GUARD_TEST_REQUIRE_POSTGRES=1`` (CI).

Use: take ``pg_url`` (a factory) as a test's argument; tests/conftest.py imports it for every module.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


class PostgresCluster:
    """One running postgres server; :meth:`new_database` hands out empty databases."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(
            tempfile.mkdtemp(prefix="guard-pg-")
        )  # under /tmp: reachable by the server user
        self.run_as = _server_user()
        if self.run_as is not None:
            os.chown(self.dir, self.run_as.pw_uid, self.run_as.pw_gid)
        self.port = 0
        self._names = itertools.count()

    def start(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.dir / "data"),
            "-U",
            "guard",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        for _ in range(3):  # the free port may be taken between finding and binding it
            self.port = _free_port()
            opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            done = self._run(
                "pg_ctl",
                "-D",
                str(self.dir / "data"),
                "-l",
                str(self.dir / "server.log"),
                "-w",
                "-o",
                opts,
                "start",
                check=False,
            )
            if done.returncode == 0:
                return
        raise RuntimeError(f"postgres did not start: {done.stderr}\n{self.log()}")

    def stop(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop", check=False
        )
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://guard@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new empty database."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="guard", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kw = {}
        if self.run_as is not None:
            kw = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(self.bindir / tool), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LC_ALL": "C.UTF-8",
                "HOME": str(self.dir),
            },
            **kw,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done


def find_bindir() -> Path | None:
    """The newest PostgreSQL server bin directory on this machine, or ``None``."""
    if os.environ.get("GUARD_TEST_PG_BINDIR"):
        return Path(os.environ["GUARD_TEST_PG_BINDIR"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    return Path(found[-1]).parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        "running as root and neither a postgres nor a nobody user exists to run postgres"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_cluster: PostgresCluster | None = None


def _unavailable(reason: str):
    if os.environ.get("GUARD_TEST_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"GUARD_TEST_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _shared_cluster(config: pytest.Config) -> PostgresCluster:
    """The session's cluster, started on first use (one per process, whichever module asks)."""
    global _cluster  # noqa: PLW0603 - one cluster per test process, started on first use
    if _cluster is None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _unavailable("psycopg is not installed (pip install -e '.[test]')")
        bindir = find_bindir()
        if bindir is None or not (bindir / "initdb").exists():
            _unavailable(
                "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin; apt-get install postgresql)"
            )
        cluster = PostgresCluster(bindir)
        try:
            cluster.start()
        except Exception:
            cluster.stop()
            raise
        config.add_cleanup(cluster.stop)
        _cluster = cluster
    return _cluster


@pytest.fixture
def pg_url(request: pytest.FixtureRequest):
    """A factory: each call returns the URL of a new empty database on the session's cluster."""
    cluster = _shared_cluster(request.config)
    return cluster.new_database
