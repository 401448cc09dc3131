"""Who the client is: X-Forwarded-For believed only from trusted proxies, decisions cached."""

from __future__ import annotations

import pytest

from services.gateway.clientip import TrustedProxies


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.7", None, "203.0.113.7"),
        ("203.0.113.7", "1.2.3.4", "203.0.113.7"),  # an untrusted peer: XFF ignored
        ("10.0.0.5", "1.2.3.4", "1.2.3.4"),
        ("10.0.0.5", "9.9.9.9, 1.2.3.4", "1.2.3.4"),  # the rightmost untrusted hop
        ("10.0.0.5", "9.9.9.9, 1.2.3.4, 10.0.0.9", "1.2.3.4"),  # trusted hops skipped
        ("10.0.0.5", " , 10.0.0.9 ,", "10.0.0.5"),  # nothing but trusted or empty hops
        ("10.0.0.5", "not-an-ip", "not-an-ip"),  # no address is no trusted proxy
        ("10.0.0.5", "", "10.0.0.5"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("::ffff:10.0.0.5", "1.2.3.4", "::ffff:10.0.0.5"),  # a mapped address is not 10/8
    ],
)
def test_forwarded_for_rules(peer: str, forwarded: str | None, expected: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "::1/128"])
    assert proxies.client_ip(peer, forwarded) == expected
    assert proxies.client_ip(peer, forwarded) == expected  # the same answer from the cache


def test_no_trusted_proxies_means_the_peer() -> None:
    proxies = TrustedProxies([])
    assert proxies.client_ip("10.0.0.5", "1.2.3.4") == "10.0.0.5"
    assert not proxies.vouches_for("10.0.0.5")


def test_the_cache_is_per_gateway_and_never_widens_trust() -> None:
    strict = TrustedProxies(["10.0.0.1/32"])
    wide = TrustedProxies(["10.0.0.0/8"])
    assert wide.client_ip("10.0.0.5", "1.2.3.4") == "1.2.3.4"
    # Another gateway's networks decided nothing for this one.
    assert strict.client_ip("10.0.0.5", "1.2.3.4") == "10.0.0.5"
    assert strict.client_ip("10.0.0.1", "10.0.0.5, 1.2.3.4") == "1.2.3.4"
    assert strict.client_ip("10.0.0.1", "1.2.3.4, 10.0.0.5") == "10.0.0.5"
    for _ in range(3):
        assert not strict.vouches_for("10.0.0.5")
        assert strict.vouches_for("10.0.0.1")


def test_the_cache_is_bounded_and_stays_correct_past_its_size() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], cache_entries=4)
    for i in range(50):
        assert proxies.vouches_for(f"10.0.{i}.1")
        assert not proxies.vouches_for(f"192.0.2.{i}")
        assert len(proxies._known) <= 4
    long_hop = "1" * 200  # a junk hop is judged but not remembered
    assert proxies.client_ip("10.0.0.5", long_hop) == long_hop
    assert long_hop not in proxies._known
