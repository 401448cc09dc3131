"""Password hashing with argon2id, off the event loop and with bounded concurrency.

Each hash holds `memory_kib` of RAM, so at most `concurrency` run at once (in
threads) and at most `queue` more may wait; beyond that the login is shed.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.common.errors import Overloaded


class Passwords:
    def __init__(
        self, *, time_cost: int, memory_kib: int, parallelism: int, concurrency: int, queue: int
    ) -> None:
        self.hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        self._slots = asyncio.Semaphore(concurrency)
        self._max_waiting = concurrency + queue
        self._waiting = 0
        # Verified against when the user does not exist, so both paths cost the same.
        self._dummy_hash = self.hasher.hash("shopstack-dummy-password")

    def hash_sync(self, password: str) -> str:
        """Hash in the calling thread (seeding, tools)."""
        return self.hasher.hash(password)

    def _verify_sync(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _run_bounded(self, stored: str, password: str) -> bool:
        if self._waiting >= self._max_waiting:
            raise Overloaded("too many logins in progress", retry_after_s=1)
        self._waiting += 1
        try:
            async with self._slots:
                return await asyncio.to_thread(self._verify_sync, stored, password)
        finally:
            self._waiting -= 1

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when `password` matches; an unknown user (None) costs the same and fails."""
        if stored is None:
            await self._run_bounded(self._dummy_hash, password)
            return False
        return await self._run_bounded(stored, password)

    def needs_rehash(self, stored: str) -> bool:
        """True when the stored hash uses weaker parameters than the current ones."""
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True

    async def hash(self, password: str) -> str:
        """Hash a password in a thread, bounded like verification."""
        async with self._slots:
            return await asyncio.to_thread(self.hasher.hash, password)
