"""The chat page in real headless Chromium against a real server."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .conftest import ServerProcess, chromium_path, scale, sqlite_url, start_server_process

pytestmark = pytest.mark.browser


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = start_server_process(
        tmp_path, {"RUNWATCH_DATABASE_URL": sqlite_url(tmp_path / "rw.db")}
    )
    yield server
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)


@pytest.fixture
async def page(page_server: ServerProcess, tmp_path: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = await browser.new_context()
        pg = await context.new_page()
        pg.set_default_timeout(15_000 * scale())
        await pg.goto(page_server.http_url + "/")
        yield pg
        await context.close()
        await browser.close()


async def send(page: object, text: str) -> None:
    await page.fill("#message", text)  # type: ignore[attr-defined]
    await page.press("#message", "Enter")  # type: ignore[attr-defined]


async def test_chat_shows_tools_answers_and_survives_a_dropped_socket(
    page: object, tmp_path: Path
) -> None:
    pg = page
    await pg.wait_for_selector('#conn-status[data-state="connected"]')  # type: ignore[attr-defined]
    assert not await pg.locator("#token-box").is_visible()  # type: ignore[attr-defined]

    await send(pg, "what is 6*7")
    card = pg.locator("article.run").last  # type: ignore[attr-defined]
    await card.locator('.tool[data-status="ok"]').wait_for()
    assert "calculator" in await card.locator(".tool").inner_text()
    await pg.wait_for_selector('article.run[data-status="completed"] .final-report')  # type: ignore[attr-defined]
    assert "42" in await card.locator(".final-report").inner_text()

    # A run in progress, a dropped socket, an automatic reconnect and resume.
    await send(pg, "wait 4")
    run = pg.locator("article.run").last  # type: ignore[attr-defined]
    await run.locator(".thinking").nth(1).wait_for()
    await pg.evaluate("window.runwatchChat.dropSocket()")  # type: ignore[attr-defined]
    await pg.wait_for_selector('#conn-status[data-state="reconnecting"]')  # type: ignore[attr-defined]
    await pg.wait_for_selector('#conn-status[data-state="connected"]')  # type: ignore[attr-defined]
    await pg.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelectorAll('article.run')[1].dataset.status === 'completed'",
        timeout=20_000 * scale(),
    )
    steps = await run.locator(".thinking").evaluate_all("els => els.map(e => e.dataset.step)")
    assert steps == [str(i) for i in range(1, len(steps) + 1)], "every step exactly once"
    assert len(steps) >= 4
    await pg.screenshot(path=str(tmp_path / "chat.png"))  # type: ignore[attr-defined]

    # Cancel from the page.
    await send(pg, "wait 30")
    long = pg.locator("article.run").last  # type: ignore[attr-defined]
    await long.locator('.tool[data-status="running"]').wait_for()
    await long.locator("button.cancel").click()
    await pg.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelectorAll('article.run')[2].dataset.status === 'cancelled'"
    )
    assert "cancelled" in await long.locator(".error-box").inner_text()


async def test_user_text_is_escaped(page: object) -> None:
    pg = page
    await pg.wait_for_selector('#conn-status[data-state="connected"]')  # type: ignore[attr-defined]
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    await send(pg, hostile)
    await pg.wait_for_selector('article.run[data-status="completed"]')  # type: ignore[attr-defined]
    assert await pg.evaluate("window.pwned === undefined")  # type: ignore[attr-defined]
    assert await pg.locator("article.run .prompt").first.inner_text() == hostile  # type: ignore[attr-defined]
    assert await pg.locator("article.run img").count() == 0  # type: ignore[attr-defined]
