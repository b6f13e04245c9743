"""A throwaway PostgreSQL server for the store tests (tests/conftest.py's fixtures).

``PALFAST_TEST_POSTGRES=URL`` uses an existing server instead: a URL of a database
whose user may CREATE DATABASE (each test gets a database of its own, dropped after).
Otherwise, where psycopg 3 and PostgreSQL's ``initdb``/``pg_ctl`` are installed,
:class:`Server` runs one in a temporary folder, reachable only through a Unix socket
in that folder (no TCP port). PostgreSQL refuses to run as root: as root, the server
runs as the ``postgres`` user (the Debian package's) or ``nobody``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse

ENV = "PALFAST_TEST_POSTGRES"
#: Set (to anything but "" or "0") where a missing server must fail the tests instead of
#: skipping them: .ci/run sets it, so CI never passes without having run them.
REQUIRED_ENV = "PALFAST_REQUIRE_POSTGRES"
#: Seconds pg_ctl waits for the server to start or stop.
_PG_CTL_WAIT = 60
_names = itertools.count()


def missing() -> str | None:
    """Why no PostgreSQL test can run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install 'palfast[postgres]')"
    if os.environ.get(ENV):
        return None
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        return f"PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql), and {ENV} names no server"
    if os.geteuid() == 0 and _user() is None:
        return "running as root, and no 'postgres' or 'nobody' user to run the server as"
    return None


def required() -> bool:
    """Whether a missing server fails the tests (REQUIRED_ENV) rather than skips them."""
    return os.environ.get(REQUIRED_ENV, "") not in ("", "0")


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    return None


def _user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class Server:
    """A PostgreSQL server in a new temporary folder (see the module docstring);
    ``url(db)`` names a database on it, ``stop()`` ends it and removes the folder."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="palfast-pg-")
        self._as = {}
        if os.geteuid() == 0:
            user = _user()
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid}
        data = os.path.join(self.folder, "data")
        self._run(_bin("initdb"), "-D", data, "-U", "palfast", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._ctl = [_bin("pg_ctl"), "-D", data, "-t", str(_PG_CTL_WAIT)]
        # The server's output goes to the log file: were it left on pg_ctl's stdout (our
        # pipe), _run would wait for the server to exit.
        self._options = [
            "-l",
            os.path.join(self.folder, "log"),
            "-o",
            f"-c listen_addresses='' -c unix_socket_directories='{self.folder}'",
        ]
        self._run(*self._ctl, "-w", *self._options, "start")
        self.running = True

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=self.folder, timeout=_PG_CTL_WAIT + 30, **self._as
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://palfast@/{db}?host={self.folder}"

    def stop(self) -> None:
        if self.running:
            self._run(*self._ctl, "-w", "-m", "fast", "stop")
            self.running = False

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is ended (its transaction rolled back),
        the server stops and starts again; returns once it accepts connections."""
        self._run(*self._ctl, "-w", "-m", "fast", *self._options, "restart")
        self.running = True

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def admin_url(server: Server | None) -> str:
    """The URL that creates the tests' databases: ``PALFAST_TEST_POSTGRES``, or ``server``'s."""
    return os.environ.get(ENV) or server.url()


def new_database(admin: str) -> tuple[str, callable]:
    """A new empty database on the server of ``admin``: ``(its URL, drop())``."""
    import psycopg

    name = f"palfast_test_{os.getpid()}_{next(_names)}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {name}")
        db.execute(f"CREATE DATABASE {name}")
    url = urllib.parse.urlsplit(admin)._replace(path="/" + name).geturl()

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url, drop
