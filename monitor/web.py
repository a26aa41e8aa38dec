"""The monitor's web UI at ``/monitor``: server-rendered with Jinja2 (autoescaped), no CDN."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from runtime.config import Settings
from runtime.events import now_us
from runtime.metrics import PERSIST_SLO_S
from runtime.store.audit import AuditStore
from runtime.store.monitoring import MonitorStore, RunFilter
from runtime.tracing import run_id_of, trace_id_of, trace_url

from . import views
from .api import COOKIE, MonitorAuth
from .errors import FilterError
from .filters import (
    SINCE_HELP,
    check_text,
    holdable,
    parse_since,
    valid_run_cursor,
    violation_cursor,
)
from .rules import JUDGED_STATES, Rule, Verdict, rule_config

__all__ = ["build_web", "human_ms", "timeline_svg"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())

RULE_NAMES: tuple[str, ...] = tuple(r.value for r in Rule)
VERDICT_NAMES: tuple[str, ...] = tuple(v.value for v in Verdict)

#: An agent whose ended runs errored or were cut by a restart this often is shown red.
AGENT_BAD_RATIO = 0.05

DEFERRED_MEANING = (
    "deferred: emitted while the owner had no live connection (no tab open); it reaches the "
    "user by resume later, and is outside the delivery SLO"
)


def human_ms(ms: float) -> str:
    """Milliseconds in the unit a person reads: ``850 ms``, ``1.5 s``, ``2 min 5 s``."""
    if ms < 1:
        return f"{ms:.2g} ms" if ms else "0"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.3g} s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _pct(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:.2f}%"


def _status(ratio: float | None, objective: float) -> str:
    if ratio is None:
        return "none"
    return "ok" if ratio >= objective else "bad"


def timeline_svg(events: list[dict[str, Any]], slo_s: float) -> str:
    """One row per event: emit, commit, first send and first ack on a shared ms axis."""
    if not events:
        return "<p>No events.</p>"
    t0 = min(e["emitted_us"] for e in events)
    points = [
        v
        for e in events
        for v in (e["emitted_us"], e["committed_us"], e["first_sent_us"], e["first_acked_us"])
        if v is not None
    ]
    span = max(max(points) - t0, 1000)
    left, width, row = 230, 640, 18
    height = 30 + row * len(events)

    def x(us: int) -> float:
        return left + (us - t0) / span * width

    parts = [
        f'<svg class="timeline" viewBox="0 0 {left + width + 20} {height}" '
        f'width="{left + width + 20}" height="{height}" role="img" aria-label="event timeline">'
    ]
    for i in range(5):
        gx = left + width * i / 4
        parts.append(f'<line class="axis" x1="{gx:.1f}" y1="12" x2="{gx:.1f}" y2="{height}"/>')
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        tick = human_ms(span * i / 4 / 1000)
        parts.append(f'<text x="{gx:.1f}" y="10" text-anchor="{anchor}">{tick}</text>')
    for n, e in enumerate(events):
        y = 26 + n * row
        label = f"{e['seq']:>3} {e['type']}"
        parts.append(f'<text x="4" y="{y + 4}">{_esc(label)}</text>')
        end = e["first_acked_us"] or e["first_sent_us"] or e["committed_us"]
        late = (
            e["first_acked_us"] is not None and e["first_acked_us"] - e["emitted_us"] > slo_s * 1e6
        )
        cls = "span late" if late else "span"
        ex, cx = x(e["emitted_us"]), x(e["committed_us"])
        parts.append(f'<line class="{cls}" x1="{ex:.1f}" y1="{y}" x2="{x(end):.1f}" y2="{y}"/>')
        parts.append(_mark(f'<circle cx="{ex:.1f}" cy="{y}" r="4" fill="#175cd3">', "emitted"))
        box = f'x="{cx - 3.5:.1f}" y="{y - 3.5}" width="7" height="7"'
        parts.append(_mark(f'<rect {box} fill="#6941c6">', "committed", "rect"))
        if e["first_sent_us"] is not None:
            sx = x(e["first_sent_us"])
            tri = f"M{sx:.1f} {y - 5} L{sx + 5:.1f} {y + 4} L{sx - 5:.1f} {y + 4} Z"
            parts.append(_mark(f'<path d="{tri}" fill="#b54708">', "first sent", "path"))
        if e["first_acked_us"] is not None:
            ax = x(e["first_acked_us"])
            dia = f"M{ax:.1f} {y - 5} L{ax + 5:.1f} {y} L{ax:.1f} {y + 5} L{ax - 5:.1f} {y} Z"
            parts.append(_mark(f'<path d="{dia}" fill="#12805c">', "first acked", "path"))
    parts.append("</svg>")
    return "".join(parts)


def _mark(opening: str, title: str, tag: str = "circle") -> str:
    return f"{opening}<title>{title}</title></{tag}>"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ms(us: int | None, base: int) -> str:
    return "—" if us is None else human_ms((us - base) / 1000)


def _share(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:.1f}%"


def build_web(store: AuditStore, settings: Settings, auth: MonitorAuth) -> APIRouter:
    """The UI router, reading ``store``."""
    reads = MonitorStore(store)
    rules = rule_config(settings)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["human_ms"] = human_ms
    router = APIRouter(prefix="/monitor", include_in_schema=False)

    def not_found(request: Request, what: str) -> Response:
        return templates.TemplateResponse(
            request, "not_found.html", {"what": what}, status_code=404
        )

    def gate(request: Request) -> Response | None:
        if auth.misconfigured:
            return HTMLResponse(
                "<h1>Monitor disabled</h1><p>Set RUNWATCH_ADMIN_TOKEN: outside dev mode the "
                "monitor never runs open.</p>",
                status_code=503,
            )
        if not auth.allowed(request):
            return RedirectResponse("/monitor/login", status_code=303)
        return None

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": None})

    @router.post("/login")
    async def login(request: Request, token: str = Form(...)) -> Response:
        if not auth.check_token(token):
            return templates.TemplateResponse(
                request, "login.html", {"error": "That token is not right."}, status_code=401
            )
        response = RedirectResponse("/monitor", status_code=303)
        response.set_cookie(
            COOKIE, auth.session_value(), httponly=True, samesite="strict", max_age=12 * 3600
        )
        return response

    @router.get("")
    @router.get("/")
    async def overview(request: Request) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        now = now_us()
        async with reads.reading() as reader:
            hour = await views.slo_window(reader, rules, now_us=now, window_s=3600)
            day = await views.slo_window(reader, rules, now_us=now, window_s=86400)
            counts = await reader.violation_counts(since_us=now - 86400 * 1_000_000)
            failing, _ = views.runs_page(
                await reader.list_runs(RunFilter(verdict=Verdict.FAIL.value), limit=20, cursor=None)
            )
            agents = {
                q: await views.agents_window(reader, now_us=now, window_s=seconds)
                for q, seconds in (("1h", 3600), ("1d", 86400))
            }
        tiles = []
        for key, label in (
            ("delivery", f"Delivered within {human_ms(rules.delivery_slo_s * 1000)}"),
            ("completeness", "Runs passing every rule"),
            ("persistence", f"Committed within {human_ms(PERSIST_SLO_S * 1000)}"),
        ):
            for window, fig, q in (("1 h", hour, "1h"), ("24 h", day, "1d")):
                m = fig[key]
                href = f"/monitor/runs?verdict=fail&since={q}"
                if key == "delivery":
                    href += "&rule=delivery_slo"
                tiles.append(
                    {
                        "key": f"{key}-{q}",
                        "label": f"{label}, last {window}",
                        "value": _pct(m["ratio"]),
                        "detail": f"{m['good']} of {m['total']} "
                        f"(objective {m['objective'] * 100:.1f}%)",
                        "status": _status(m["ratio"], m["objective"]),
                        "href": href,
                    }
                )
        tiles.append(
            {
                "key": "stuck",
                "label": "Stuck runs",
                "value": str(day["stuck_runs"]),
                "detail": "open past timeout + grace",
                "status": "bad" if day["stuck_runs"] else "ok",
                "href": "/monitor/runs?state=stuck",
            }
        )
        tiles.append(
            {
                "key": "open",
                "label": "Open runs",
                "value": str(day["open_runs"]),
                "detail": "in progress now (no terminal event yet)",
                "status": "none",
                "href": "/monitor/runs",
            }
        )
        # Beside the SLO tiles: a crash-looping agent fails no rule (its runs end properly with
        # runtime_restarted) but must not look green.
        for q, window in (("1h", "1 h"), ("1d", "24 h")):
            worst = agents[q][0] if agents[q] else None
            bad_share = (
                (worst["error_ratio"] or 0) + (worst["restart_ratio"] or 0) if worst else None
            )
            tiles.append(
                {
                    "key": f"agents-{q}",
                    "label": f"Agent errors and restarts, last {window}",
                    "value": "—" if worst is None else _share(bad_share),
                    "detail": "no run ended"
                    if worst is None
                    else f"worst: {worst['agent']}, {worst['outcomes']['error']} errors and "
                    f"{worst['outcomes']['runtime_restarted']} restarts of {worst['ended']}",
                    "status": "none"
                    if bad_share is None
                    else "bad"
                    if bad_share >= AGENT_BAD_RATIO
                    else "warn"
                    if bad_share > 0
                    else "ok",
                    "href": "#agents",
                }
            )
        tiles.sort(key=lambda t: {"bad": 0, "warn": 1, "ok": 2, "none": 3}[t["status"]])
        # Worst first: a cross-user delivery before everything else, then by count.
        ranked = sorted(counts.items(), key=lambda rc: (rc[0] != Rule.ISOLATION, -rc[1]))
        by_rule = [{"rule": r, "count": n, "meaning": _meaning(r)} for r, n in ranked]
        hour_by_agent = {a["agent"]: a for a in agents["1h"]}
        agent_rows = [
            {
                "agent": a["agent"],
                "hour": hour_by_agent.get(a["agent"]),
                "day": a,
                "bad": (a["error_ratio"] or 0) + (a["restart_ratio"] or 0) >= AGENT_BAD_RATIO,
            }
            for a in agents["1d"]
        ]
        return templates.TemplateResponse(
            request,
            "overview.html",
            {
                "tiles": tiles,
                "by_rule": by_rule,
                "runs": failing,
                "agents": agent_rows,
                "share": _share,
            },
        )

    @router.get("/runs")
    async def runs(
        request: Request,
        verdict: str | None = None,
        agent: str | None = None,
        user: str | None = None,
        rule: str | None = None,
        state: str | None = None,
        since: str | None = None,
        until: str | None = None,
        thread: str | None = None,
        cursor: str | None = None,
    ) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        now = now_us()
        # The same rules as the API: a bad value is refused with 422 and explained, never
        # silently dropped (a dropped filter would show everything and look like an answer).
        errors: list[FilterError] = []

        def pick(name: str, value: str | None, allowed: Collection[str]) -> str | None:
            if not value:
                return None
            if value not in allowed:
                expected = f"expected one of {', '.join(sorted(allowed))}"
                errors.append(FilterError(name, expected, value))
                return None
            return value

        def when(name: str, value: str | None) -> int | None:
            if not value:
                return None
            try:
                return parse_since(value, now, name)
            except FilterError as exc:
                errors.append(exc)
                return None

        def text(name: str, value: str | None, limit: int) -> str | None:
            try:
                return check_text(name, value, limit)
            except FilterError as exc:
                errors.append(exc)
                return None

        f = RunFilter(
            verdict=pick("verdict", verdict, VERDICT_NAMES),
            agent=text("agent", agent, 200),
            user=text("user", user, 200),
            rule=pick("rule", rule, RULE_NAMES),
            state=pick("state", state, JUDGED_STATES),
            since_us=when("since", since),
            until_us=when("until", until),
            thread=text("thread", thread, 64),
        )
        if cursor and not valid_run_cursor(cursor):
            errors.append(FilterError("cursor", "not a cursor this page gave out"))
        items: list[dict[str, Any]] = []
        nxt = None
        if not errors:
            async with reads.reading() as reader:
                items, nxt = views.runs_page(await reader.list_runs(f, limit=50, cursor=cursor))
        params = {
            k: v
            for k, v in {
                "verdict": f.verdict,
                "agent": f.agent,
                "user": f.user,
                "rule": f.rule,
                "state": f.state,
                "since": since if f.since_us is not None else None,
                "until": until if f.until_us is not None else None,
                "thread": f.thread,
            }.items()
            if v
        }
        next_href = "/monitor/runs?" + urlencode({**params, "cursor": nxt}) if nxt else None
        return templates.TemplateResponse(
            request,
            "runs.html",
            {
                "runs": items,
                "f": f,
                "since": since or "",
                "until": until or "",
                "since_help": SINCE_HELP,
                "errors": errors,
                "rules": list(RULE_NAMES),
                "next_cursor": nxt,
                "next_href": next_href,
            },
            status_code=422 if errors else 200,
        )

    @router.get("/runs/{run_id}")
    async def run(request: Request, run_id: str) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        detail = None
        if holdable(run_id):
            async with reads.reading() as reader:
                detail = await reader.run_detail(run_id[:64])
        if detail is None:
            return not_found(request, f"No run {run_id[:64]!r} in the audit store.")
        d = views.run_detail(detail)
        for e in d["events"]:
            e["data_json"] = json.dumps(e["data"], ensure_ascii=False)[:4000]
            e["commit_ms"] = _ms(e["committed_us"], e["emitted_us"])
            e["send_ms"] = _ms(e["first_sent_us"], e["emitted_us"])
            e["ack_ms"] = _ms(e["first_acked_us"], e["emitted_us"])
            e["late"] = (
                e["first_acked_us"] is not None
                and e["first_acked_us"] - e["emitted_us"] > rules.delivery_slo_s * 1e6
            )
        svg = timeline_svg(d["events"], rules.delivery_slo_s)
        # Traces (docs/tracing.md): the run's trace id is its run id's 128 bits.
        trace = {
            "trace_id": trace_id_of(run_id[:64]),
            "trace_url": trace_url(settings.trace_url_template, run_id[:64]),
        }
        return templates.TemplateResponse(
            request, "run.html", {"d": d, "svg": svg, "deferred": DEFERRED_MEANING, **trace}
        )

    @router.get("/traces/{trace_id}")
    async def trace_to_run(request: Request, trace_id: str) -> Response:
        """A trace viewer links here with a trace id: the run page of that trace's run."""
        if (denied := gate(request)) is not None:
            return denied
        run_id = run_id_of(trace_id.strip().lower())
        if run_id is None:
            return not_found(request, f"{trace_id[:64]!r} is not a trace id (32 hex digits).")
        return RedirectResponse(f"/monitor/runs/{run_id}", status_code=303)

    @router.get("/violations")
    async def violations(
        request: Request, rule: str | None = None, cursor: str | None = None
    ) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        # As on the runs page: a bad value is refused with 422, never dropped (a dropped rule
        # would list every violation and look like the answer).
        errors: list[FilterError] = []
        if rule and rule not in RULE_NAMES:
            errors.append(
                FilterError("rule", f"expected one of {', '.join(sorted(RULE_NAMES))}", rule)
            )
        before = None
        if cursor:
            try:
                before = violation_cursor(cursor)
            except FilterError as exc:
                errors.append(exc)
        items: list[dict[str, Any]] = []
        nxt = None
        if not errors:
            async with reads.reading() as reader:
                found, nxt = await reader.list_violations(
                    rule=rule or None, since_us=None, limit=100, before_id=before
                )
            items = views.violation_items(found)
        return templates.TemplateResponse(
            request,
            "violations.html",
            {
                "items": items,
                "rule": rule if rule in RULE_NAMES else None,
                "rules": list(RULE_NAMES),
                "next_cursor": nxt,
                "errors": errors,
            },
            status_code=422 if errors else 200,
        )

    @router.get("/static/{name}")
    async def static(request: Request, name: str) -> Response:
        # Served here, before the catch-all below, by exact name (no path ever reaches the disk).
        if name not in STATIC_FILES:
            return not_found(request, f"No static file {name[:100]!r}.")
        return FileResponse(STATIC / name)

    @router.get("/{path:path}")
    async def unknown(request: Request, path: str) -> Response:
        if (denied := gate(request)) is not None:
            return denied
        return not_found(request, f"There is no monitor page at /monitor/{path[:200]}.")

    return router


def _meaning(rule: str) -> str:
    return Rule(rule).meaning if rule in RULE_NAMES else ""
