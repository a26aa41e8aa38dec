"""Tools: registered callables with a JSON-schema description, called through ``ctx.tool``.

The engine, not the tool, emits ``tool_executing``/``tool_completed`` around every call (I4).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tool", "ToolArgumentError", "ToolRegistry", "builtin_tools"]


class ToolArgumentError(ValueError):
    """The arguments do not match the tool's schema."""


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class Tool:
    """A callable the agents may use. ``func`` takes keyword arguments, sync or async."""

    name: str
    description: str
    func: Callable[..., Any]
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout_s: float | None = None

    def validate(self, args: dict[str, Any]) -> None:
        """Check required keys and top-level types against ``parameters``."""
        props: dict[str, Any] = self.parameters.get("properties", {})
        for key in self.parameters.get("required", []):
            if key not in args:
                raise ToolArgumentError(f"{self.name}: missing argument {key!r}")
        for key, value in args.items():
            spec = props.get(key)
            if spec is None:
                if self.parameters.get("additionalProperties", True) is False:
                    raise ToolArgumentError(f"{self.name}: unexpected argument {key!r}")
                continue
            types = _JSON_TYPES.get(spec.get("type", ""), ())
            bad_bool = isinstance(value, bool) and spec.get("type") in ("integer", "number")
            if types and (not isinstance(value, types) or bad_bool):
                raise ToolArgumentError(f"{self.name}: {key!r} must be of type {spec['type']}")

    async def call(self, args: dict[str, Any]) -> Any:
        self.validate(args)
        if inspect.iscoroutinefunction(self.func):
            return await self.func(**args)
        # A sync tool runs in a thread so it never blocks the event loop.
        return await asyncio.to_thread(self.func, **args)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function description."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolRegistry:
    """Tools by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [self._tools[n].schema() for n in self.names()]


def builtin_tools(docs_paths: Iterable[str] = ()) -> ToolRegistry:
    from .builtin import calculator_tool, clock_tool, docs_search_tool, fail_tool, wait_tool

    return ToolRegistry(
        [calculator_tool(), clock_tool(), wait_tool(), docs_search_tool(docs_paths), fail_tool()]
    )
