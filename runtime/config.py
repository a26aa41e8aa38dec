"""Settings from ``RUNWATCH_*`` environment variables (every one is listed in the README).

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    ConfigError     a variable has a value runwatch cannot use: one line, exit status 2
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .metrics import DELIVERY_SLO_S

__all__ = ["LOG_LEVELS", "SUPPORTED_DRIVERS", "ConfigError", "Settings", "sqlite_path"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: SQLAlchemy async drivers the audit store runs on (docs/architecture.md).
SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite database URL (None for other databases or in-memory)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    database = parsed.database or ""
    return None if database in ("", ":memory:") or database.startswith("file:") else database


def _check_database_url(raw: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    name = "RUNWATCH_DATABASE_URL"
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError):
        raise ConfigError(
            name,
            raw,
            "a database URL such as sqlite+aiosqlite:///./runwatch.db or "
            "postgresql+asyncpg://user:password@host:5432/dbname",
        ) from None
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise ConfigError(
            name,
            raw,
            f"one of the drivers {', '.join(SUPPORTED_DRIVERS)} (got {parsed.drivername})",
        )
    path = sqlite_path(raw)
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(
                name,
                raw,
                f"a file in an existing directory ({directory} does not exist: create it)",
            )


def _default_instance() -> str:
    """Unique per process (docs/operations.md: two live processes never share an instance id):
    host name, pid and a random suffix, since a restarted container may get the same pid."""
    return f"{socket.gethostname() or 'runwatch'}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Settings:
    """Every knob of the runtime and the monitor, with its default."""

    database_url: str = "sqlite+aiosqlite:///./runwatch.db"
    jwt_secret: str | None = None
    jwt_leeway_s: float = 30.0
    admin_token: str | None = None
    run_timeout_s: float = 300.0
    tool_timeout_s: float = 60.0
    drain_s: float = 10.0
    connect_timeout_s: float = 10.0
    heartbeat_s: float = 20.0
    ws_compression: bool = False
    max_connections_per_user: int = 10
    max_bad_frames: int = 20
    chat_burst: int = 20
    chat_refill_per_s: float = 1.0
    send_queue_bytes: int = 1_048_576
    instance_id: str = field(default_factory=_default_instance)
    #: Lifetime of the instance lease; a replica silent this long is taken over.
    lease_ttl_s: float = 15.0
    redis_url: str | None = None
    redis_channel: str = "runwatch:fanout"
    data_dir: str = "./runwatch-data"
    journal_max_bytes: int = 256 * 1024 * 1024
    log_level: str = "info"
    delivery_slo_s: float = DELIVERY_SLO_S
    stuck_grace_s: float = 60.0
    #: The clock difference between two hosts the ``persisted`` rule allows when a frame was
    #: sent by another replica than the one that committed it (their clocks are compared).
    clock_skew_s: float = 0.25
    monitor_interval_s: float = 2.0
    #: A trace viewer's URL with ``{trace_id}`` and/or ``{run_id}``: the monitor links runs.
    trace_url_template: str | None = None
    #: Put the run's owner on its trace as ``runwatch.user_id`` (off: user ids stay out).
    trace_user_id: bool = False

    @property
    def dev_mode(self) -> bool:
        """No JWT secret: dev tokens are served and only loopback addresses are allowed."""
        return not self.jwt_secret

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = "RUNWATCH_" + f.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
            try:
                if kind.startswith("bool"):
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    values[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif kind.startswith("float"):
                    values[f.name] = float(raw)
                elif kind.startswith("int"):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise ConfigError(name, raw, kind.split(" ")[0]) from None
            if kind.startswith(("float", "int")) and values[f.name] < 0:  # bool is not "int"
                raise ConfigError(name, raw, "a non-negative number")
        values.update({k: v for k, v in overrides.items() if v is not None})
        level = str(values.get("log_level", cls.log_level))
        if level.lower() not in LOG_LEVELS:
            raise ConfigError("RUNWATCH_LOG_LEVEL", level, "one of " + ", ".join(LOG_LEVELS))
        if "database_url" in values:
            _check_database_url(str(values["database_url"]))
        return cls(**values)
