"""The chat page (runtime/static) in real headless Chromium against a real `runwatch serve`.

The page is driven as a user would drive it, and checked through its stable hooks: run cards
(`article.run[data-run-id][data-status][data-thread-id]`), tool rows
(`.tool[data-tool-call-id][data-status]`), `.final-report`, `#conn-status[data-state]` and
`window.runwatchChat` (`socket()`, `dropSocket(offlineMs?)`, `stats()`).

Skipped when Debian's Chromium or the playwright package is missing, unless
``RUNWATCH_REQUIRE_SERVICES=1``; every wait is bounded and scaled by
``RUNWATCH_TEST_TIMEOUT_SCALE``.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from runtime.client import RunwatchClient
from runtime.events import EventType

from .conftest import (
    JWT_SECRET,
    ServerProcess,
    chromium_path,
    make_token,
    scale,
    service_missing,
    sqlite_url,
    start_server_process,
)

if TYPE_CHECKING:
    from playwright.async_api import Locator, Page

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
_users = itertools.count(1)
REPO = Path(__file__).resolve().parents[1]


def artifacts() -> Path:
    """Where screenshots go: ``RUNWATCH_TEST_ARTIFACTS`` or ``test-artifacts/`` (git-ignored)."""
    root = Path(os.environ.get("RUNWATCH_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path = root / "chat"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(artifacts() / f"{name}.png"), full_page=True)


def ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds), scaled like every wait in the suite."""
    return seconds * 1000 * scale()


def stop(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(30 * scale())
    except Exception:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One dev-mode server (no RUNWATCH_JWT_SECRET) for the module; each test has its own user."""
    tmp = tmp_path_factory.mktemp("chat-page")
    server = start_server_process(tmp, {"RUNWATCH_DATABASE_URL": sqlite_url(tmp / "rw.db")})
    yield server
    stop(server)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = chromium_path()  # skips (or fails under RUNWATCH_REQUIRE_SERVICES=1)
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        service_missing("the playwright package is not installed")
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


async def open_page(browser: Any, url: str, user: str | None = None) -> tuple[Page, list[str]]:
    """A fresh browser context (empty localStorage) on the chat page, as ``user``; the list
    collects the page's JavaScript errors and failed loads."""
    context = await browser.new_context(viewport={"width": 1000, "height": 800})
    if user is not None:
        # A user of its own per test, so no test sees another's runs in `active_runs`.
        await context.add_init_script(
            "if (!localStorage.getItem('runwatch.user'))"
            f" localStorage.setItem('runwatch.user', {user!r});"
        )
    page: Page = await context.new_page()
    page.set_default_timeout(ms(15))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"{msg.text} [{msg.location.get('url', '')}]")
            if msg.type == "error"
            else None
        ),
    )
    await page.goto(url + "/")
    return page, errors


async def send(page: Page, text: str) -> Locator:
    """Type ``text``, press Enter, and return its run card once the server accepted it."""
    before = await page.locator("article.run").count()
    await page.fill("#message", text)
    await page.press("#message", "Enter")
    card = page.locator("article.run").nth(before)
    await card.locator(".prompt").filter(has_text=text).wait_for()
    await page.wait_for_function(
        "i => document.querySelectorAll('article.run')[i]?.dataset.runId",
        arg=before,
        timeout=ms(10),
    )
    return card


async def wait_status(card: Locator, status: str, seconds: float = 15) -> None:
    await card.page.wait_for_function(
        "([el, s]) => el.dataset.status === s",
        arg=[await card.element_handle(), status],
        timeout=ms(seconds),
    )


async def stored_events(server: ServerProcess, user: str, run_id: str) -> list[Any]:
    """The run as the audit store has it, replayed through the Python client SDK."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server.http_url}/dev/token", json={"user": user})
    token = response.json()["token"]
    async with RunwatchClient(server.ws_url, token, reconnect=False) as client:
        run = await client.resume(run_id, 0)
        return await run.wait(10 * scale())


async def test_tools_answers_reconnect_resume_and_cancel(
    browser: Any, dev_server: ServerProcess
) -> None:
    user = f"page-{next(_users)}"
    page, errors = await open_page(browser, dev_server.http_url, user)
    await page.wait_for_selector('#conn-status[data-state="connected"]')
    assert await page.locator("#conn-status").inner_text() == f"connected as {user}"
    assert await page.locator("#token-box").is_hidden()

    # A tool call goes running → ok, and the answer arrives.
    calc = await send(page, "what is 6*7")
    await wait_status(calc, "completed")
    tools = calc.locator(".tool")
    assert await tools.count() == 1
    assert await tools.get_attribute("data-status") == "ok"
    assert await tools.get_attribute("data-tool-call-id")
    assert "calculator" in await tools.inner_text()
    assert "42" in await calc.locator(".final-report").inner_text()
    assert "done" in await calc.locator(".badge").inner_text()

    # A dropped socket mid-run: the page reconnects, resumes, and shows every step exactly once.
    wait = await send(page, "wait 4")
    await wait.locator(".thinking").first.wait_for()
    await page.evaluate(
        """() => {
            const el = document.getElementById('conn-status');
            window.__states = [el.dataset.state];
            new MutationObserver(() => window.__states.push(el.dataset.state))
                .observe(el, {attributes: true, attributeFilter: ['data-state']});
        }"""
    )
    # Offline for 1.5 s: at least one thinking step is emitted meanwhile and must come by replay.
    await page.evaluate("window.runwatchChat.dropSocket(1500)")
    await page.wait_for_selector('#conn-status[data-state="connected"]', timeout=ms(15))
    await wait_status(wait, "completed", seconds=20)
    states = await page.evaluate("window.__states")
    assert "reconnecting" in states
    assert states[-1] == "connected"
    assert states.index("reconnecting") < len(states) - 1

    run_id = await wait.get_attribute("data-run-id")
    assert run_id
    stored = await stored_events(dev_server, user, run_id)
    stored_steps = [e.data["step"] for e in stored if e.type == EventType.AGENT_THINKING]
    shown_steps = await wait.locator(".thinking").evaluate_all(
        "els => els.map(e => Number(e.dataset.step))"
    )
    assert shown_steps == stored_steps, "every thinking step shown exactly once, in order"
    assert len(shown_steps) >= 5  # the runtime's step, "Waiting 4 seconds", then once a second
    assert await wait.locator(".tool").count() == 1
    assert await wait.locator('.tool[data-status="ok"]').count() == 1
    assert "Waited 4 seconds" in await wait.locator(".final-report").inner_text()
    stats = await page.evaluate("window.runwatchChat.stats()")
    assert stats["connects"] == 2
    assert stats["replayed"] >= 1, stats

    # Stop from the card: the run ends as cancelled, never as a success, its tool call closed;
    # shown as stopped by the user, not as an error or a failed tool.
    long = await send(page, "wait 30")
    await long.locator('.tool[data-status="running"]').wait_for()
    assert await page.locator("#stop").is_visible(), "the composer offers Stop while a run runs"
    await long.get_by_role("button", name="Stop this run").click()
    await wait_status(long, "cancelled", seconds=10)
    assert "Stopped" in await long.locator(".error-box").inner_text()
    assert await long.locator(".error-box").get_attribute("role") is None, "not an alert"
    assert await long.locator(".badge").inner_text() == "stopped"
    assert await long.locator('.tool[data-status="cancelled"]').count() == 1
    assert "failed" not in await long.locator(".tool").inner_text()
    assert await long.locator("button.cancel").is_hidden()
    await page.wait_for_selector("#stop", state="hidden")
    await shot(page, "stopped-run")

    # The composer's Stop button stops the running answer too.
    other = await send(page, "wait 30")
    await other.locator('.tool[data-status="running"]').wait_for()
    await page.get_by_role("button", name="Stop the running answer").click()
    await wait_status(other, "cancelled", seconds=10)

    # One conversation: every run of the page shares the first run's thread.
    threads = await page.locator("article.run").evaluate_all(
        "els => els.map(e => e.dataset.threadId)"
    )
    assert len(threads) == 4 and len(set(threads)) == 1 and threads[0]
    assert errors == []
    await page.context.close()


async def test_new_chat_starts_a_thread_and_a_reload_restores_it(
    browser: Any, dev_server: ServerProcess
) -> None:
    user = f"page-{next(_users)}"
    page, errors = await open_page(browser, dev_server.http_url, user)
    first = await send(page, "what is 1+1")
    await wait_status(first, "completed")
    old_thread = await first.get_attribute("data-thread-id")

    await page.click("#new-chat")
    assert await page.locator("article.run").count() == 0
    second = await send(page, "what is 2+2")
    await wait_status(second, "completed")
    third = await send(page, "what is 3+3")
    await wait_status(third, "completed")
    new_thread = await second.get_attribute("data-thread-id")
    assert new_thread and new_thread != old_thread
    assert await third.get_attribute("data-thread-id") == new_thread

    # A reload replays the current thread's runs from the audit store.
    await page.reload()
    await page.wait_for_selector('#conn-status[data-state="connected"]')
    cards = page.locator("article.run")
    await page.wait_for_function(
        "document.querySelectorAll('article.run[data-status=\"completed\"]').length === 2",
        timeout=ms(10),
    )
    assert await cards.locator(".prompt").all_inner_texts() == ["what is 2+2", "what is 3+3"]
    assert "4" in await cards.nth(0).locator(".final-report").inner_text()
    assert "6" in await cards.nth(1).locator(".final-report").inner_text()
    fourth = await send(page, "what is 4+4")
    await wait_status(fourth, "completed")
    assert await fourth.get_attribute("data-thread-id") == new_thread
    assert errors == []
    await page.context.close()


async def test_user_and_agent_text_is_never_html(browser: Any, dev_server: ServerProcess) -> None:
    page, errors = await open_page(browser, dev_server.http_url, f"page-{next(_users)}")
    await page.wait_for_selector('#conn-status[data-state="connected"]')
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    card = await send(page, hostile)
    await wait_status(card, "completed")
    # The demo agent echoes a search query back: agent text goes through textContent too.
    echoed = await send(page, "search <b id=bold>x</b><img src=y onerror=window.pwned=3>")
    await wait_status(echoed, "completed")
    assert await page.evaluate("window.pwned === undefined")
    assert await card.locator(".prompt").inner_text() == hostile
    assert "<img" in await echoed.locator(".final-report").inner_text()
    assert await page.locator("#runs img, #runs script, #bold").count() == 0
    assert errors == []
    await page.context.close()


async def test_without_dev_mode_the_page_asks_for_a_token(browser: Any, tmp_path: Path) -> None:
    server = start_server_process(
        tmp_path,
        {
            "RUNWATCH_DATABASE_URL": sqlite_url(tmp_path / "rw.db"),
            "RUNWATCH_JWT_SECRET": JWT_SECRET,
        },
    )
    try:
        page, errors = await open_page(browser, server.http_url)
        await page.wait_for_selector("#token-box:not([hidden])")
        assert await page.locator("#conn-status").get_attribute("data-state") == "offline"

        await page.get_by_label("Paste a token").fill("not-a-token")
        await page.click("#use-token")
        await page.wait_for_selector("#token-box:not([hidden])")  # 4401: asked again
        assert "refused" in await page.locator("#token-reason").inner_text()

        await page.get_by_label("Paste a token").fill(make_token("alice"))
        await page.click("#use-token")
        await page.wait_for_selector('#conn-status[data-state="connected"]')
        assert await page.locator("#conn-status").inner_text() == "connected as alice"
        # One identity in the header: the token's user, no editable "User: dev" beside it.
        assert await page.locator("#user-field").is_hidden()
        assert "dev" not in await page.locator("header.bar").inner_text()
        card = await send(page, "what is 2+3")
        await wait_status(card, "completed")
        assert "5" in await card.locator(".final-report").inner_text()
        await shot(page, "token-mode")
        # The only failed load is the expected 404 of /dev/token that told the page to ask.
        assert [e for e in errors if "/dev/token" not in e] == []
        await page.context.close()
    finally:
        stop(server)


MARKDOWN_CASES = {
    # input → the HTML the renderer must build (DOM nodes; text escaped by the serializer)
    "**bold** and `code` and *it*": (
        "<p><strong>bold</strong> and <code>code</code> and <em>it</em></p>"
    ),
    "- a\n- b\n  - c": "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul>",
    "1. one\n2. two": "<ol><li>one</li><li>two</li></ol>",
    "# Title": '<h3 class="md-h">Title</h3>',
    "```py\nx = '<b>'\n```": "<pre><code data-lang=\"py\">x = '&lt;b&gt;'</code></pre>",
    "[runwatch](https://example.com/a?b=1)": (
        '<p><a href="https://example.com/a?b=1" rel="noopener noreferrer nofollow" '
        'target="_blank">runwatch</a></p>'
    ),
    "line one\nline two": "<p>line one<br>line two</p>",
    "a_b_c snake_case": "<p>a_b_c snake_case</p>",
    "| a | b |\n|---|---|\n| 1 | 2 |": (
        '<div class="md-table"><table><thead><tr><th>a</th><th>b</th></tr></thead>'
        "<tbody><tr><td>1</td><td>2</td></tr></tbody></table></div>"
    ),
    # Script injection in a model answer is inert: shown as text, unsafe links dropped.
    "<script>window.pwned=1</script>": "<p>&lt;script&gt;window.pwned=1&lt;/script&gt;</p>",
    "<img src=x onerror=window.pwned=2>": "<p>&lt;img src=x onerror=window.pwned=2&gt;</p>",
    "[click](javascript:window.pwned=3)": "<p>click</p>",
    "[x](data:text/html,<script>alert(1)</script>)": (
        "<p>[x](data:text/html,&lt;script&gt;alert(1)&lt;/script&gt;)</p>"
    ),
    '**<a href="javascript:window.pwned=4">b</a>**': (
        '<p><strong>&lt;a href="javascript:window.pwned=4"&gt;b&lt;/a&gt;</strong></p>'
    ),
}


async def test_answers_render_as_safe_markdown_while_streaming(
    browser: Any, dev_server: ServerProcess
) -> None:
    page, errors = await open_page(browser, dev_server.http_url, f"page-{next(_users)}")
    await page.wait_for_selector('#conn-status[data-state="connected"]')

    rendered = await page.evaluate(
        """cases => Object.fromEntries(Object.keys(cases).map(k => {
            const box = document.createElement('div');
            box.append(window.runwatchMarkdown.render(k));
            return [k, box.innerHTML];
        }))""",
        MARKDOWN_CASES,
    )
    for source, html in MARKDOWN_CASES.items():
        assert rendered[source] == html, source

    # The demo agent streams: a cursor shows while text_delta chunks arrive, then goes away.
    await page.evaluate(
        """() => {
            window.__cursorSeen = 0;
            new MutationObserver(() => {
                if (document.querySelector('.final-report[data-streaming="true"] .cursor'))
                    window.__cursorSeen += 1;
            }).observe(document.getElementById('runs'), {childList: true, subtree: true});
        }"""
    )
    card = await send(page, "hello")
    await wait_status(card, "completed")
    assert await page.evaluate("window.__cursorSeen") >= 2, "the answer was painted as it streamed"
    answer = card.locator(".final-report")
    assert await answer.locator(".cursor").count() == 0
    assert await answer.locator("ul > li").count() == 6
    assert await answer.locator("li code").first.inner_text() == "what is 6*7"
    assert await answer.locator("strong").inner_text() == "demo"
    assert "**" not in await answer.inner_text()

    calc = await send(page, "what is 6*7")
    await wait_status(calc, "completed")
    assert await calc.locator(".final-report strong").inner_text() == "42"
    search = await send(page, "search resume")
    await wait_status(search, "completed")
    assert await search.locator(".final-report li").count() >= 1
    for item in await search.locator(".final-report li").all_inner_texts():
        words = item.rstrip("…").split()
        assert item.endswith("…") or len(item) < 300, item
        assert all(w.isprintable() for w in words)

    # A model answer that carries markup and javascript: links: shown, never run or linked.
    hostile = await send(
        page, "search [x](javascript:window.pwned=5) <img src=y onerror=window.pwned=6>"
    )
    await wait_status(hostile, "completed")
    assert await page.evaluate("window.pwned === undefined")
    assert await page.locator("#runs img, #runs script, #runs a[href^=javascript]").count() == 0
    assert "<img src=y" in await hostile.locator(".final-report").inner_text()
    await shot(page, "markdown-answers")
    assert errors == []
    await page.context.close()


async def test_threads_agents_long_messages_and_user_names(
    browser: Any, dev_server: ServerProcess
) -> None:
    user = f"page-{next(_users)}"
    page, errors = await open_page(browser, dev_server.http_url, user)
    await page.wait_for_selector('#conn-status[data-state="connected"]')

    # Only agents that can run here are offered: this server has no RUNWATCH_LLM_* settings.
    await page.wait_for_function("document.querySelector('#agent').title !== ''")
    options = await page.locator("#agent option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["demo"]
    assert "RUNWATCH_LLM_BASE_URL" in (await page.locator("#agent").get_attribute("title") or "")

    # A long message is text in a folded bubble, not a giant bold heading.
    long_text = ("This is a long message about runwatch. " * 90).strip()
    assert len(long_text) > 3400
    first = await send(page, long_text)
    await wait_status(first, "completed")
    prompt = first.locator(".prompt")
    assert await prompt.evaluate("e => getComputedStyle(e).fontWeight") == "400"
    assert (await prompt.bounding_box() or {"height": 1e9})["height"] <= 200
    await first.get_by_role("button", name="Show all").click()
    assert (await prompt.bounding_box() or {"height": 0})["height"] > 400
    await shot(page, "long-message")

    # Earlier threads come back from the store through the thread list.
    second = await send(page, "what is 2+3")
    await wait_status(second, "completed")
    old_thread = await first.get_attribute("data-thread-id")
    await page.click("#new-chat")
    third = await send(page, "what is 7*6")
    await wait_status(third, "completed")
    items = page.locator("#thread-list .thread")
    await page.wait_for_function("document.querySelectorAll('#thread-list .thread').length === 2")
    await page.wait_for_function(
        "document.querySelector('#thread-list .thread.current .thread-title')"
        "?.textContent === 'what is 7*6'"
    )
    titles = await items.locator(".thread-title").all_inner_texts()
    assert titles[0] == "what is 7*6" and titles[1].startswith("This is a long message")
    await shot(page, "thread-list")

    await items.nth(1).locator("button").click()
    await page.wait_for_function(
        "document.querySelectorAll('article.run[data-status=\"completed\"]').length === 2"
    )
    cards = page.locator("article.run")
    assert await cards.count() == 2
    assert await cards.evaluate_all("cs => cs.map(c => c.dataset.threadId)") == [old_thread] * 2
    assert "5" in await cards.nth(1).locator(".final-report").inner_text()
    assert await items.nth(1).get_attribute("class") == "thread current"
    # Continuing it adds to that thread; a fresh page (no local memory) finds it in the list too.
    fourth = await send(page, "what is 1+1")
    await wait_status(fourth, "completed")
    assert await fourth.get_attribute("data-thread-id") == old_thread
    fresh, fresh_errors = await open_page(browser, dev_server.http_url, user)
    await fresh.wait_for_function("document.querySelectorAll('#thread-list .thread').length === 2")
    await fresh.locator("#thread-list .thread").nth(0).locator("button").click()
    await fresh.wait_for_function(
        "document.querySelectorAll('article.run[data-status=\"completed\"]').length === 3"
    )
    await shot(fresh, "thread-restored")
    await fresh.context.close()

    # An invalid user name is explained, not just outlined in red.
    await page.fill("#user", "bad user!")
    await page.press("#user", "Enter")
    await page.dispatch_event("#user", "change")
    error = page.locator("#user-error")
    await error.wait_for()
    assert "not a valid user name" in await error.inner_text()
    assert "no spaces" in await error.inner_text()
    assert await page.locator("#conn-status").inner_text() == f"connected as {user}"
    await shot(page, "invalid-user")
    assert errors == [] and fresh_errors == []
    await page.context.close()
