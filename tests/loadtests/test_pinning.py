"""Where the load test puts the generator, the services and the provider sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from loadtests.processes import Pinning, ProcessGroup
from loadtests.tools import plan_cpus

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")

# A process with a second thread: pinning must reach every thread.
TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
TWO_THREADS += "print('ready', flush=True); time.sleep(60)"


@pytest.fixture
def sandbox_like() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", TWO_THREADS], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    yield proc.pid
    proc.kill()
    proc.wait(10)
    proc.stdout.close()


def _masks(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_auto_puts_the_provider_beside_the_generator() -> None:
    plan = plan_cpus("auto")
    assert plan.generator
    assert plan.services
    assert set(plan.generator).isdisjoint(plan.services)
    assert set(plan.generator) | set(plan.services) == set(CPUS)
    assert plan.provider == plan.generator
    assert "provider sandbox on CPU" in plan.describe()


def test_provider_inside_counts_the_sandbox_among_the_services() -> None:
    plan = plan_cpus("provider-inside")
    assert plan.services
    assert plan.provider == plan.services
    assert plan.generator == plan_cpus("auto").generator
    assert "provider" not in plan.describe()


def test_none_pins_nothing() -> None:
    plan = plan_cpus("none")
    assert plan.generator is None
    assert plan.provider is None


def test_the_provider_group_is_pinned_to_the_generator_cpus_and_restored(
    sandbox_like: int,
) -> None:
    plan = plan_cpus("auto")
    assert plan.provider is not None
    before = _masks(sandbox_like)
    group = ProcessGroup("psp_sandbox", [sandbox_like])
    with Pinning([group], plan.provider):
        assert _masks(sandbox_like) == {frozenset(plan.provider)}
    assert _masks(sandbox_like) == before
