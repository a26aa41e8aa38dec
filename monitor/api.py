"""The monitor's JSON API under ``/api/`` and its admin authentication.

Auth: ``RUNWATCH_ADMIN_TOKEN`` as ``Authorization: Bearer <token>``, or the session cookie the
login form sets (an HMAC of the token, never the token itself). In dev mode (no
``RUNWATCH_JWT_SECRET``) with no admin token the monitor is open. Outside dev mode with no admin
token configured, the monitor refuses every request with 503 rather than run open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from runtime.config import Settings
from runtime.events import now_us
from runtime.store.monitoring import MonitorReader, MonitorStore, RunFilter

from . import views
from .errors import FilterError
from .filters import (
    RUN_CURSOR_PATTERN,
    SINCE_HELP,
    SINCE_PATTERN,
    VIOLATION_CURSOR_PATTERN,
    check_text,
    holdable,
    parse_since,
)
from .rules import JUDGED_STATES, Rule, Verdict, rule_config

__all__ = ["COOKIE", "MonitorAuth", "build_api", "log_state"]

log = logging.getLogger("runwatch.monitor")

COOKIE = "runwatch_monitor"

# The schema lists the values of the enums (inline, as Literal types do); mypy sees strings.
if TYPE_CHECKING:
    RuleName: TypeAlias = str
    VerdictName: TypeAlias = str
    StateName: TypeAlias = str
else:
    RuleName = Literal[tuple(r.value for r in Rule)]
    VerdictName = Literal[tuple(v.value for v in Verdict)]
    StateName = Literal[JUDGED_STATES]


class MonitorAuth:
    def __init__(self, settings: Settings) -> None:
        self.token = settings.admin_token
        self.open = settings.dev_mode and not settings.admin_token
        self.misconfigured = not settings.dev_mode and not settings.admin_token

    def session_value(self) -> str:
        assert self.token is not None
        return hmac.new(
            self.token.encode(), b"runwatch-monitor-session", hashlib.sha256
        ).hexdigest()

    def check_token(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode()
        )

    def allowed(self, request: Request) -> bool:
        if self.open:
            return True
        if self.token is None:
            return False
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self.check_token(header[7:].strip()):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie, self.session_value())

    def state(self) -> str:
        """One line for the startup log: is the monitor on, and how is it protected."""
        if self.misconfigured:
            return (
                "monitor UI and API are OFF: RUNWATCH_ADMIN_TOKEN is not set (outside dev mode "
                "the monitor never runs open); /monitor and /api answer 503"
            )
        if self.open:
            return "monitor UI and API are OPEN to anyone who can reach them (dev mode, no token)"
        return "monitor UI and API need the admin token (RUNWATCH_ADMIN_TOKEN)"

    def require_api(self, request: Request) -> None:
        if self.misconfigured:
            raise HTTPException(503, "the monitor needs RUNWATCH_ADMIN_TOKEN outside dev mode")
        if not self.allowed(request):
            raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})


async def _reader(request: Request) -> AsyncIterator[MonitorReader]:
    store: MonitorStore = request.app.state.monitor_store
    async with store.reading() as reader:
        yield reader


Reader = Annotated[MonitorReader, Depends(_reader)]


class Problem(BaseModel):
    detail: str


class Page(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class RunDetail(BaseModel):
    run: dict[str, Any]
    verdict: dict[str, Any] | None
    events: list[dict[str, Any]]
    receipts: list[dict[str, Any]]
    violations: list[dict[str, Any]]


class AgentHealth(BaseModel):
    agent: str
    window_s: float
    ended: int = Field(description="runs of this agent that ended in the window")
    outcomes: dict[str, int]
    error_ratio: float | None = Field(description="share of ended runs with outcome error")
    restart_ratio: float | None = Field(
        description="share of ended runs with outcome runtime_restarted"
    )


class SloWindow(BaseModel):
    window_s: float
    delivery: dict[str, Any]
    completeness: dict[str, Any]
    persistence: dict[str, Any]
    open_runs: int = Field(description="runs without a terminal event, not stuck")
    stuck_runs: int
    agents: list[AgentHealth] = Field(description="per agent, worst first")


class Slo(BaseModel):
    hour: SloWindow
    day: SloWindow


Since = Annotated[str | None, Query(description=SINCE_HELP, max_length=40, pattern=SINCE_PATTERN)]


def _refused(exc: FilterError, value: str) -> RequestValidationError:
    """A filter value refused, with the standard 422 body the schema documents."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", exc.field), "msg": str(exc), "input": value}]
    )


def _time(value: str | None, now: int, field: str) -> int | None:
    """A ``since``/``until`` value, or 422."""
    if value is None:
        return None
    try:
        return parse_since(value, now, field)
    except FilterError as exc:
        raise _refused(exc, value) from None


def _text(field: str, value: str | None, limit: int) -> str | None:
    """A free-text filter the store can hold, or 422 (PostgreSQL refuses NUL in text)."""
    try:
        return check_text(field, value, limit)
    except FilterError as exc:
        raise _refused(exc, value or "") from None


def log_state(auth: MonitorAuth) -> None:
    """Say at startup whether the monitor is off, open or protected."""
    if auth.misconfigured:
        log.error(auth.state())
    elif auth.open:
        log.warning(auth.state())
    else:
        log.info(auth.state())


def build_api(settings: Settings, auth: MonitorAuth) -> APIRouter:
    """The API router; it reads the store set as ``app.state.monitor_store``."""
    log_state(auth)
    rules = rule_config(settings)
    router = APIRouter(
        prefix="/api",
        tags=["monitor"],
        dependencies=[Depends(auth.require_api)],
        responses={
            401: {"model": Problem, "description": "admin token required"},
            503: {"model": Problem, "description": "RUNWATCH_ADMIN_TOKEN not configured"},
        },
    )

    @router.get("/runs", response_model=Page, summary="Judged runs, failures first")
    async def runs(
        c: Reader,
        verdict: VerdictName | None = None,
        agent: Annotated[str | None, Query(max_length=200)] = None,
        user: Annotated[str | None, Query(max_length=200)] = None,
        rule: RuleName | None = None,
        state: StateName | None = None,
        thread: Annotated[str | None, Query(max_length=64, description="one thread id")] = None,
        since: Since = None,
        until: Since = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=300, pattern=RUN_CURSOR_PATTERN)] = None,
    ) -> Page:
        now = now_us()
        f = RunFilter(
            verdict=verdict,
            agent=_text("agent", agent, 200),
            user=_text("user", user, 200),
            rule=rule,
            state=state,
            since_us=_time(since, now, "since"),
            until_us=_time(until, now, "until"),
            thread=_text("thread", thread, 64),
        )
        items, nxt = views.runs_page(await c.list_runs(f, limit=limit, cursor=cursor))
        return Page(items=items, next_cursor=nxt)

    @router.get(
        "/runs/{run_id}",
        response_model=RunDetail,
        summary="One run: events, receipts, violations",
        responses={404: {"model": Problem, "description": "no such run"}},
    )
    async def run(c: Reader, run_id: str) -> RunDetail:
        # An id the store could not hold names no run (the same answer as any unknown id).
        detail = await c.run_detail(run_id) if len(run_id) <= 64 and holdable(run_id) else None
        if detail is None:
            raise HTTPException(404, "no such run")
        return RunDetail(**views.run_detail(detail))

    @router.get("/violations", response_model=Page, summary="Violations, newest first")
    async def violations(
        c: Reader,
        rule: RuleName | None = None,
        since: Since = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None, Query(max_length=20, pattern=VIOLATION_CURSOR_PATTERN)
        ] = None,
    ) -> Page:
        found, nxt = await c.list_violations(
            rule=rule,
            since_us=_time(since, now_us(), "since"),
            limit=limit,
            before_id=int(cursor) if cursor else None,
        )
        items = views.violation_items(found)
        return Page(items=items, next_cursor=str(nxt) if nxt is not None else None)

    @router.get("/slo", response_model=Slo, summary="SLO figures over the last hour and day")
    async def slo(c: Reader) -> Slo:
        now = now_us()
        windows = {}
        for name, seconds in (("hour", 3600.0), ("day", 86400.0)):
            figures = await views.slo_window(c, rules, now_us=now, window_s=seconds)
            health = await views.agents_window(c, now_us=now, window_s=seconds)
            windows[name] = SloWindow(**figures, agents=[AgentHealth(**a) for a in health])
        return Slo(**windows)

    return router
