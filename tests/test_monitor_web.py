"""The monitor's web UI in real headless Chromium: overview, a faulty run, filters, escaping."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime.events import new_id
from runtime.store.audit import AuditStore

from .conftest import (
    JWT_SECRET,
    ServerProcess,
    chromium_path,
    scale,
    sqlite_url,
    start_server_process,
)
from .test_checker import lifecycle, now_us, receipts, write_corpus, write_run

pytestmark = pytest.mark.browser
ADMIN = "admin-token-for-the-ui-test-0123"
REPO = Path(__file__).resolve().parents[1]


def artifacts() -> Path:
    """Where screenshots go: ``RUNWATCH_TEST_ARTIFACTS`` or ``test-artifacts/`` (git-ignored)."""
    root = Path(os.environ.get("RUNWATCH_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path = root / "monitor"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[tuple[ServerProcess, dict[str, str]]]:
    db = sqlite_url(tmp_path / "rw.db")
    from runtime.store.migrate import upgrade

    await asyncio.to_thread(upgrade, db)
    store = AuditStore.open(db)
    try:
        runs = await write_corpus(store)
        # A run whose user typed markup: it must show as text.
        rid = new_id()
        lc = lifecycle(rid, now_us() - 60_000_000)
        ev = [lc.started("<script>window.pwned=1</script>"), lc.thinking("<b>t</b>")]
        ev += [lc.final_report("<img src=x onerror=window.pwned=2>"), lc.completed()]
        runs["xss"] = await write_run(store, ev, receipts(ev), created_us=ev[0].ts_us)
    finally:
        await store.close()
    env = {
        "RUNWATCH_DATABASE_URL": db,
        "RUNWATCH_JWT_SECRET": JWT_SECRET,
        "RUNWATCH_ADMIN_TOKEN": ADMIN,
        "RUNWATCH_STUCK_GRACE_S": "5",
        "RUNWATCH_MONITOR_INTERVAL_S": "0.5",
    }
    server = start_server_process(tmp_path, env, command="monitor")
    yield server, runs
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)


@pytest.fixture
async def page(monitor: tuple[ServerProcess, dict[str, str]]) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        pg = await context.new_page()
        pg.set_default_timeout(15_000 * scale())
        failed: list[str] = []
        pg.on("response", lambda r: failed.append(r.url) if r.status == 404 else None)
        pg.failed_loads = failed
        yield pg
        await context.close()
        await browser.close()


async def test_monitor_ui(
    page: Any, monitor: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, runs = monitor
    await page.goto(server.http_url + "/monitor")
    assert page.url.endswith("/monitor/login")
    await page.fill("#token", ADMIN)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/monitor")

    # The checker judges the corpus within a few passes; the overview shows it, worst first.
    for _ in range(60):
        if await page.locator("table.runs tr.fail").count() >= 10:
            break
        await asyncio.sleep(0.5)
        await page.reload()
    tiles = page.locator(".tile")
    assert await tiles.count() >= 8
    assert "bad" in (await tiles.first.get_attribute("class") or "")
    assert await page.locator('[data-tile="stuck"] .value').inner_text() == "1"
    first_rule = await page.locator("table.by-rule tbody tr td a").first.inner_text()
    assert first_rule == "isolation", "a cross-user delivery is listed first"
    assert await page.locator('[data-tile="agents-1h"]').count() == 1
    assert await page.locator('[data-tile="open"] .detail').inner_text() == (
        "in progress now (no terminal event yet)"
    )
    await page.screenshot(path=str(artifacts() / "overview.png"), full_page=True)

    # A faulty run's page shows its violation and the SVG timeline.
    await page.goto(f"{server.http_url}/monitor/runs/{runs['leak']}")
    assert await page.locator('.violations li[data-rule="isolation"]').count() == 1
    assert "mallory" in await page.locator(".violations").inner_text()
    assert await page.locator("svg.timeline circle").count() == 6
    assert await page.locator("tr.leak").count() == 1
    # Links to the run's thread and user; the axis in human units, never raw milliseconds.
    thread_link = page.locator("a.thread-link")
    assert (await thread_link.get_attribute("href") or "").startswith("/monitor/runs?thread=")
    assert await page.locator("a.user-link").count() == 1
    ticks = await page.locator("svg.timeline > text[text-anchor]").evaluate_all(
        "els => els.map(e => e.textContent)"
    )
    assert ticks[0] == "0" and all(t.endswith((" ms", " s", " min")) for t in ticks[1:]), ticks
    await page.screenshot(path=str(artifacts() / "run.png"), full_page=True)
    await thread_link.click()
    await page.wait_for_url("**/monitor/runs?thread=**")
    assert await page.locator("table.runs tbody tr").count() == 1

    # Filters: verdict and rule.
    await page.goto(server.http_url + "/monitor/runs")
    await page.select_option("select[name=verdict]", "pass")
    await page.click("form.filters button")
    await page.wait_for_url("**verdict=pass**")
    shown = await page.locator("table.runs tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.runId)"
    )
    assert runs["healthy"] in shown and runs["leak"] not in shown
    await page.select_option("select[name=verdict]", "fail")
    await page.select_option("select[name=rule]", "delivery_slo")
    await page.click("form.filters button")
    await page.wait_for_url("**rule=delivery_slo**")
    shown = await page.locator("table.runs tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.runId)"
    )
    assert set(shown) == {runs["late_ack"], runs["never_acked"]}
    # The runs list shows each run's message and duration.
    assert "what is 6*7" in await page.locator("table.runs td.prompt").first.inner_text()
    await page.screenshot(path=str(artifacts() / "runs.png"), full_page=True)

    # A bad filter is refused and explained, not silently ignored (which would show all runs).
    await page.fill("input[name=since]", "abc")
    await page.click("form.filters button")
    await page.wait_for_url("**since=abc**")
    assert "since" in await page.locator(".filter-errors").inner_text()
    assert await page.locator("table.runs").count() == 0
    await page.screenshot(path=str(artifacts() / "bad-filter.png"), full_page=True)
    await page.fill("input[name=since]", "24h")
    await page.click("form.filters button")
    await page.wait_for_url("**since=24h**")
    assert await page.locator("table.runs tbody tr").count() == 2

    # An unknown run, or page, is a 404 page with the navigation, not a bare one.
    answer = await page.goto(f"{server.http_url}/monitor/runs/no-such-run")
    assert answer is not None and answer.status == 404
    assert await page.locator("nav.top a").count() >= 4
    assert "no-such-run" in await page.locator("main").inner_text()
    await page.screenshot(path=str(artifacts() / "not-found.png"), full_page=True)
    answer = await page.goto(f"{server.http_url}/monitor/nowhere")
    assert answer is not None and answer.status == 404
    failed = [u for u in page.failed_loads if "/no-such-run" not in u and "/nowhere" not in u]
    assert failed == [], "nothing else 404s (the favicon included)"

    # The API reference works offline: one page, nothing fetched from anywhere.
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    await page.goto(f"{server.http_url}/api/docs")
    assert await page.locator("section.op").count() >= 4
    assert all(u.startswith(server.http_url) for u in requested), requested
    await page.screenshot(path=str(artifacts() / "api-docs.png"), full_page=True)

    # Violations list, filtered by rule.
    await page.goto(server.http_url + "/monitor/violations?rule=stuck")
    assert runs["stuck"] in await page.locator("table.grid").inner_text()

    # Markup a user or an agent typed is shown as text, never run.
    await page.goto(f"{server.http_url}/monitor/runs/{runs['xss']}")
    assert "<script>window.pwned=1</script>" in await page.locator("table.grid").first.inner_text()
    assert await page.evaluate("window.pwned === undefined")
    await page.goto(
        f"{server.http_url}/monitor/runs?user=%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E"
    )
    assert await page.evaluate("window.pwned === undefined")
    assert await page.locator("input[name=user]").input_value() == "<script>window.pwned=1</script>"
