"""A self-contained API reference at ``/api/docs``: rendered on the server from the app's own
OpenAPI schema, with inline CSS and no script, so it works offline (no CDN, nothing to fetch).

The machine-readable schema stays at ``/api/openapi.json``.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

__all__ = ["build_docs_router", "render_docs"]

_METHODS = ("get", "post", "put", "patch", "delete")

_CSS = """
:root { color-scheme: light dark; --line: #d0d5dd; --muted: #667085; --get: #175cd3;
  --post: #12805c; font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
body { margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 60rem; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
pre { overflow-x: auto; padding: .6rem; border: 1px solid var(--line); border-radius: 6px; }
.op { border: 1px solid var(--line); border-radius: 8px; padding: .6rem .9rem; margin: .8rem 0; }
.op h3 { margin: 0; font-size: 1rem; display: flex; gap: .6rem; align-items: baseline; }
.method { font: 700 .75rem ui-monospace, monospace; padding: .1rem .45rem; border-radius: 4px;
  color: #fff; background: var(--get); text-transform: uppercase; }
.method.post { background: var(--post); }
.summary { color: var(--muted); font-weight: 400; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; margin: .4rem 0; }
th, td { text-align: left; border-bottom: 1px solid var(--line); padding: .25rem .4rem;
  vertical-align: top; }
.muted { color: var(--muted); }
nav a { margin-right: 1rem; }
"""


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "format" in schema:
        kind += f" ({schema['format']})"
    if "pattern" in schema:
        kind += f", pattern {schema['pattern']}"
    return kind


def _limits(schema: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("exclusiveMinimum", ">"),
        ("maxLength", "length ≤"),
    ):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    return ", ".join(parts)


def _operation(method: str, path: str, op: dict[str, Any]) -> str:
    out = [
        f'<section class="op" id="{escape(op.get("operationId", path))}">',
        f'<h3><span class="method {method}">{method}</span><code>{escape(path)}</code>'
        f'<span class="summary">{escape(op.get("summary", ""))}</span></h3>',
    ]
    if op.get("description"):
        out.append(f"<p>{escape(op['description'])}</p>")
    params = op.get("parameters", [])
    if params:
        out.append(
            "<table><thead><tr><th>parameter</th><th>in</th><th>type</th><th>required</th>"
            "<th>notes</th></tr></thead><tbody>"
        )
        for p in params:
            schema = p.get("schema", {})
            notes = " ".join(x for x in (p.get("description", ""), _limits(schema)) if x)
            out.append(
                f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
                f"<td><code>{escape(_type(schema))}</code></td>"
                f"<td>{'yes' if p.get('required') else ''}</td><td>{escape(notes)}</td></tr>"
            )
        out.append("</tbody></table>")
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        out.append(
            f"<p>Body <code>{escape(media)}</code>: "
            f"<code>{escape(_type(content.get('schema', {})))}</code></p>"
        )
    out.append("<table><thead><tr><th>status</th><th>meaning</th><th>body</th></tr></thead><tbody>")
    for status, response in op.get("responses", {}).items():
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        out.append(
            f"<tr><td>{escape(status)}</td><td>{escape(response.get('description', ''))}</td>"
            f"<td><code>{escape(_type(schema)) if schema else ''}</code></td></tr>"
        )
    out.append("</tbody></table></section>")
    return "".join(out)


def render_docs(schema: dict[str, Any]) -> str:
    """The reference page for an OpenAPI schema, as one HTML document."""
    info = schema.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    groups: dict[str, list[str]] = {}
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                tag = (item[method].get("tags") or ["other"])[0]
                groups.setdefault(tag, []).append(_operation(method, path, item[method]))
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)} · API reference</title>",
        '<link rel="icon" href="data:,">',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}: API reference</h1>",
        '<p class="muted">Generated from <a href="/api/openapi.json">/api/openapi.json</a>. '
        "<code>monitor</code> operations take the admin token "
        "(<code>Authorization: Bearer $RUNWATCH_ADMIN_TOKEN</code>; open in dev mode); "
        "<code>chat</code> operations take a user's JWT, as <code>/ws</code> does.</p>",
        "<nav>" + "".join(f'<a href="#tag-{escape(t)}">{escape(t)}</a>' for t in groups) + "</nav>",
    ]
    for tag, ops in groups.items():
        parts.append(f'<h2 id="tag-{escape(tag)}">{escape(tag)}</h2>')
        parts.extend(ops)
    models = schema.get("components", {}).get("schemas", {})
    if models:
        parts.append("<h2>Schemas</h2>")
        for name, model in models.items():
            text = json.dumps(model, indent=2, ensure_ascii=False)
            parts.append(
                f'<details id="schema-{escape(name)}"><summary><code>{escape(name)}</code>'
                f"</summary><pre>{escape(text)}</pre></details>"
            )
    parts.append("</body></html>")
    return "".join(parts)


def build_docs_router() -> APIRouter:
    """``GET /api/docs``; mount it on an app built with ``docs_url=None``."""
    router = APIRouter(include_in_schema=False)

    @router.get("/api/docs")
    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(render_docs(request.app.openapi()))

    return router
