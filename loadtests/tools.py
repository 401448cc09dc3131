"""The external load tools (wrk, ab, taskset) and where the load generator runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Literal

INSTALL_HINT = {
    "wrk": "apt-get install -y wrk",
    "ab": "apt-get install -y apache2-utils",
    "chromium": "apt-get install -y chromium",
}


class ToolMissing(RuntimeError):
    """A load tool is not installed; the message says how to install it."""


def require(*names: str) -> dict[str, str]:
    """Paths of the named tools, or ToolMissing naming every missing one and its install line."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        lines = [f"  {name}: {INSTALL_HINT.get(name, 'install it')}" for name in missing]
        raise ToolMissing(
            "missing load tools (Debian/Ubuntu, as root; `.ci/run` installs them too):\n"
            + "\n".join(lines)
        )
    return {name: path for name, path in found.items() if path is not None}


def version(name: str) -> str:
    """The tool's version line, or "unknown"."""
    args = {"wrk": ["wrk", "-v"], "ab": ["ab", "-V"], "chromium": ["chromium", "--version"]}
    cmd = args.get(name, [name, "--version"])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


PinMode = Literal["auto", "provider-inside", "none"]


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the load generator and the services get (None: unpinned)."""

    generator: tuple[int, ...] | None = None
    services: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)
    # The provider sandbox stands in for a party outside the stack: by default it runs
    # beside the generator, so its CPU does not count against the services'.
    provider_outside: bool = True

    @property
    def provider(self) -> tuple[int, ...] | None:
        """The CPUs of the provider sandbox."""
        return self.generator if self.provider_outside else self.services

    @property
    def generator_threads(self) -> int:
        return len(self.generator) if self.generator else 1

    def prefix(self) -> list[str]:
        """Command prefix that runs a generator on its CPUs."""
        if not self.generator or shutil.which("taskset") is None:
            return []
        return ["taskset", "-c", ",".join(str(c) for c in self.generator)]

    def to_dict(self) -> dict[str, object]:
        """Where things ran, for the report (cpucost reads which services shared CPUs)."""
        return {
            "generator": list(self.generator) if self.generator else None,
            "services": list(self.services) if self.services else None,
            "provider_outside": self.provider_outside,
        }

    def describe(self) -> str:
        if not self.generator:
            return "unpinned (" + "; ".join(self.notes or ["pinning disabled"]) + ")"
        services = ",".join(str(c) for c in self.services or ())
        generator = ",".join(str(c) for c in self.generator)
        if self.provider_outside:
            return (
                f"load generator and the provider sandbox on CPU {generator}, "
                f"the other services on CPU {services} (taskset)"
            )
        return f"load generator on CPU {generator}, services on CPU {services} (taskset)"


def plan_cpus(mode: PinMode = "auto") -> CpuPlan:
    """Give the generator the last CPU(s) (a quarter, at least one) and the services the rest.

    `auto` puts the provider sandbox with the generator (a real provider runs elsewhere);
    `provider-inside` counts it among the services.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "none":
        return CpuPlan(notes=["--pin none"])
    if len(cpus) < 2:
        return CpuPlan(notes=["one CPU: generator and services share it"])
    if shutil.which("taskset") is None:
        return CpuPlan(notes=["taskset not found (apt-get install -y util-linux)"])
    count = max(1, len(cpus) // 4)
    return CpuPlan(
        generator=tuple(cpus[-count:]),
        services=tuple(cpus[:-count]),
        provider_outside=mode != "provider-inside",
    )
