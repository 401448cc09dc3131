"""`shopstack serve`: the scheduling policy it gives a service's processes and threads.

SCHED_BATCH (the default) is inherited by granian's workers and every thread they
start; `SHOPSTACK_CPU_SCHED_POLICY=other` keeps the kernel's default.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psutil
import pytest

from tests.support.process import start_service

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux only")


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of the server and of its workers."""
    parent = psutil.Process(pid)
    policies = set()
    for proc in [parent, *parent.children(recursive=True)]:
        for thread in proc.threads():
            policies.add(os.sched_getscheduler(thread.id))
    return policies


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, os.SCHED_BATCH), ("other", os.SCHED_OTHER), ("batch", os.SCHED_BATCH)],
)
def test_every_thread_of_a_service_gets_the_configured_policy(
    redis_url: str, tmp_path: Path, setting: str | None, expected: int
) -> None:
    env = {
        "SHOPSTACK_REDIS_URL": redis_url,
        "SHOPSTACK_PSP_KEY_PREFIX": f"serve-{uuid.uuid4().hex[:8]}:",
        "SHOPSTACK_PSP_WEBHOOK_SECRET": "test-psp-webhook-secret-0123456789abcdef-xyz",
    }
    if setting is not None:
        env["SHOPSTACK_CPU_SCHED_POLICY"] = setting
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test runner's own
    service = start_service("psp_sandbox", env=env, log_path=tmp_path / "sandbox.log")
    try:
        workers = psutil.Process(service.process.pid).children(recursive=True)
        assert workers, "granian runs the app in a worker process"
        assert _policies(service.process.pid) == {expected}
    finally:
        service.stop()


def test_an_unknown_policy_is_refused_at_start(redis_url: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cpu_sched_policy"):
        start_service(
            "psp_sandbox",
            env={
                "SHOPSTACK_REDIS_URL": redis_url,
                "SHOPSTACK_CPU_SCHED_POLICY": "fifo",
                "SHOPSTACK_PSP_WEBHOOK_SECRET": "test-psp-webhook-secret-0123456789abcdef-xyz",
            },
            log_path=tmp_path / "sandbox.log",
            timeout_s=20,
        )
