"""Tools: registered callables with a JSON-schema description, called through ``ctx.tool``.

The engine, not the tool, emits ``tool_executing``/``tool_completed`` around every call (I4).

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    ToolArgumentError   the arguments do not match the tool's schema
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from ..errors import ToolArgumentError
from ..loading import import_object

__all__ = [
    "Tool",
    "ToolArgumentError",
    "ToolRegistry",
    "builtin_tools",
    "load_tool",
    "tool_from_callable",
]


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
                raise ToolArgumentError(self.name, f"missing argument {key!r}")
        for key, value in args.items():
            spec = props.get(key)
            if spec is None:
                if self.parameters.get("additionalProperties", True) is False:
                    raise ToolArgumentError(self.name, f"unexpected argument {key!r}")
                continue
            types = _JSON_TYPES.get(spec.get("type", ""), ())
            bad_bool = isinstance(value, bool) and spec.get("type") in ("integer", "number")
            if types and (not isinstance(value, types) or bad_bool):
                raise ToolArgumentError(self.name, f"{key!r} must be of type {spec['type']}")

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


_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean"}
_PY_TO_JSON_GENERIC = {dict: "object", list: "array"}


def tool_from_callable(func: Callable[..., Any], name: str | None = None) -> Tool:
    """A :class:`Tool` from a plain function: its name, its docstring's first paragraph as the
    description, and a JSON schema from its keyword parameters (``str``, ``int``, ``float``,
    ``bool``, ``dict``, ``list`` annotations; parameters without a default are required)."""
    hints = typing.get_type_hints(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(param.name)
        origin = typing.get_origin(hint) or hint
        kind = _PY_TO_JSON.get(origin) or _PY_TO_JSON_GENERIC.get(origin)  # type: ignore[arg-type]
        properties[param.name] = {"type": kind} if kind else {}
        if param.default is param.empty:
            required.append(param.name)
    doc = inspect.getdoc(func) or ""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return Tool(
        name=name or func.__name__,
        description=doc.split("\n\n", 1)[0].replace("\n", " ") or (name or func.__name__),
        func=func,
        parameters=schema,
    )


def load_tool(spec: str) -> Tool:
    """``[NAME=]module:object`` → a :class:`Tool`; ``object`` is a ``Tool`` or a function."""
    name, sep, target = spec.partition("=")
    if not sep:
        name, target = "", spec
    obj = import_object(target, "a tool as [NAME=]module:object")
    if isinstance(obj, Tool):
        return Tool(name or obj.name, obj.description, obj.func, obj.parameters, obj.timeout_s)
    if callable(obj):
        return tool_from_callable(obj, name or None)
    raise TypeError(f"{target} is neither a Tool nor a function")


def builtin_tools(docs_paths: Iterable[str] = (), extra: Iterable[str] = ()) -> ToolRegistry:
    """The built-in tools, those of the entry point group ``runwatch.tools`` (each a ``Tool`` or
    a function) and the ``extra`` ones given as ``[NAME=]module:object``."""
    from .builtin import calculator_tool, clock_tool, docs_search_tool, fail_tool, wait_tool

    registry = ToolRegistry(
        [calculator_tool(), clock_tool(), wait_tool(), docs_search_tool(docs_paths), fail_tool()]
    )
    for ep in entry_points(group="runwatch.tools"):
        registry.register(load_tool(f"{ep.name}={ep.value}"))
    for spec in extra:
        registry.register(load_tool(spec))
    return registry
