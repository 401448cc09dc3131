"""Sold-out flags: refuse until the deadline, then let exactly one caller probe."""

from __future__ import annotations

import time

from services.common.flags import SoldOutFlags


def test_flags_expire_and_clear() -> None:
    flags = SoldOutFlags(0.05)
    assert not flags.is_sold_out(1)
    flags.mark(1)
    assert flags.is_sold_out(1)
    time.sleep(0.06)
    assert not flags.is_sold_out(1)
    flags.mark(2)
    flags.clear(2)
    assert not flags.is_sold_out(2)
    flags.mark(3)
    flags.clear_all()
    assert not flags.is_sold_out(3)


def test_an_expired_flag_lets_exactly_one_caller_probe() -> None:
    flags = SoldOutFlags(0.05)
    flags.mark(7)
    assert flags.refuse_or_probe(7)
    time.sleep(0.06)
    answers = [flags.refuse_or_probe(7) for _ in range(10)]
    assert answers == [False] + [True] * 9  # one probe; the rest are still refused
    flags.clear(7)  # the probe found stock
    assert not flags.refuse_or_probe(7)


def test_a_zero_ttl_never_flags() -> None:
    flags = SoldOutFlags(0)
    flags.mark(1)
    assert not flags.is_sold_out(1)
    assert not flags.refuse_or_probe(1)
