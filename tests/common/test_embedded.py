"""The embedded PostgreSQL and Redis servers, run for real in a temporary directory."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import redis

from services.common.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis, free_port


def _is_gone(pid: int) -> bool:
    # Orphaned servers linger as zombies until init reaps them; they hold nothing.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _fetch(dsn: str, *statements: str) -> list[Any]:
    """Run the statements in one connection; return the value of the last one."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements[:-1]:
                await conn.execute(statement)
            return list(await conn.fetch(statements[-1]))
        finally:
            await conn.close()

    return asyncio.run(run())


def _postmaster_pid(dsn: str) -> int:
    data_directory = _fetch(dsn, "SHOW data_directory")[0][0]
    return int(Path(data_directory, "postmaster.pid").read_text().split()[0])


def _postgres_processes_under(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.name() == "postgres" and Path(proc.cwd()).is_relative_to(path):
                found.append(proc)
        except psutil.Error:
            continue
    return [proc for proc in found if not _is_gone(proc.pid)]


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A private temp dir outside /tmp/pytest-of-root, which every pytest run resets to 0700
    (so concurrent runs on one machine would cut the postgres user's path)."""
    path = Path(tempfile.mkdtemp(prefix="shopstack-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_postgres(tmp_path: Path) -> Iterator[Callable[..., EmbeddedPostgres]]:
    servers: list[EmbeddedPostgres] = []

    def make(data_dir: Path | None = None, **kwargs: Any) -> EmbeddedPostgres:
        kwargs.setdefault("port", free_port())
        servers.append(EmbeddedPostgres(data_dir or tmp_path / "pg", **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    servers: list[EmbeddedRedis] = []

    def make(**kwargs: Any) -> EmbeddedRedis:
        kwargs.setdefault("port", free_port())
        servers.append(EmbeddedRedis(tmp_path / "redis", **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def test_free_port_prefers_the_given_port_and_avoids_a_busy_one() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert free_port(taken) != taken
    port = free_port()
    assert free_port(port) == port


def test_addresses_need_a_port_before_start(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedError, match="call start"):
        _ = EmbeddedPostgres(tmp_path).dsn
    with pytest.raises(EmbeddedError, match="call start"):
        _ = EmbeddedRedis(tmp_path).url
    assert EmbeddedPostgres(tmp_path, port=1234, database="a b").dsn.endswith(":1234/a%20b")
    assert EmbeddedRedis(tmp_path, port=1234).url == "redis://127.0.0.1:1234/0"


def test_postgres_data_survives_a_restart(
    tmp_path: Path, make_postgres: Callable[..., EmbeddedPostgres]
) -> None:
    # Longer than a unix socket path may be, so the socket goes under /tmp.
    data_dir = tmp_path / ("long-" * 16) / "pg"
    first = make_postgres(data_dir)
    dsn = first.start()
    assert dsn == first.dsn
    assert dsn.startswith("postgresql://postgres@127.0.0.1:")
    assert dsn.endswith("/shopstack")
    rows = _fetch(
        dsn,
        "CREATE TABLE kept (id int PRIMARY KEY, name text)",
        "INSERT INTO kept VALUES (1, 'survives')",
        "SELECT current_database(), current_user",
    )
    assert tuple(rows[0]) == ("shopstack", "postgres")
    pid = _postmaster_pid(dsn)
    if os.geteuid() == 0:
        assert psutil.Process(pid).username() == "shopstack-pg"
    first.stop()
    assert _is_gone(pid)
    assert not _postgres_processes_under(tmp_path)

    second = make_postgres(data_dir)
    rows = _fetch(second.start(), "SELECT id, name FROM kept")
    assert [tuple(row) for row in rows] == [(1, "survives")]


def test_postgres_stop_is_idempotent_and_safe_before_start(
    make_postgres: Callable[..., EmbeddedPostgres],
) -> None:
    server = make_postgres()
    server.stop()
    server.start()
    server.stop()
    server.stop()


def test_postgres_start_replaces_a_server_left_running_on_the_data_dir(
    tmp_path: Path, make_postgres: Callable[..., EmbeddedPostgres]
) -> None:
    leftover = make_postgres()
    old_pid = _postmaster_pid(leftover.start())
    dsn = make_postgres().start()
    assert _is_gone(old_pid)
    assert _fetch(dsn, "SELECT 1")[0][0] == 1
    postmasters = [p for p in _postgres_processes_under(tmp_path) if p.pid == _postmaster_pid(dsn)]
    assert len(postmasters) == 1


def test_postgres_recovers_from_a_crashed_postmaster(
    tmp_path: Path, make_postgres: Callable[..., EmbeddedPostgres]
) -> None:
    crashed = make_postgres()
    dsn = crashed.start()
    _fetch(dsn, "CREATE TABLE kept (id int)", "INSERT INTO kept VALUES (7)", "SELECT 1")
    os.kill(_postmaster_pid(dsn), signal.SIGKILL)  # leaves postmaster.pid and orphans behind

    rows = _fetch(make_postgres().start(), "SELECT id FROM kept")
    assert [row[0] for row in rows] == [7]


def test_postgres_ignores_a_stale_pid_file_naming_a_live_unrelated_process(
    make_postgres: Callable[..., EmbeddedPostgres],
) -> None:
    server = make_postgres()
    dsn = server.start()
    pid_file = Path(_fetch(dsn, "SHOW data_directory")[0][0], "postmaster.pid")
    lines = pid_file.read_text().splitlines()
    server.stop()
    with subprocess.Popen(["sleep", "60"]) as unrelated:
        try:
            # As after a crash and a reboot: the pid now belongs to someone else.
            pid_file.write_text("\n".join([str(unrelated.pid), *lines[1:]]) + "\n")
            assert _fetch(server.start(), "SELECT 1")[0][0] == 1
            server.stop()
            assert unrelated.poll() is None
        finally:
            unrelated.kill()


def test_postgres_start_failure_raises_with_the_log_and_leaves_nothing(
    tmp_path: Path, make_postgres: Callable[..., EmbeddedPostgres]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = make_postgres(port=busy.getsockname()[1])
        with pytest.raises(EmbeddedError, match="could not bind"):
            server.start()
    assert not _postgres_processes_under(tmp_path)
    server.stop()


def test_postgres_runs_as_a_system_user_when_started_by_root(
    tmp_path: Path, make_postgres: Callable[..., EmbeddedPostgres]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root needs a separate account")
    make_postgres().start()
    owner = pwd.getpwnam("shopstack-pg").pw_uid
    assert (tmp_path / "pg").stat().st_uid == owner
    assert {proc.uids().real for proc in _postgres_processes_under(tmp_path)} == {owner}


def test_redis_data_survives_a_restart_through_the_append_only_file(
    make_redis: Callable[..., EmbeddedRedis],
) -> None:
    first = make_redis()
    url = first.start()
    assert url == first.url
    assert url.startswith("redis://127.0.0.1:")
    with redis.Redis.from_url(url) as client:
        # Snapshots off, so only the append-only file can carry the key over.
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.set("kept", "survives")
        pid = client.info("server")["process_id"]
    first.stop()
    assert _is_gone(pid)

    with redis.Redis.from_url(make_redis().start()) as client:
        assert client.get("kept") == b"survives"


def test_redis_stop_is_idempotent_and_safe_before_start(
    make_redis: Callable[..., EmbeddedRedis],
) -> None:
    server = make_redis()
    server.stop()
    server.start()
    server.stop()
    server.stop()


def test_redis_start_replaces_a_leftover_server_on_the_data_dir(
    make_redis: Callable[..., EmbeddedRedis],
) -> None:
    with redis.Redis.from_url(make_redis().start()) as client:
        old_pid = client.info("server")["process_id"]
    with redis.Redis.from_url(make_redis().start()) as client:
        assert client.ping()
    assert _is_gone(old_pid)


def test_redis_start_failure_raises_with_the_log_and_leaves_nothing(
    make_redis: Callable[..., EmbeddedRedis],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = make_redis(port=busy.getsockname()[1])
        with pytest.raises(EmbeddedError, match="Address already in use"):
            server.start(timeout_s=10)
    server.stop()
