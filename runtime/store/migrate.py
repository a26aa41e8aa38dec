"""Schema migrations: ``runwatch migrate`` and the automatic upgrade of ``runwatch serve``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

__all__ = ["alembic_config", "current_revision", "head_revision", "schema_behind", "upgrade"]

_HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. Runs its own event loop: call it outside one
    (or through ``asyncio.to_thread``)."""
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    import asyncio

    from .audit import make_engine

    async def _get() -> str | None:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: MigrationContext.configure(c).get_current_revision()
                )
        finally:
            await engine.dispose()

    return asyncio.run(_get())


def schema_behind(url: str) -> str | None:
    """Why the database's schema is too old for this runwatch (empty, or at an earlier
    revision), or None when it is at head. A revision this runwatch does not know is newer
    (another replica migrated first in a rolling upgrade): not too old. Raises what the
    driver raises when the database cannot be read."""
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return f"the audit store has no runwatch schema (this runwatch needs revision {head})"
    known = {
        r.revision
        for r in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()
    }
    if current not in known:
        return None
    return f"the audit store's schema is at revision {current}; this runwatch needs {head}"
