"""The monitor's JSON API: auth, filters, paging, errors, and schemathesis on its schema."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis.specs.openapi.checks import positive_data_acceptance

from monitor.api import RuleName
from monitor.checker import Checker, CheckerConfig
from monitor.metrics import MonitorMetrics
from monitor.rules import Rule
from monitor.service import create_monitor_app
from runtime.config import Settings
from runtime.events import ErrorCode, new_id
from runtime.store.audit import AuditStore, Batch, RunInfo

from .conftest import JWT_SECRET
from .test_checker import CONFIG, lifecycle, now_us, write_corpus

ADMIN = "admin-token-for-tests-0123456789"


async def corpus_db(url: str) -> dict[str, str]:
    store = AuditStore.open(url)
    try:
        runs = await write_corpus(store)
        await Checker(store, MonitorMetrics(CollectorRegistry()), CONFIG).catch_up()
        return runs
    finally:
        await store.close()


@pytest.fixture
async def monitor_db(sqlite_db: str) -> tuple[str, dict[str, str]]:
    return sqlite_db, await corpus_db(sqlite_db)


@pytest.fixture
async def api(monitor_db: tuple[str, dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=monitor_db[0], jwt_secret=JWT_SECRET, admin_token=ADMIN)
    app = create_monitor_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as client:
            yield client


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_rule_names_in_the_schema_are_the_rules() -> None:
    assert set(typing.get_args(RuleName)) == {r.value for r in Rule}


async def test_auth_required_outside_dev_mode(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/runs")).status_code == 401
    assert (
        await api.get("/api/runs", headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    assert (await api.get("/api/runs", headers=auth())).status_code == 200
    page = await api.get("/monitor")
    assert page.status_code == 303 and page.headers["location"] == "/monitor/login"
    bad = await api.post("/monitor/login", data={"token": "nope"})
    assert bad.status_code == 401
    good = await api.post("/monitor/login", data={"token": ADMIN})
    assert good.status_code == 303
    cookie = good.cookies.get("runwatch_monitor")
    assert cookie and ADMIN not in cookie
    api.cookies.set("runwatch_monitor", cookie)
    assert (await api.get("/api/runs")).status_code == 200
    assert (await api.get("/monitor")).status_code == 200
    api.cookies.clear()


async def test_no_admin_token_outside_dev_mode_refuses(sqlite_db: str) -> None:
    app = create_monitor_app(Settings(database_url=sqlite_db, jwt_secret=JWT_SECRET))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c,
    ):
        assert (await c.get("/api/runs")).status_code == 503
        assert (await c.get("/monitor")).status_code == 503


async def test_filters_and_paging(
    api: httpx.AsyncClient, monitor_db: tuple[str, dict[str, str]]
) -> None:
    runs = monitor_db[1]
    failing = (await api.get("/api/runs", params={"verdict": "fail"}, headers=auth())).json()
    assert len(failing["items"]) == len(runs) - 1
    leak = (await api.get("/api/runs", params={"rule": "isolation"}, headers=auth())).json()
    assert [r["run_id"] for r in leak["items"]] == [runs["leak"]]
    passing = (await api.get("/api/runs", params={"verdict": "pass"}, headers=auth())).json()
    assert [r["run_id"] for r in passing["items"]] == [runs["healthy"]]
    stuck = (await api.get("/api/runs", params={"state": "stuck"}, headers=auth())).json()
    assert [r["run_id"] for r in stuck["items"]] == [runs["stuck"]]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/api/runs", params=params, headers=auth())).json()
        seen += [r["run_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == len(runs)
    assert seen[-1] == runs["healthy"], "failures first"
    nobody = (await api.get("/api/runs", params={"user": "' OR 1=1 --"}, headers=auth())).json()
    assert nobody["items"] == []


async def test_run_detail_violations_and_slo(
    api: httpx.AsyncClient, monitor_db: tuple[str, dict[str, str]]
) -> None:
    runs = monitor_db[1]
    detail = (await api.get(f"/api/runs/{runs['late_ack']}", headers=auth())).json()
    assert detail["verdict"]["verdict"] == "fail"
    assert [v["rule"] for v in detail["violations"]] == ["delivery_slo"]
    first = detail["events"][0]
    assert first["first_acked_us"] - first["emitted_us"] == 3_000_000
    assert (await api.get("/api/runs/nope", headers=auth())).status_code == 404
    v = (await api.get("/api/violations", params={"rule": "tool_pairing"}, headers=auth())).json()
    expected = {runs["unpaired_tool"], runs["orphan_completion"], runs["stuck"]}
    assert {x["run_id"] for x in v["items"]} == expected
    slo = (await api.get("/api/slo", headers=auth())).json()
    assert slo["day"]["completeness"]["total"] == len(runs)
    assert slo["day"]["completeness"]["good"] == 1
    assert slo["day"]["stuck_runs"] == 1
    bad = await api.get("/api/runs", params={"since": "yesterday"}, headers=auth())
    assert bad.status_code == 422 and "since" in bad.text
    assert (await api.get("/api/runs", params={"rule": "bogus"}, headers=auth())).status_code == 422


def test_api_conforms_to_its_schema(sqlite_db: str) -> None:
    """schemathesis: generated requests for every operation; every response valid per the
    schema and no server error."""
    import asyncio

    asyncio.run(corpus_db(sqlite_db))
    app_settings = Settings(database_url=sqlite_db, jwt_secret=JWT_SECRET, admin_token=ADMIN)
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_monitor_app(app_settings))
    failures = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(
            max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=operation.as_strategy())
        def check(case: typing.Any) -> None:
            # A pattern cannot say which dates exist: `since=2026-11-31` matches the schema's
            # pattern and is refused with a documented 422, so that check is left out here and
            # acceptance of every valid form is asserted in test_since_forms_are_the_pages.
            case.call_and_validate(headers=auth(), excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert operations == 4
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    "since",
    ["1h", "24h", "7d", "90m", "2020-01-01T00:00:00Z", "2020-01-01T02:00:00+02:00", "2020-01-01"],
)
async def test_since_forms_are_the_pages(
    api: httpx.AsyncClient, monitor_db: tuple[str, dict[str, str]], since: str
) -> None:
    """`since` takes the UI's own forms (1h, 24h) and RFC 3339, in the API as in the page."""
    runs = monitor_db[1]
    body = (await api.get("/api/runs", params={"since": since}, headers=auth())).json()
    assert len(body["items"]) == len(runs)
    page = await api.get("/monitor/runs", params={"since": since}, headers=auth())
    assert page.status_code == 200
    assert page.text.count("data-run-id=") == len(runs)


@pytest.mark.parametrize("since", ["abc", "yesterday", "1y", "2026-02-30", "-1h"])
async def test_bad_filters_are_refused_alike_by_page_and_api(
    api: httpx.AsyncClient, since: str
) -> None:
    api_answer = await api.get("/api/runs", params={"since": since}, headers=auth())
    assert api_answer.status_code == 422
    assert api_answer.json()["detail"][0]["loc"] == ["query", "since"]
    page = await api.get("/monitor/runs", params={"since": since}, headers=auth())
    assert page.status_code == 422
    assert "since" in page.text and "1h" in page.text, "the page says what it expects"
    assert "data-run-id=" not in page.text, "a bad filter never shows everything"
    for params in ({"verdict": "maybe"}, {"rule": "bogus"}, {"state": "x"}, {"until": "soon"}):
        assert (await api.get("/monitor/runs", params=params, headers=auth())).status_code == 422
        assert (await api.get("/api/runs", params=params, headers=auth())).status_code == 422


async def _client_for(url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=url, jwt_secret=JWT_SECRET, admin_token=ADMIN)
    app = create_monitor_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://monitor", headers=auth()
        ) as client:
            yield client


async def test_values_the_store_cannot_hold_are_refused_not_500(db_url: str) -> None:
    """PostgreSQL text holds no NUL: a filter or run id with one gets 422 or 404 on both
    stores, in the API as in the page, never a 500 from the driver."""
    await corpus_db(db_url)
    async for client in _client_for(db_url):
        for name in ("agent", "user", "thread"):
            for path in ("/api/runs", "/monitor/runs"):
                answer = await client.get(path, params={name: "a\x00b"})
                assert answer.status_code == 422, (path, name, answer.text[:200])
                assert name in answer.text
        assert (await client.get("/api/runs/a%00b")).status_code == 404
        assert (await client.get("/monitor/runs/a%00b")).status_code == 404


async def test_cursors_take_ascii_digits_only_and_the_violations_page_refuses_bad_filters(
    api: httpx.AsyncClient,
) -> None:
    """``str.isdigit`` takes "²" and ``int`` does not: such cursors are refused with 422, as a
    rule the violations page does not know is (it used to list every violation)."""
    for path, params in (
        ("/monitor/runs", {"cursor": "1:\u00b2:abc"}),
        ("/api/runs", {"cursor": "1:\u00b2:abc"}),
        ("/api/runs", {"cursor": "1:\u0663:abc"}),
        ("/monitor/violations", {"cursor": "\u00b2"}),
        ("/api/violations", {"cursor": "\u0663"}),
        ("/monitor/violations", {"rule": "isolaton"}),
        ("/api/runs", {"since": "\u0663h"}),
    ):
        answer = await api.get(path, params=params, headers=auth())
        assert answer.status_code == 422, (path, params, answer.text[:200])
    page = await api.get("/monitor/violations", params={"rule": "isolaton"}, headers=auth())
    assert "not valid" in page.text and "/monitor/runs/" not in page.text
    ok = await api.get("/monitor/violations", params={"rule": "isolation"}, headers=auth())
    assert ok.status_code == 200


async def test_an_unreachable_store_answers_503_with_retry_after() -> None:
    """Reads while the store is down: 503 and ``Retry-After``, JSON for the API and a page
    for the UI, never an anonymous 500."""
    async for client in _client_for("postgresql+asyncpg://postgres@127.0.0.1:1/none"):
        for path in ("/api/runs", "/api/slo", "/api/violations", "/monitor", "/monitor/runs"):
            answer = await client.get(path)
            assert answer.status_code == 503, (path, answer.text[:200])
            assert answer.headers["retry-after"] == "5"
            if path.startswith("/api"):
                assert answer.json() == {"detail": "audit store unavailable"}
            else:
                assert "audit store unavailable" in answer.text


async def test_runs_list_shows_prompt_duration_and_filters_by_thread(
    api: httpx.AsyncClient, monitor_db: tuple[str, dict[str, str]]
) -> None:
    runs = monitor_db[1]
    items = (await api.get("/api/runs", params={"limit": 100}, headers=auth())).json()["items"]
    healthy = next(r for r in items if r["run_id"] == runs["healthy"])
    assert healthy["prompt"] == "what is 6*7"
    detail = (await api.get(f"/api/runs/{runs['healthy']}", headers=auth())).json()
    span_us = detail["events"][-1]["emitted_us"] - detail["events"][0]["emitted_us"]
    assert healthy["duration_ms"] == span_us / 1000 > 0  # created with its first event
    one = (
        await api.get("/api/runs", params={"thread": healthy["thread_id"]}, headers=auth())
    ).json()
    assert [r["run_id"] for r in one["items"]] == [runs["healthy"]]
    page = await api.get("/monitor/runs", params={"thread": healthy["thread_id"]}, headers=auth())
    assert "what is 6*7" in page.text and page.text.count("data-run-id=") == 1


async def test_open_runs_and_agent_error_rates(sqlite_db: str) -> None:
    """Open runs are the runs without a terminal event (not ended runs awaiting acks); per-agent
    error and restart shares over the SLO windows show a crash-looping agent."""
    store = AuditStore.open(sqlite_db)
    t0 = now_us() - 30_000_000
    try:
        for n, code in enumerate(["runtime_restarted"] * 3 + ["agent_failed"] + [None] * 2):
            rid = new_id()
            lc = lifecycle(rid, t0 + n * 10_000)
            events = [lc.started(f"q{n}"), lc.thinking("t")]
            if code is None:
                events += [lc.final_report("ok"), lc.completed()]
            else:
                events.append(lc.error(ErrorCode(code), "ended"))
            info = RunInfo(rid, "alice", "t-" + rid, "crashy", "m-" + rid, "test", t0, 300)
            await store.create_run(info, new_thread=True)
            await store.write(Batch(events=[(e, True) for e in events], receipts=[]), t0 + 1000)
        # One run in progress (no terminal event) and one ended seconds ago, awaiting acks.
        for ended in (False, True):
            rid = new_id()
            lc = lifecycle(rid, now_us() - 2_000_000)
            events = [lc.started("now"), lc.thinking("t")]
            if ended:
                events += [lc.final_report("ok"), lc.completed()]
            info = RunInfo(rid, "bob", "t-" + rid, "demo", "m-" + rid, "test", now_us(), 300)
            await store.create_run(info, new_thread=True)
            await store.write(Batch(events=[(e, True) for e in events]), now_us())
        await Checker(
            store, MonitorMetrics(CollectorRegistry()), CheckerConfig(settle_s=60)
        ).catch_up()
    finally:
        await store.close()
    settings = Settings(database_url=sqlite_db, jwt_secret=JWT_SECRET, admin_token=ADMIN)
    app = create_monitor_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c,
    ):
        slo = (await c.get("/api/slo", headers=auth())).json()
        overview = await c.get("/monitor", headers=auth())
    hour = slo["hour"]
    assert hour["open_runs"] == 1
    crashy = next(a for a in hour["agents"] if a["agent"] == "crashy")
    assert hour["agents"][0]["agent"] == "crashy", "worst first"
    assert crashy["ended"] == 6
    assert crashy["restart_ratio"] == 0.5 and round(crashy["error_ratio"], 4) == 0.1667
    assert crashy["outcomes"]["completed"] == 2
    assert 'data-tile="agents-1h"' in overview.text
    assert "crashy" in overview.text and "50.0%" in overview.text
    assert "deferred" not in overview.text or "no live connection" in overview.text


def test_monitor_off_is_logged_at_startup(sqlite_db: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="runwatch.monitor"):
        create_monitor_app(Settings(database_url=sqlite_db, jwt_secret=JWT_SECRET))
    assert any(
        r.levelname == "ERROR" and "OFF" in r.message and "RUNWATCH_ADMIN_TOKEN" in r.message
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="runwatch.monitor"):
        create_monitor_app(Settings(database_url=sqlite_db))
    assert any("OPEN" in r.message for r in caplog.records)
