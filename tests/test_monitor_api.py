"""The monitor's JSON API: auth, filters, paging, errors, and schemathesis on its schema."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry

from monitor.api import RuleName
from monitor.checker import Checker
from monitor.metrics import MonitorMetrics
from monitor.rules import Rule
from monitor.service import create_monitor_app
from runtime.config import Settings
from runtime.store.recorder import AuditStore

from .conftest import JWT_SECRET
from .test_checker import CONFIG, write_corpus

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
            case.call_and_validate(headers=auth())

        try:
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert operations == 4
    assert not failures, "\n\n".join(failures)
