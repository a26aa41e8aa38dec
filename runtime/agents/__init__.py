"""Agents: async functions of a :class:`RunContext`; their return value is the final report.

An agent never emits lifecycle events itself: it calls ``ctx.think``, ``ctx.delta`` and
``await ctx.tool(...)``, and the engine emits ``agent_thinking``, ``text_delta`` and the
``tool_executing``/``tool_completed`` pair around every tool call.

Agents are found by name in an :class:`AgentRegistry`: the built-ins (``demo``, ``llm``), any
``--agent module:function`` given on the command line, and the entry point group
``runwatch.agents``.

An agent that calls a model may report each call with ``ctx.model_round(ModelRound(...))``:
it becomes the ``chat {model}`` span of the run's trace (docs/tracing.md); agents that do not
report rounds work the same, their traces simply have no model spans.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    ToolError       a tool call failed, as the agent sees it (``await ctx.tool`` raises it)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from ..errors import ToolError
from ..loading import import_object

__all__ = [
    "Agent",
    "AgentRegistry",
    "ModelRound",
    "RunContext",
    "RunTelemetry",
    "ToolError",
    "load_agent",
]


@dataclass(frozen=True, slots=True)
class ModelRound:
    """One call of an agent to a model, reported for the run's trace (a ``chat {model}`` span).

    Times are wall-clock epoch microseconds (``runtime.events.now_us``); ``first_chunk_s`` is
    the time from the request to the first streamed chunk. ``messages`` (the request's chat
    messages), ``output_text`` and ``output_tool_calls`` (``{id, name, arguments}``) are
    exported only when message content capture is on.
    """

    model: str
    started_us: int
    ended_us: int
    provider: str = "openai"
    operation: str = "chat"
    first_chunk_s: float | None = None
    response_model: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reasons: tuple[str, ...] = ()
    error_type: str | None = None
    error_message: str = ""
    server_address: str | None = None
    server_port: int | None = None
    messages: Sequence[Mapping[str, Any]] = ()
    output_text: str = ""
    output_tool_calls: Sequence[Mapping[str, Any]] = ()


class RunTelemetry(Protocol):
    """Where the engine forwards what agents report beyond events (the run tracer)."""

    def model_round(self, run_id: str, report: ModelRound) -> None: ...


class RunContext(Protocol):
    """What an agent can do during a run."""

    run_id: str
    thread_id: str
    user_id: str
    input: str
    agent: str

    async def think(self, text: str) -> None: ...

    async def delta(self, text: str) -> None: ...

    async def tool(self, name: str, args: dict[str, Any] | None = None) -> Any: ...

    def tool_schemas(self) -> list[dict[str, Any]]: ...

    def model_round(self, report: ModelRound) -> None:
        """Report a finished model call for the run's trace (a no-op when tracing is off)."""
        ...


Agent = Callable[[RunContext], Awaitable[str]]


def load_agent(spec: str) -> Agent:
    """``module:function`` → the function."""
    obj = import_object(spec, "an agent as module:function")
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return cast(Agent, obj)


class AgentRegistry:
    """Agents by name; the first registered is the default unless one is named."""

    def __init__(self, agents: Iterable[tuple[str, Agent]] = (), default: str = "demo") -> None:
        self._agents: dict[str, Agent] = dict(agents)
        self.default = default

    def register(self, name: str, agent: Agent) -> None:
        self._agents[name] = agent

    def get(self, name: str | None) -> Agent | None:
        return self._agents.get(name or self.default)

    def names(self) -> list[str]:
        return sorted(self._agents)

    @classmethod
    def with_builtins(cls, extra: Iterable[str] = ()) -> AgentRegistry:
        from .demo import demo_agent

        registry = cls([("demo", demo_agent), ("llm", _llm_agent)])
        for ep in entry_points(group="runwatch.agents"):
            registry.register(ep.name, ep.load())
        for spec in extra:
            name, sep, target = spec.partition("=")
            if not sep:
                target = name
                name = spec.rpartition(":")[2]
            registry.register(name, load_agent(target))
        return registry


async def _llm_agent(ctx: RunContext) -> str:
    # Imported on first use: the HTTP client stack is only loaded when the agent runs.
    from .llm import llm_agent

    return await llm_agent(ctx)
