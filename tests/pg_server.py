"""A throwaway PostgreSQL server for tests (the durable job store's PostgreSQL backend runs against a real one).

Not a test file: tests import the session fixture from here (tests/ is on sys.path, like tiny_models)::

    from pg_server import postgres_url  # noqa: F401  (a fixture: pytest finds it in the test module)

    def test_store(postgres_url):  # noqa: F811  (ruff sees the parameter as redefining the import)
        with psycopg.connect(postgres_url) as conn: ...

`running_postgres(tmp_dir)` initdb's a cluster in tmp_dir (trust auth, a unix socket directory inside it and
127.0.0.1 on a free port), creates the database "cxr", yields a libpq URL
("postgresql://postgres@127.0.0.1:PORT/cxr") and stops (pg_ctl stop -m immediate) and removes the cluster on
exit. fsync stays on: the tests check durability. PostgreSQL refuses to run as root, so under root every server
command runs as the `postgres` system user (Debian's package creates it; CXR_EDGE_PG_USER names another one) and
the cluster directory is handed to that user; a non-root user runs the server itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

READY_TIMEOUT_S = 30.0
_TOOLS = ("initdb", "pg_ctl", "postgres")
#: a unix socket path is at most 107 bytes (sun_path); its file name is ".s.PGSQL.<port>"
_MAX_SOCKET_DIR = 80


def postgres_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: the one `initdb` on PATH resolves to (Debian puts none on
    PATH; a symlink there is followed to its real folder), else the newest /usr/lib/postgresql/*/bin; None if
    PostgreSQL's server is not installed."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
        candidates.append(Path(found).parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in _TOOLS):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Runner:
    """Runs PostgreSQL's commands as the user the server may run as (never root)."""

    def __init__(self) -> None:
        self.kwargs: dict = {}
        self.uid = self.gid = -1
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGHOST/PGDATA/... of the caller
        env.update(LC_ALL="C", LANG="C")
        if os.geteuid() == 0:
            name = os.environ.get("CXR_EDGE_PG_USER", "postgres")
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                raise RuntimeError(
                    f"running as root, and PostgreSQL refuses to run as root, but there is no {name!r} user to run it "
                    "as: install Debian's postgresql package (it creates one), `useradd -r postgres`, or set "
                    "CXR_EDGE_PG_USER to an existing unprivileged user"
                ) from None
            if pw.pw_uid == 0:
                raise RuntimeError(f"CXR_EDGE_PG_USER={name!r} is root; PostgreSQL refuses to run as root")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
            self.kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.env = env

    @property
    def switches_user(self) -> bool:
        return self.uid >= 0

    def own(self, path: Path) -> None:
        if self.switches_user:
            os.chown(path, self.uid, self.gid)

    def can_use(self, path: Path) -> bool:
        """Whether the server's user can reach and write `path` (a root-only 0700 parent, such as pytest's
        /tmp/pytest-of-root, blocks it)."""
        if not self.switches_user:
            return os.access(path, os.W_OK | os.X_OK)
        probe = subprocess.run(["test", "-w", str(path), "-a", "-x", str(path)], cwd="/", **self._common(), check=False)
        return probe.returncode == 0

    def _common(self) -> dict:
        return {"env": self.env, "stdin": subprocess.DEVNULL, **self.kwargs}

    def run(self, cmd: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, **self._common())


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no server log at {log}: {e})"
    return "\n".join(text[-lines:]) or f"(server log {log} is empty)"


def _checked(proc: subprocess.CompletedProcess[str], what: str, log: Path | None = None) -> None:
    if proc.returncode != 0:
        msg = f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}".rstrip()
        if log is not None:
            msg += f"\n--- server log tail ({log}) ---\n{_log_tail(log)}"
        raise RuntimeError(msg)


def _wait_ready(bindir: Path, runner: _Runner, port: int, log: Path, cwd: Path) -> None:
    isready = bindir / "pg_isready"
    if not isready.exists() and shutil.which("pg_isready"):
        isready = Path(shutil.which("pg_isready") or "pg_isready")
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if isready.exists():
            proc = runner.run(
                [str(isready), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-t", "2"],
                cwd,
                timeout=10,
            )
            if proc.returncode == 0:
                return
            last = f"pg_isready exit {proc.returncode}"
        else:  # no pg_isready: a TCP connection that the server accepts is readiness enough for createdb to retry on
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return
            except OSError as e:
                last = str(e)
        time.sleep(0.2)
    raise RuntimeError(
        f"PostgreSQL on 127.0.0.1:{port} was not ready within {READY_TIMEOUT_S:.0f} s ({last})\n"
        f"--- server log tail ({log}) ---\n{_log_tail(log)}"
    )


def _stop(bindir: Path, runner: _Runner, data: Path, cwd: Path) -> None:
    if not (data / "postmaster.pid").exists():
        return
    try:
        proc = runner.run([str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "30"], cwd, timeout=60)
        if proc.returncode == 0:
            return
    except subprocess.TimeoutExpired:
        pass
    # pg_ctl could not stop it: kill the postmaster (its children exit when it goes)
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 9)


@contextmanager
def running_postgres(tmp_dir: Path, *, port: int | None = None) -> Iterator[str]:
    """Start a throwaway PostgreSQL cluster in tmp_dir and yield a libpq URL to its database "cxr"
    (``postgresql://postgres@127.0.0.1:PORT/cxr``, trust auth; its unix socket directory is ``<cluster>/sock``).
    The server is stopped (pg_ctl stop -m immediate) and the cluster removed on exit, also when the body raises.
    `port`: a fixed TCP port; by default a free one (retried with another if it was taken meanwhile).
    Where the server's user cannot reach tmp_dir (under root: a 0700 parent such as /tmp/pytest-of-root) or the
    socket path would be too long, the cluster goes to a fresh /tmp/cxr-pg-* folder instead, removed all the same."""
    bindir = postgres_binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed here (apt-get install postgresql)")
    runner = _Runner()
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_dir))
    runner.own(base)
    if not runner.can_use(base) or len(str(base / "sock")) > _MAX_SOCKET_DIR:
        # the server's user cannot reach tmp_dir (e.g. root's 0700 pytest folder), or the socket path would be too
        # long: use a short folder in the system temporary directory instead
        shutil.rmtree(base, ignore_errors=True)
        base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
        runner.own(base)
    data, sock, log = base / "data", base / "sock", base / "server.log"
    started = False
    try:
        sock.mkdir()
        runner.own(sock)
        proc = runner.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"], base
        )
        _checked(proc, "initdb")
        conf = data / "postgresql.conf"
        for attempt in range(3):
            use_port = port if port is not None else _free_port()
            with conf.open("a") as f:  # later lines win: a retry appends a new port
                f.write(
                    "\n# cxr-edge tests (tests/pg_server.py)\n"
                    f"listen_addresses = '127.0.0.1'\nport = {use_port}\nunix_socket_directories = '{sock}'\n"
                    "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                    "shared_buffers = 16MB\nmax_connections = 50\n"
                    "logging_collector = off\nlog_min_messages = warning\n"
                )
            proc = runner.run(
                [str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", str(int(READY_TIMEOUT_S))],
                base,
                timeout=READY_TIMEOUT_S + 30,
            )
            started = True  # possibly half-started: the finally block stops whatever postmaster.pid names
            if proc.returncode == 0:
                break
            taken = "could not bind" in _log_tail(log, 50) or "already in use" in _log_tail(log, 50)
            if port is None and taken and attempt < 2:
                _stop(bindir, runner, data, base)
                continue
            _checked(proc, f"pg_ctl start (port {use_port})", log)
        _wait_ready(bindir, runner, use_port, log, base)
        createdb = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(use_port), "-U", "postgres", "cxr"]
        if not (bindir / "createdb").exists():
            psql = bindir / "psql" if (bindir / "psql").exists() else Path(shutil.which("psql") or "psql")
            createdb = [
                str(psql),
                "-h",
                "127.0.0.1",
                "-p",
                str(use_port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "CREATE DATABASE cxr",
            ]
        _checked(runner.run(createdb, base, timeout=60), "creating database cxr", log)
        yield f"postgresql://postgres@127.0.0.1:{use_port}/cxr"
    finally:
        if started:
            _stop(bindir, runner, data, base)
        shutil.rmtree(base, ignore_errors=True)


#: the session's one server, shared by every test module that imports the fixture: pytest makes a fixture of its
#: own for each module it is imported into, so without this each module would start a server of its own
_shared: dict = {"url": None, "users": 0, "stack": None, "error": None}


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    """A libpq URL to the database "cxr" on a PostgreSQL server of this test session's own (one for the whole
    session, whichever modules import this). Skips where PostgreSQL is not installed, except in CI (CI=true), where
    that is a failure: CI must run the fleet tests."""
    if postgres_binaries() is None:
        msg = "PostgreSQL is not installed here (apt-get install postgresql)"
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"{msg}; CI=true, so the PostgreSQL tests may not skip", pytrace=False)
        pytest.skip(msg)
    if _shared["error"] is not None:  # it failed to start once: fail fast, do not wait out the timeout again
        raise RuntimeError(f"the session's PostgreSQL server failed to start: {_shared['error']}")
    if _shared["url"] is None:
        stack = contextlib.ExitStack()
        try:
            _shared["url"] = stack.enter_context(running_postgres(tmp_path_factory.mktemp("postgres")))
        except Exception as e:
            _shared["error"] = e
            raise
        _shared["stack"] = stack
    _shared["users"] += 1
    try:
        yield _shared["url"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            stack, _shared["stack"], _shared["url"] = _shared["stack"], None, None
            stack.close()
