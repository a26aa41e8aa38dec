"""The ``runwatch`` command: serve, runtime, token, migrate, purge, and the verbs of extensions.

Packages add to the command through the ``runwatch.cli`` entry point group: each entry point
names an :class:`Extension`, its verbs and what it mounts on ``runwatch serve``. The monitor is
one (``monitor = "monitor.cli:EXTENSION"``: the verbs ``monitor`` and ``check``, and the
monitor inside ``runwatch serve``); the runtime never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import importlib.metadata
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run

from . import __version__
from .config import ConfigError, Settings, sqlite_path

__all__ = [
    "EMBEDDED",
    "EXTENSION_GROUP",
    "Command",
    "Extension",
    "Extensions",
    "build_parser",
    "existing_store",
    "main",
    "parse_duration",
    "serve_app",
    "server_args",
    "store_name",
]

log = logging.getLogger("runwatch")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30d``, ``1h``, ``90s`` → seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30s, 15m, 1h, 30d; got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


# ---- extensions ------------------------------------------------------------------------------

#: The entry point group through which packages add verbs to ``runwatch``.
EXTENSION_GROUP = "runwatch.cli"
#: The extension ``runwatch serve`` embeds beside the runtime (the embedded default).
EMBEDDED = "monitor"


@dataclass(frozen=True)
class Command:
    """One ``runwatch`` verb: its help, its arguments, and what it runs (an exit status)."""

    name: str
    summary: str
    description: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: Listed in ``runwatch --help`` right after this verb (None: after the others).
    after: str | None = None


@dataclass(frozen=True)
class Extension:
    """What a package adds to ``runwatch``: verbs, and what ``runwatch serve`` mounts of it
    (``attach(app, runtime)``, called once the runtime's app is built, before it serves)."""

    commands: Sequence[Command] = ()
    attach: Callable[[Any, Any], None] | None = None


@dataclass(frozen=True)
class Extensions:
    """The extensions installed (by entry point name), and why each one that would not load
    did not."""

    loaded: dict[str, Extension] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    @classmethod
    def discover(cls) -> Extensions:
        loaded: dict[str, Extension] = {}
        broken: dict[str, str] = {}
        for point in importlib.metadata.entry_points(group=EXTENSION_GROUP):
            try:
                loaded[point.name] = point.load()
            except Exception as exc:
                broken[point.name] = f"{point.value}: {type(exc).__name__}: {exc}"
        return cls(loaded, broken)

    def missing(self, name: str) -> str | None:
        """None when extension ``name`` is there; else one line saying why it is not."""
        if name in self.loaded:
            return None
        if name in self.broken:
            return (
                f"the {EXTENSION_GROUP} extension {name!r} could not be loaded "
                f"({self.broken[name]})"
            )
        return (
            f"the {EXTENSION_GROUP} extension {name!r} is not installed "
            "(reinstall runwatch: pip install -e .)"
        )


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it serves: with ``--port 0`` the kernel
    picked the port, and uvicorn names no address when it is handed a bound socket."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            # One write for the whole line: print() writes the text and its newline apart, and
            # a log line from another thread (aiosqlite's, at debug) could land in between and
            # run into the port number.
            sys.stderr.write(f"runwatch: listening on http://{shown}:{port}\n")
            sys.stderr.flush()


class _GracefulServer(_Server):
    """Runs runwatch's own graceful shutdown on SIGTERM/SIGINT *before* uvicorn closes the
    sockets (uvicorn would otherwise close every WebSocket first)."""

    def __init__(self, config: uvicorn.Config, runtime: Any) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.warning("received %s: draining runs before shutdown", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        try:
            await self.runtime.shutdown()
        finally:
            self.should_exit = True


#: Libraries whose debug lines say nothing an operator can use (aiosqlite logs two lines per
#: statement, about 35 a second on an idle server): kept at info when runwatch logs at debug.
_QUIET_LIBRARIES = ("aiosqlite",)


def _configure_logging(level: str) -> None:
    value = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=value, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(value, logging.INFO))


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from the environment; a ConfigError ends in one line (see :func:`main`)."""
    return Settings.from_env()


def existing_store(settings: Settings) -> str | None:
    """For verbs that read an existing store (``check``, ``purge``): None when it is there,
    else the line to print. They never create a database (an empty ``./runwatch.db`` in the
    wrong directory would only fail later with "no such table")."""
    path = sqlite_path(settings.database_url)
    if path is None or os.path.exists(path):
        return None
    return (
        f"runwatch: no audit store at {os.path.abspath(path)}: run from the directory that "
        "holds it, or set RUNWATCH_DATABASE_URL to the store runwatch serve uses"
    )


def _listen(host: str, port: int) -> socket.socket | None:
    """Bind the listening socket before anything else happens (docs/operations.md): a second
    server on a taken port stops here, before it touches the store."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        print(f"runwatch: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (
            "another process (another runwatch?) is using it; stop it or pick --port"
            if exc.errno == errno.EADDRINUSE
            else exc.strerror
        )
        print(f"runwatch: cannot listen on {host}:{port}: {hint}", file=sys.stderr)
        return None
    sock.set_inheritable(True)
    return sock


def _run_server(server: uvicorn.Server, sock: socket.socket, runtime: Any) -> int:
    """Serve on the bound socket; a runtime first takes its instance lease (before recovery,
    which runs in the app's startup)."""
    from .lease import LeaseHeld

    async def main() -> int:
        if runtime is not None:
            try:
                await runtime.lease.acquire()
            except LeaseHeld as exc:
                print(f"runwatch: {exc}", file=sys.stderr)
                await runtime.store.close()
                return 2
        await server.serve(sockets=[sock])
        return 0 if server.started else 1

    try:
        return asyncio_run(main(), loop_factory=server.config.get_loop_factory())
    finally:
        sock.close()


def serve_app(args: argparse.Namespace, build: Callable[[Settings], Any]) -> int:
    """Serve the app ``build(settings)`` returns the way the runtime's own server verbs do
    (dev-mode guard, the port bound first, migrations, graceful uvicorn): for extensions'
    server verbs, such as ``runwatch monitor``. ``args`` has :func:`server_args`."""
    return _serve(args, build=build)


def _serve_runtime(args: argparse.Namespace, extensions: Extensions, *, embed: bool) -> int:
    """``runwatch serve`` (``embed``: with every extension that attaches, the monitor first of
    all) and ``runwatch runtime``."""
    attach: list[Callable[[Any, Any], None]] = []
    if embed:
        missing = extensions.missing(EMBEDDED)
        if missing is not None:
            print(
                f"runwatch: serve embeds the {EMBEDDED}, but {missing}; "
                "or run `runwatch runtime` alone",
                file=sys.stderr,
            )
            return 2
        attach = [e.attach for e in extensions.loaded.values() if e.attach is not None]
    return _serve(args, attach=attach)


def _serve(
    args: argparse.Namespace,
    *,
    attach: Sequence[Callable[[Any, Any], None]] = (),
    build: Callable[[Settings], Any] | None = None,
) -> int:
    """The runtime (with ``attach`` hooks mounted on its app), or the app ``build`` makes."""
    from .server import Runtime, create_app, is_loopback
    from .store.migrate import upgrade

    settings = _settings(args)
    _configure_logging(settings.log_level)
    if settings.dev_mode:
        if not is_loopback(args.host):
            print(
                f"runwatch: refusing to start in dev mode on non-loopback address {args.host}: "
                "set RUNWATCH_JWT_SECRET (dev mode hands out tokens to anyone)",
                file=sys.stderr,
            )
            return 2
        log.warning(
            "DEV MODE: RUNWATCH_JWT_SECRET is not set. POST /dev/token hands out tokens for any "
            "user and the monitor is open without RUNWATCH_ADMIN_TOKEN. Never expose this server."
        )
    agents, tools = (None, None)
    if build is None:
        # Before the port is bound or the store touched: a wrong --agent or --tool is one line.
        agents, tools = _user_code(args)
    sock = _listen(args.host, args.port)
    if sock is None:
        return 2
    if args.migrate:
        upgrade(settings.database_url)
    elif (behind := _schema_behind(settings.database_url)) is not None:
        # Started against an old schema, every write would be refused as bad data and every
        # run ended with an internal error: say so once, and do not start.
        print(
            f"runwatch: {behind}: run `runwatch migrate` first (or start without --no-migrate)",
            file=sys.stderr,
        )
        sock.close()
        return 2
    rt = None
    if build is None:
        rt = Runtime(settings, agents=agents, tools=tools)
        app = create_app(rt)
        for hook in attach:
            hook(app, rt)
    else:
        app = build(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ws_max_size=1_048_576,
        # Compression state costs tens of KiB per connection; events are small JSON.
        ws_per_message_deflate=settings.ws_compression,
        ws_ping_interval=settings.heartbeat_s,
        ws_ping_timeout=settings.heartbeat_s,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = _GracefulServer(config, rt) if rt is not None else _Server(config)
    _settle_garbage_collector()
    return _run_server(server, sock, rt)


def _settle_garbage_collector() -> None:
    """A long-lived server: what exists once it is built (modules, the app, the registries)
    lives as long as the process, so full collections need not walk it again and again
    (``gc.freeze``), and young collections run less often (their pauses show in the event
    loop's latency). Worker threads (the SQLite writer, sync tools) hand the interpreter back
    to the event loop every millisecond rather than every five."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    sys.setswitchinterval(0.001)


#: The cyclic collector's first-generation threshold for server processes (CPython: 700).
GC_GEN0_THRESHOLD = 20_000


def _user_code(args: argparse.Namespace) -> tuple[Any, Any]:
    """The agent and tool registries with the user's ``--agent``/``--tool`` and entry points.
    Modules are looked up from the current directory too, as uvicorn does for its app."""
    from .agents import AgentRegistry
    from .tools import builtin_tools

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return AgentRegistry.with_builtins(args.agent), builtin_tools(extra=args.tool)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        if args.debug:
            raise
        raise ConfigError(
            "--agent/--tool", " ".join([*args.agent, *args.tool]), f"importable code ({exc})"
        ) from exc


def _token(args: argparse.Namespace) -> int:
    from .auth import AuthError, TokenAuthority, valid_user_id

    if not valid_user_id(args.user):
        print(
            f"runwatch: invalid user name {args.user!r}: use 1 to 128 letters, digits "
            "or _ . @ : + - (no spaces)",
            file=sys.stderr,
        )
        return 2
    settings = _settings(args)
    if not settings.jwt_secret:
        print("runwatch: RUNWATCH_JWT_SECRET must be set to mint tokens", file=sys.stderr)
        return 2
    try:
        print(TokenAuthority(settings.jwt_secret).mint(args.user, ttl_s=args.ttl))
    except (AuthError, ValueError) as exc:
        # A secret too short to sign with: say how to make one.
        print(f"runwatch: {exc} (make one with: openssl rand -hex 32)", file=sys.stderr)
        return 2
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .store.migrate import upgrade

    settings = _settings(args)
    _configure_logging(settings.log_level)
    upgrade(settings.database_url, args.revision)
    print(f"runwatch: schema at {args.revision}")
    return 0


#: Shorter retention than this deletes runs a user may still be reading: --force required.
MIN_PURGE_AGE_S = 3600.0


def store_name(url: str) -> str:
    """The database URL as shown to an operator: no password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _purge(args: argparse.Namespace) -> int:
    from .store.audit import AuditStore

    settings = _settings(args)
    missing = existing_store(settings)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    too_recent = args.older_than < MIN_PURGE_AGE_S and not args.force
    if too_recent and not args.dry_run:
        print(
            f"runwatch: refusing to purge runs younger than 1h (--older-than "
            f"{args.older_than:g}s would delete recent runs); add --force if you mean it",
            file=sys.stderr,
        )
        return 2
    before_us = int((time.time() - args.older_than) * 1_000_000)

    async def run() -> dict[str, int]:
        store = AuditStore.open(settings.database_url)
        try:
            return await store.purge(before_us, dry_run=args.dry_run)
        finally:
            await store.close()

    counts = asyncio.run(run())
    verb = "would purge" if args.dry_run else "purged"
    print(
        f"runwatch: {verb} {{runs}} runs, {{events}} events, {{deliveries}} deliveries, "
        "{verdicts} verdicts, {violations} violations from {store}".format(
            store=store_name(settings.database_url), **counts
        )
    )
    if too_recent:
        # The preview is allowed (it deletes nothing); the same command without --dry-run is not.
        print(
            f"runwatch: --older-than {args.older_than:g}s is under 1h: without --dry-run this "
            "purge needs --force",
            file=sys.stderr,
        )
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Every option that has a default says it, as the user would type it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and not action.required
            and default not in (None, [], True, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


_ENV_NOTE = (
    "Settings come from RUNWATCH_* environment variables (README.md, Configuration); "
    "with no RUNWATCH_JWT_SECRET the server runs in dev mode (loopback only)."
)


def _schema_behind(url: str) -> str | None:
    """:func:`~runtime.store.migrate.schema_behind`, or None (with a warning) when the store
    cannot be read now: an outage at start is the writer's to ride out, not a reason to stop."""
    from .store.migrate import schema_behind

    try:
        return schema_behind(url)
    except Exception as exc:  # the driver's own errors, whichever driver
        log.warning("cannot read the audit store's schema revision (%s); starting anyway", exc)
        return None


def server_args(p: argparse.ArgumentParser, port: int) -> None:
    """The arguments of a server verb (for :func:`serve_app`): where to listen, whether to
    migrate."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=port, help="TCP port to listen on")
    p.add_argument(
        "--no-migrate",
        dest="migrate",
        action="store_false",
        help="do not apply schema migrations at start (default: migrate)",
    )


def _runtime_args(p: argparse.ArgumentParser) -> None:
    server_args(p, 8000)
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="[NAME=]MODULE:FUNC",
        help="register an extra agent (repeatable); NAME defaults to FUNC; modules are "
        "found from the current directory too (docs/agents.md)",
    )
    p.add_argument(
        "--tool",
        action="append",
        default=[],
        metavar="[NAME=]MODULE:OBJ",
        help="register an extra tool (repeatable): a Tool, or a function whose docstring "
        "and annotated parameters describe it; NAME defaults to its name (docs/agents.md)",
    )


def _token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--user", required=True, help="the user id: 1-128 of letters, digits, _ . @ : + -"
    )
    p.add_argument(
        "--ttl", type=parse_duration, default="1h", help="lifetime, such as 90s, 30m, 1h or 7d"
    )


def _migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default="head", help="target Alembic revision")


def _purge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--older-than", type=parse_duration, required=True, help="a duration such as 30d or 12h"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    p.add_argument("--force", action="store_true", help="allow --older-than under 1h")


def _commands(extensions: Extensions) -> list[Command]:
    """The runtime's verbs, then each extension's after the verb it names (or at the end)."""
    commands = [
        Command(
            "serve",
            "runtime + monitor in one process (the embedded default)",
            "The chat page at /, the WebSocket at /ws, the monitor at /monitor, its API under "
            "/api, API reference at /api/docs and Prometheus metrics at /metrics, in one process.",
            lambda args: _serve_runtime(args, extensions, embed=True),
            _runtime_args,
        ),
        Command(
            "runtime",
            "the runtime alone (production)",
            "The chat page, /ws, /api/me and /metrics, without the monitor; run `runwatch "
            "monitor` beside it on the same database.",
            lambda args: _serve_runtime(args, extensions, embed=False),
            _runtime_args,
        ),
        Command(
            "token",
            "mint a JWT for a user",
            "Print an HS256 JWT for USER, signed with RUNWATCH_JWT_SECRET, for /ws and /api/me.",
            _token,
            _token_args,
        ),
        Command(
            "migrate",
            "apply the audit store's schema migrations",
            "Bring the database in RUNWATCH_DATABASE_URL to the given Alembic revision.",
            _migrate,
            _migrate_args,
        ),
        Command(
            "purge",
            "delete ended runs older than a duration",
            "Retention: delete ended runs older than the duration with everything of them "
            "(events, deliveries, the monitor's verdicts and violations), in one transaction.",
            _purge,
            _purge_args,
        ),
    ]
    for extension in extensions.loaded.values():
        for extra in extension.commands:
            names = [c.name for c in commands]
            at = names.index(extra.after) + 1 if extra.after in names else len(commands)
            commands.insert(at, extra)
    return commands


def build_parser(extensions: Extensions | None = None) -> argparse.ArgumentParser:
    """The ``runwatch`` parser with the verbs of ``extensions`` (default: those installed)."""
    extensions = extensions if extensions is not None else Extensions.discover()
    parser = argparse.ArgumentParser(
        prog="runwatch",
        description="Run agents live and prove every user saw every step.",
        epilog=_ENV_NOTE,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"runwatch {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of a configuration or store error instead of one line",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _commands(extensions):
        p = sub.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            epilog=_ENV_NOTE,
            formatter_class=_HelpFormatter,
        )
        if command.arguments is not None:
            command.arguments(p)
        p.set_defaults(**{_RUN: command.run})
    return parser


#: Where the parsed arguments keep the verb's function (a name no option takes).
_RUN = "_runwatch_command"


def _verb(argv: Sequence[str]) -> str | None:
    """The verb on a command line: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line(exc: BaseException) -> str:
    """A driver error as one line: the database's own words, without SQLAlchemy's wrapping."""
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return text if text.startswith(type(orig).__name__) else f"{type(orig).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Every configuration mistake ends in one line on stderr and exit status 2 (a traceback
    only with ``--debug``)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .store.audit import StoreError

    argv = sys.argv[1:] if argv is None else list(argv)
    extensions = Extensions.discover()
    parser = build_parser(extensions)
    verb = _verb(argv)
    missing = extensions.missing(EMBEDDED)
    verbs = {c.name for c in _commands(extensions)}
    if verb is not None and verb not in verbs and missing is not None:
        # A verb of an extension that is not there: say which, in one line.
        print(f"runwatch: no command {verb!r} here: {missing}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        run: Callable[[argparse.Namespace], int] = getattr(args, _RUN)
        return run(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"runwatch: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StoreError, SQLAlchemyError, OSError) as exc:
        if args.debug:
            raise
        url = os.environ.get("RUNWATCH_DATABASE_URL") or Settings.database_url
        print(
            f"runwatch: cannot use the audit store {store_name(url)} ({_one_line(exc)}): check "
            "RUNWATCH_DATABASE_URL, that the database is up and writable, and `runwatch migrate`",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
