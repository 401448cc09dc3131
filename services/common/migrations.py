"""Per-service SQL migrations: `services/<svc>/sql/NNN_name.sql`, applied in order.

Every run takes one advisory lock, so several processes starting at once apply
each file exactly once; applied files are recorded with a checksum, and an
applied file that changed afterwards stops the run.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

from services.common.settings import SERVICES

log = logging.getLogger("shopstack.migrations")

LOCK_KEY = 0x5348_4F50  # "SHOP"

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    service    text        NOT NULL,
    version    text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
)
"""


class MigrationError(Exception):
    """A migration failed or an applied migration was edited."""


@dataclass(frozen=True)
class Migration:
    service: str
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(services: tuple[str, ...] = SERVICES) -> list[Migration]:
    """All migrations shipped in the package, per service in file-name order."""
    found: list[Migration] = []
    for service in services:
        folder = resources.files(f"services.{service}").joinpath("sql")
        if not folder.is_dir():
            continue
        files = sorted(
            (f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name
        )
        found.extend(Migration(service, f.name.removesuffix(".sql"), f.read_text()) for f in files)
    return found


async def apply_migrations(dsn: str, services: tuple[str, ...] = SERVICES) -> list[str]:
    """Apply pending migrations; return the `service/version` names applied now."""
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            await conn.execute(_LEDGER)
            rows = await conn.fetch("SELECT service, version, checksum FROM schema_migrations")
            done = {(r["service"], r["version"]): r["checksum"] for r in rows}
            for migration in discover(services):
                key = (migration.service, migration.version)
                if key in done:
                    if done[key] != migration.checksum:
                        raise MigrationError(
                            f"{migration.service}/{migration.version} changed after it was "
                            "applied; add a new migration instead"
                        )
                    continue
                async with conn.transaction():
                    try:
                        await conn.execute(migration.sql)
                    except asyncpg.PostgresError as exc:
                        raise MigrationError(
                            f"{migration.service}/{migration.version} failed: {exc}"
                        ) from exc
                    await conn.execute(
                        "INSERT INTO schema_migrations (service, version, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.service,
                        migration.version,
                        migration.checksum,
                    )
                applied_now.append(f"{migration.service}/{migration.version}")
                log.info("migration applied", extra={"migration": applied_now[-1]})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()
    return applied_now
