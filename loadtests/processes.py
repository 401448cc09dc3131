"""Find the processes behind a running stack (by listening port), and pin them to CPUs.

A service is the process listening on its port plus its whole process tree
(granian's main process and workers). Postgres is the postmaster on the
database port, its auxiliary processes and the backends of *our* database only
(the server may be shared); Redis is the process on the Redis port.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

from services.common.settings import DEFAULT_PORTS

SERVICE_OFFSETS = {name: port - DEFAULT_PORTS["gateway"] for name, port in DEFAULT_PORTS.items()}
PG_AUX = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "stats collector",
    "archiver",
    "startup",
    "walsender",
)


@dataclass
class ProcessGroup:
    """A named set of processes sampled together (a service, Postgres, Redis, the generator)."""

    name: str
    root_pids: list[int]
    children: bool = True
    database: str | None = None  # postgres only: keep backends of this database
    port: int | None = None
    notes: list[str] = field(default_factory=list)
    proportional: bool = False  # memory as PSS (shared pages split), not RSS

    def members(self) -> list[psutil.Process]:
        """The live processes of the group now (children re-read every call)."""
        out: dict[int, psutil.Process] = {}
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                out[pid] = root
                if self.children:
                    for child in root.children(recursive=True):
                        if self.database is None or _is_ours(child, self.database):
                            out[child.pid] = child
            except psutil.Error:
                continue
        return list(out.values())

    def worker_count(self) -> int:
        """Worker processes under the root (granian forks one per worker)."""
        count = 0
        for pid in self.root_pids:
            with contextlib.suppress(psutil.Error):
                count += len(psutil.Process(pid).children(recursive=False))
        return count


def _is_ours(proc: psutil.Process, database: str) -> bool:
    """Postgres children: auxiliary processes, and backends of `database`."""
    try:
        title = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    title = title.removeprefix("postgres: ")
    parts = title.split(": ", 1)  # "15/main: postgres mydb 127.0.0.1(5000) idle"
    if len(parts) == 2 and "/" in parts[0]:
        title = parts[1]
    if title.startswith(PG_AUX):
        return True
    words = title.split()
    return len(words) >= 2 and words[1] == database


def listeners(ports: Iterable[int]) -> dict[int, list[int]]:
    """Port -> pids listening on it (TCP)."""
    wanted = set(ports)
    found: dict[int, list[int]] = {port: [] for port in wanted}
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return found
    for conn in conns:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.pid is None:
            continue
        port = int(conn.laddr[1])
        if port in wanted and conn.pid not in found[port]:
            found[port].append(conn.pid)
    return found


def _topmost(pids: list[int]) -> list[int]:
    """Of processes sharing a socket (granian main + workers), the ones whose parent is not."""
    tops = []
    for pid in pids:
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            continue
        if parent not in pids:
            tops.append(pid)
    return tops


def _is_server_process(proc: psutil.Process) -> bool:
    """A `shopstack serve <svc>` / granian process (not the `shopstack up` launcher)."""
    try:
        args = proc.cmdline()
    except psutil.Error:
        return False
    joined = " ".join(args)
    return "granian" in joined or (
        "serve" in args and ("services.cli" in joined or "shopstack" in joined)
    )


def service_root(pid: int) -> int:
    """Climb from a listening worker to the service's main process (granian's parent)."""
    try:
        proc = psutil.Process(pid)
        while True:
            parent = proc.parent()
            if parent is None or not _is_server_process(parent):
                return proc.pid
            proc = parent
    except psutil.Error:
        return pid


def service_ports(gateway_port: int) -> dict[str, int]:
    """Each service's port when the stack was started with --base-port `gateway_port`."""
    return {name: gateway_port + offset for name, offset in SERVICE_OFFSETS.items()}


def discover(
    gateway_port: int, database_url: str | None, redis_url: str | None
) -> dict[str, ProcessGroup]:
    """Process groups of the stack behind `gateway_port`, Postgres and Redis (those found)."""
    ports = service_ports(gateway_port)
    pg = urlsplit(database_url) if database_url else None
    rd = urlsplit(redis_url) if redis_url else None
    pg_port = (pg.port or 5432) if pg else None
    rd_port = (rd.port or 6379) if rd else None
    wanted = list(ports.values()) + [p for p in (pg_port, rd_port) if p]
    found = listeners(wanted)
    groups: dict[str, ProcessGroup] = {}
    for name, port in ports.items():
        pids = sorted({service_root(pid) for pid in _topmost(found.get(port, []))})
        if pids:
            groups[name] = ProcessGroup(name, pids, port=port)
    if pg is not None and pg_port is not None:
        pids = _topmost(found.get(pg_port, []))
        database = (pg.path or "/postgres").lstrip("/") or "postgres"
        if pids:
            groups["postgres"] = ProcessGroup(
                "postgres",
                pids,
                database=database,
                port=pg_port,
                proportional=True,
                notes=[
                    f"postmaster, auxiliary processes and backends of database {database}; "
                    "memory is PSS (RSS would count shared buffers once per backend)"
                ],
            )
    if rd_port is not None:
        pids = _topmost(found.get(rd_port, []))
        if pids:
            groups["redis"] = ProcessGroup(
                "redis", pids, children=False, port=rd_port, notes=["whole server (shared)"]
            )
    return groups


def _threads(pid: int) -> Iterator[int]:
    try:
        yield from (int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return


class Pinning:
    """Pin every thread of some processes to CPUs; restore the old masks on exit."""

    def __init__(self, groups: Iterable[ProcessGroup], cpus: Iterable[int] | None) -> None:
        self.groups = list(groups)
        self.cpus = set(cpus) if cpus else None
        self.saved: dict[int, set[int]] = {}
        self.pinned_pids: list[int] = []

    def __enter__(self) -> Pinning:
        if self.cpus is None:
            return self
        for group in self.groups:
            for proc in group.members():
                self.pinned_pids.append(proc.pid)
                for tid in _threads(proc.pid):
                    try:
                        self.saved[tid] = os.sched_getaffinity(tid)
                        os.sched_setaffinity(tid, self.cpus)
                    except OSError:
                        continue
        return self

    def __exit__(self, *exc: object) -> None:
        # Threads started while pinned inherited the pin: give them their process's old mask.
        for pid in self.pinned_pids:
            fallback = self.saved.get(pid)
            for tid in _threads(pid):
                mask = self.saved.get(tid, fallback)
                if mask is not None:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(tid, mask)
        self.saved.clear()
        self.pinned_pids.clear()
