"""The chat page's HTTP API under ``/api/me``: the signed-in user's agents, threads and runs.

Authenticated like ``/ws``: ``Authorization: Bearer <JWT>`` (in dev mode, the token
``POST /dev/token`` hands out). Everything is scoped to the token's user; another user's thread
answers 404 exactly like one that does not exist. The events of a run come over ``/ws`` with
``resume`` (replayed from the audit store), so this API only lists what there is to resume.

- ``GET /api/me``: who the token is for.
- ``GET /api/me/agents``: the agents a chat may name, with the default; agents that cannot run
  here (the ``llm`` agent without ``RUNWATCH_LLM_*``) are listed as unavailable, with the reason.
- ``GET /api/me/threads``: the user's threads, most recently active first, paged.
- ``GET /api/me/threads/{thread_id}``: one thread's runs, oldest first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from .auth import AuthError, Identity
from .store.reads import list_threads, thread_runs

if TYPE_CHECKING:
    from .server import Runtime

__all__ = ["agent_availability", "build_threads_router"]

log = logging.getLogger("runwatch.threads")

_CURSOR = r"^\d{1,18}:[0-9A-Za-z_-]{1,64}$"


class Problem(BaseModel):
    detail: str


class Me(BaseModel):
    user_id: str
    dev_mode: bool


class AgentInfo(BaseModel):
    name: str
    available: bool
    reason: str | None = Field(None, description="why it cannot run here, when unavailable")


class Agents(BaseModel):
    default: str
    agents: list[AgentInfo]


class Thread(BaseModel):
    thread_id: str
    title: str = Field(description="the first message of the thread, on one line")
    run_count: int
    created_at: str
    last_run_at: str


class Threads(BaseModel):
    items: list[Thread]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class Run(BaseModel):
    run_id: str
    agent: str
    input: str
    created_at: str
    ended_at: str | None
    outcome: str | None = Field(
        None, description="completed, error, cancelled, timeout, runtime_restarted; null if open"
    )
    last_seq: int | None


class ThreadRuns(BaseModel):
    thread_id: str
    runs: list[Run]


def _llm_problem() -> str | None:
    from .agents.llm import config_problem

    return config_problem()


#: Built-in agents that need configuration: name → why it cannot run now (or None).
AVAILABILITY: dict[str, Callable[[], str | None]] = {"llm": _llm_problem}


def agent_availability(names: list[str]) -> list[AgentInfo]:
    """Each agent with whether it can run in this process's environment."""
    infos = []
    for name in names:
        check = AVAILABILITY.get(name)
        reason = check() if check is not None else None
        infos.append(AgentInfo(name=name, available=reason is None, reason=reason))
    return infos


def _identity(request: Request) -> Identity:
    """The user of the request's bearer JWT, verified by the app's runtime."""
    rt: Runtime = request.app.state.runtime
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
    try:
        return rt.tokens.verify(token.strip())
    except AuthError as exc:
        raise HTTPException(401, exc.reason, headers={"WWW-Authenticate": "Bearer"}) from None


User = Annotated[Identity, Depends(_identity)]


def build_threads_router(rt: Runtime) -> APIRouter:
    """The ``/api/me`` router for one runtime (found as ``app.state.runtime`` per request);
    logs, once, each agent that cannot run."""
    for info in agent_availability(rt.engine.agents.names()):
        if not info.available:
            log.warning("agent %r is off: %s (hidden from the chat page)", info.name, info.reason)

    router = APIRouter(
        prefix="/api/me",
        tags=["chat"],
        responses={401: {"model": Problem, "description": "bearer token missing or refused"}},
    )

    @router.get("", response_model=Me, summary="Who the token is for")
    async def me(user: User) -> Me:
        return Me(user_id=user.user_id, dev_mode=rt.settings.dev_mode)

    @router.get("/agents", response_model=Agents, summary="Agents a chat may name")
    async def agents(user: User) -> Agents:
        registry = rt.engine.agents
        return Agents(default=registry.default, agents=agent_availability(registry.names()))

    @router.get("/threads", response_model=Threads, summary="Your threads, newest activity first")
    async def threads(
        user: User,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=90, pattern=_CURSOR)] = None,
    ) -> Threads:
        before = None
        if cursor is not None:
            us, _, thread_id = cursor.partition(":")
            before = (int(us), thread_id)
        async with rt.store.engine.connect() as conn:
            items, nxt = await list_threads(conn, user.user_id, limit=limit, before=before)
        return Threads(
            items=[Thread(**t.to_dict()) for t in items],
            next_cursor=f"{nxt[0]}:{nxt[1]}" if nxt else None,
        )

    @router.get(
        "/threads/{thread_id}",
        response_model=ThreadRuns,
        summary="One of your threads: its runs, oldest first",
        responses={404: {"model": Problem, "description": "no such thread (or not yours)"}},
    )
    async def thread(
        user: User, thread_id: str, limit: Annotated[int, Query(ge=1, le=500)] = 200
    ) -> ThreadRuns:
        runs = None
        if len(thread_id) <= 64:
            async with rt.store.engine.connect() as conn:
                runs = await thread_runs(conn, user.user_id, thread_id, limit=limit)
        if runs is None:
            raise HTTPException(404, "no such thread")
        return ThreadRuns(thread_id=thread_id, runs=[Run(**r.to_dict()) for r in runs])

    return router
