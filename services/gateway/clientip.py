"""Who the client is: the peer address, or what a trusted proxy says in X-Forwarded-For.

Whether an address lies in a trusted network is remembered per address string
(bounded), so a steady stream from the same proxies and clients parses no
address twice; the networks are fixed for the gateway's life.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CACHE_ENTRIES = 4096
MAX_CACHED_ADDRESS = 64  # longer strings are no address worth remembering


class TrustedProxies:
    """The CIDRs whose X-Forwarded-For is believed."""

    def __init__(self, cidrs: Iterable[str], *, cache_entries: int = CACHE_ENTRIES) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(p, strict=False) for p in cidrs]
        self._cache_entries = cache_entries
        self._known: dict[str, bool] = {}

    def vouches_for(self, address: str) -> bool:
        """Is `address` an IP address inside a trusted network? (not an address: no)"""
        known = self._known.get(address)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            trusted = False
        else:
            trusted = any(ip in net for net in self.networks)
        if len(address) <= MAX_CACHED_ADDRESS and self._cache_entries:
            if len(self._known) >= self._cache_entries:
                self._known.clear()
            self._known[address] = trusted
        return trusted

    def client_ip(self, peer: str, forwarded: str | None) -> str:
        """The peer address; X-Forwarded-For is believed only when the peer is trusted."""
        if not forwarded or not self.networks or not self.vouches_for(peer):
            return peer
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            # The rightmost address no trusted proxy vouches for is the client.
            if hop and not self.vouches_for(hop):
                return hop
        return peer
