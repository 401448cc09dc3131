"""Sample RSS and CPU of every process group while a load runs (a background thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from loadtests.processes import ProcessGroup

MB = 1024.0 * 1024.0


@dataclass
class Series:
    """[seconds since start, RSS MB, CPU %] rows of one group (100 % = one core)."""

    rows: list[list[float]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        if not self.rows:
            return {}
        rss = [r[1] for r in self.rows]
        cpu = [r[2] for r in self.rows]
        return {
            "rss_mb_max": max(rss),
            "rss_mb_mean": sum(rss) / len(rss),
            "cpu_pct_mean": sum(cpu) / len(cpu),
            "cpu_pct_max": max(cpu),
        }


class Sampler:
    """Every `interval_s`, sum RSS and CPU over each group's live processes."""

    def __init__(self, groups: dict[str, ProcessGroup], interval_s: float = 0.5) -> None:
        self.groups = dict(groups)
        self.interval_s = interval_s
        self.series: dict[str, Series] = {name: Series() for name in self.groups}
        self._cpu_seen: dict[int, float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, group: ProcessGroup) -> None:
        """Watch one more group from now on (e.g. the load generator of the current run)."""
        with self._lock:
            self.groups[group.name] = group
            self.series.setdefault(group.name, Series())

    def remove(self, name: str) -> None:
        with self._lock:
            self.groups.pop(name, None)

    def __enter__(self) -> Sampler:
        self._started = self._last = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="loadtest-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _proc(self, proc: psutil.Process) -> psutil.Process:
        # Keep one Process object per pid so a recycled pid is noticed (create_time differs).
        known = self._procs.get(proc.pid)
        if known is not None and known.is_running():
            return known
        self._procs[proc.pid] = proc
        self._cpu_seen.pop(proc.pid, None)
        return proc

    def _sample(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last, 1e-6)
        self._last = now
        with self._lock:
            groups = list(self.groups.values())
        for group in groups:
            rss = 0.0
            cpu = 0.0
            for member in group.members():
                proc = self._proc(member)
                with contextlib.suppress(psutil.Error):
                    # Postgres backends map the same shared buffers: PSS counts them once.
                    mem = proc.memory_full_info() if group.proportional else proc.memory_info()
                    rss += getattr(mem, "pss", mem.rss)
                    times = proc.cpu_times()
                    used = times.user + times.system
                    before = self._cpu_seen.get(proc.pid)
                    self._cpu_seen[proc.pid] = used
                    if before is not None:
                        cpu += max(0.0, used - before) / elapsed * 100.0
            with self._lock:
                self.series.setdefault(group.name, Series()).rows.append(
                    [round(now - self._started, 3), round(rss / MB, 2), round(cpu, 1)]
                )

    def window(self, start_s: float, end_s: float) -> dict[str, Any]:
        """Per group: summary and rows between two offsets (the measured part of a run)."""
        out: dict[str, Any] = {}
        with self._lock:
            for name, series in self.series.items():
                rows = [r for r in series.rows if start_s <= r[0] <= end_s]
                picked = Series(rows)
                out[name] = {
                    **picked.summary(),
                    "series": [[round(r[0] - start_s, 3), r[1], r[2]] for r in rows],
                }
        return out

    def now(self) -> float:
        """Seconds since the sampler started (to mark a run's window)."""
        return time.monotonic() - self._started
