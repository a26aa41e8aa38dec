"""The chat page's API under /api/me, over HTTP against a live runtime, and the offline docs."""

from __future__ import annotations

import httpx
import pytest

from runtime.apidocs import render_docs

from .conftest import LiveServer


def bearer(live: LiveServer, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {live.token(user)}"}


async def test_threads_and_runs_of_the_token_user_only(live: LiveServer) -> None:
    alice = await live.client("alice")
    first = await alice.chat("what is 1+1")
    await first.wait(20)
    second = await alice.chat("and 2+2?", thread_id=first.thread_id)
    await second.wait(20)
    other = await alice.chat("a new thread")
    await other.wait(20)
    bob = await live.client("bob")
    await (await bob.chat("bob's own")).wait(20)

    async with httpx.AsyncClient(base_url=live.http_url) as http:
        me = (await http.get("/api/me", headers=bearer(live, "alice"))).json()
        assert me == {"user_id": "alice", "dev_mode": False}
        threads = (await http.get("/api/me/threads", headers=bearer(live, "alice"))).json()
        assert [t["thread_id"] for t in threads["items"]] == [other.thread_id, first.thread_id]
        assert [t["title"] for t in threads["items"]] == ["a new thread", "what is 1+1"]
        assert threads["items"][1]["run_count"] == 2 and threads["next_cursor"] is None

        one = await http.get(f"/api/me/threads/{first.thread_id}", headers=bearer(live, "alice"))
        runs = one.json()["runs"]
        assert [(r["run_id"], r["input"]) for r in runs] == [
            (first.run_id, "what is 1+1"),
            (second.run_id, "and 2+2?"),
        ]
        assert all(r["outcome"] == "completed" and r["last_seq"] for r in runs)

        # Another user's thread is "not found", exactly like a made-up one.
        foreign = await http.get(f"/api/me/threads/{first.thread_id}", headers=bearer(live, "bob"))
        made_up = await http.get("/api/me/threads/nope", headers=bearer(live, "bob"))
        assert foreign.status_code == made_up.status_code == 404
        assert foreign.json() == made_up.json()
        bobs = (await http.get("/api/me/threads", headers=bearer(live, "bob"))).json()
        assert [t["title"] for t in bobs["items"]] == ["bob's own"]

        page = await http.get("/api/me/threads?limit=1", headers=bearer(live, "alice"))
        cursor = page.json()["next_cursor"]
        rest = await http.get(
            "/api/me/threads", params={"cursor": cursor}, headers=bearer(live, "alice")
        )
        assert [t["thread_id"] for t in rest.json()["items"]] == [first.thread_id]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic abc"}],
)
async def test_the_api_needs_a_valid_token(live: LiveServer, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=live.http_url) as http:
        for path in ("/api/me", "/api/me/agents", "/api/me/threads", "/api/me/threads/x"):
            response = await http.get(path, headers=headers)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"


async def test_agents_lists_only_what_can_run(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNWATCH_LLM_BASE_URL", raising=False)
    async with httpx.AsyncClient(base_url=live.http_url) as http:
        body = (await http.get("/api/me/agents", headers=bearer(live, "alice"))).json()
        assert body["default"] == "demo"
        by_name = {a["name"]: a for a in body["agents"]}
        assert by_name["demo"] == {"name": "demo", "available": True, "reason": None}
        assert by_name["llm"]["available"] is False
        assert "RUNWATCH_LLM_BASE_URL" in by_name["llm"]["reason"]
        monkeypatch.setenv("RUNWATCH_LLM_BASE_URL", "http://127.0.0.1:9/v1")
        monkeypatch.setenv("RUNWATCH_LLM_MODEL", "m")
        body = (await http.get("/api/me/agents", headers=bearer(live, "alice"))).json()
        assert {a["name"]: a["available"] for a in body["agents"]}["llm"] is True


async def test_api_docs_are_served_offline(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.http_url) as http:
        page = await http.get("/api/docs")
        schema = (await http.get("/api/openapi.json")).json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    # Self-contained: nothing loaded from anywhere, not even this server.
    assert "<script" not in html and "http://" not in html.replace(live.http_url, "")
    assert "https://" not in html and "src=" not in html
    for path in schema["paths"]:
        assert f"<code>{path}</code>" in html, path
    assert "/api/me/threads/{thread_id}" in html


def test_docs_escape_what_the_schema_says() -> None:
    html = render_docs(
        {
            "info": {"title": "<b>x</b>", "version": "1"},
            "paths": {"/p": {"get": {"summary": "<script>alert(1)</script>", "responses": {}}}},
        }
    )
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>x</b>" not in html
