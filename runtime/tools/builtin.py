"""The built-in tools of the ``demo`` agent: real work, deterministic, offline.

Exceptions (defined in :mod:`runtime.errors`, the package's one tree)::

    CalculatorError     the expression is not arithmetic the calculator accepts
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import CalculatorError
from . import Tool

__all__ = [
    "CalculatorError",
    "calculator_tool",
    "clock_tool",
    "docs_search_tool",
    "evaluate",
    "fail_tool",
    "snippet",
    "wait_tool",
]


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 200
MAX_MAGNITUDE = 10**100


def evaluate(expression: str) -> int | float:
    """Evaluate arithmetic safely: numbers, + - * / // % ** (``^`` too), parentheses, and a few
    functions. Never ``eval``: the expression is parsed to an AST and only those nodes run."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    return _eval(tree.body)


def _check(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError("only numbers are allowed")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("result is too large")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 10**6):
            raise CalculatorError("exponent too large")
        try:
            return _check(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError as exc:
            raise CalculatorError("division by zero") from exc
        except OverflowError as exc:
            raise CalculatorError("result is too large") from exc
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS
        and not node.keywords
        and len(node.args) <= 5
    ):
        args = [_eval(a) for a in node.args]
        try:
            return _check(_FUNCS[node.func.id](*args))
        except (ValueError, TypeError) as exc:
            raise CalculatorError(f"{node.func.id}: {exc}") from exc
    raise CalculatorError(f"unsupported element: {type(node).__name__}")


def _calculate(expression: str) -> dict[str, Any]:
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    elif isinstance(value, float):
        value = round(value, 10)
    return {"expression": expression, "value": value}


def calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        func=_calculate,
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
        timeout_s=5,
    )


def _clock() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "date": now.strftime("%A %d %B %Y"),
        "time": now.strftime("%H:%M:%S UTC"),
    }


def clock_tool() -> Tool:
    return Tool(
        name="clock",
        description="The current date and time in UTC.",
        func=_clock,
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
        timeout_s=5,
    )


MAX_WAIT_S = 60


async def _wait(seconds: float) -> dict[str, Any]:
    seconds = max(0.0, min(float(seconds), MAX_WAIT_S))
    await asyncio.sleep(seconds)
    return {"waited_s": seconds}


def wait_tool() -> Tool:
    return Tool(
        name="wait",
        description=f"Wait for a number of seconds (at most {MAX_WAIT_S}).",
        func=_wait,
        parameters={
            "type": "object",
            "properties": {"seconds": {"type": "number"}},
            "required": ["seconds"],
            "additionalProperties": False,
        },
        timeout_s=MAX_WAIT_S + 5,
    )


def _fail(reason: str = "this tool always fails") -> None:
    raise RuntimeError(reason)


def fail_tool() -> Tool:
    return Tool(
        name="fail",
        description="Always raises: shows how a failing tool call looks.",
        func=_fail,
        parameters={"type": "object", "properties": {"reason": {"type": "string"}}},
        timeout_s=5,
    )


_WORD = re.compile(r"[A-Za-z0-9_]{2,}")


SNIPPET_CHARS = 240


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters, cut between words (never inside one)
    with an ellipsis; a code span the cut opened is closed again so it renders as code."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 1]
    if flat[limit - 1] != " " and " " in cut:
        cut = cut[: cut.rindex(" ")]
    cut = cut.rstrip(" ,;:.-")
    if cut.count("`") % 2:
        cut += "`"
    return cut + "…"


@dataclass(frozen=True, slots=True)
class _Paragraph:
    """One paragraph of a document, split into words once. A Markdown table keeps its rows
    (cells joined by " — ", with their words): a search shows only the rows that match."""

    file: str
    heading: str
    text: str
    words: Counter[str]
    rows: tuple[tuple[str, Counter[str]], ...] = ()


def _words(text: str) -> Counter[str]:
    return Counter(w.lower() for w in _WORD.findall(text))


def _paragraphs(path: Path, text: str) -> list[_Paragraph]:
    out = []
    heading = path.name
    for para in re.split(r"\n\s*\n", text):
        stripped = para.strip()
        if stripped.startswith("#"):
            heading = stripped.splitlines()[0].lstrip("#").strip()
        if stripped.startswith("|"):
            rows = []
            for line in stripped.splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if all(set(c) <= set("-: ") for c in cells):
                    continue  # the header separator
                rows.append((" — ".join(c for c in cells if c), _words(line)))
            out.append(_Paragraph(path.name, heading, "", Counter(), tuple(rows)))
        else:
            out.append(_Paragraph(path.name, heading, stripped, _words(stripped)))
    return out


class _DocIndex:
    """The documents, read and split once (again only when a file changes): a search is a
    scan of word counts, so the tool stays cheap for the event loop it shares the
    interpreter with."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._cache: dict[Path, tuple[float, list[_Paragraph]]] = {}

    def paragraphs(self) -> list[_Paragraph]:
        out: list[_Paragraph] = []
        for path in self.paths:
            try:
                mtime = path.stat().st_mtime
                cached = self._cache.get(path)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, _paragraphs(path, path.read_text(encoding="utf-8")))
                    self._cache[path] = cached
            except OSError:
                continue
            out.extend(cached[1])
        return out


def _search_docs(index: _DocIndex, query: str, limit: int = 5) -> dict[str, Any]:
    terms = {w.lower() for w in _WORD.findall(query)}
    if not terms:
        return {"query": query, "hits": []}
    hits: list[tuple[int, str, str, str]] = []
    for para in index.paragraphs():
        if para.rows:
            matched = [(text, words) for text, words in para.rows if terms & words.keys()]
            score = sum(words[t] for _text, words in matched for t in terms)
            text = "; ".join(t for t, _words in matched)
        else:
            score = sum(para.words[t] for t in terms)
            text = para.text
        if score:
            hits.append((score, para.file, para.heading, snippet(text)))
    hits.sort(key=lambda h: (-h[0], h[1], h[2]))
    return {
        "query": query,
        "hits": [
            {"file": f, "section": s, "snippet": snip, "score": score}
            for score, f, s, snip in hits[:limit]
        ],
    }


def default_docs_paths() -> list[str]:
    root = Path(__file__).resolve().parents[2]
    found = sorted((root / "docs").glob("*.md")) if (root / "docs").is_dir() else []
    readme = root / "README.md"
    return [str(p) for p in ([readme] if readme.is_file() else []) + found]


def docs_search_tool(paths: Iterable[str] = ()) -> Tool:
    index = _DocIndex([Path(p) for p in (list(paths) or default_docs_paths())])

    def docs_search(query: str) -> dict[str, Any]:
        return _search_docs(index, query)

    return Tool(
        name="docs_search",
        description="Search runwatch's own documentation.",
        func=docs_search,
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
        timeout_s=10,
    )
