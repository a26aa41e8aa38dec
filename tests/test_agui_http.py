"""``/agui`` at the HTTP edge (httpx against a live server): what is refused before a stream
starts, a closed stream that is not a cancel, and a run started over AG-UI resumed over ``/ws``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from monitor.report import judge_runs
from monitor.rules import RuleConfig
from runtime.events import EventType, now_us
from runtime.store.models import ConnectionRow

from .conftest import LiveServer, make_settings, scale, serve_runtime, sqlite_url, wait_until


def body(text: str | None = "what is 6*7", **extra: Any) -> dict[str, Any]:
    messages = [] if text is None else [{"id": "u1", "role": "user", "content": text}]
    return {
        "threadId": extra.pop("threadId", f"t-{uuid.uuid4()}"),
        "runId": extra.pop("runId", str(uuid.uuid4())),
        "messages": messages,
        "tools": [],
        "context": [],
        "state": {},
        "forwardedProps": {},
        **extra,
    }


def bearer(live: LiveServer, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {live.token(user)}"}


async def read_stream(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(id, event)`` of every frame, to the end of the response."""
    frames = []
    frame_id = ""
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            frame_id = line[4:]
        elif line.startswith("data: "):
            frames.append((frame_id, json.loads(line[6:])))
    return frames


async def test_refusals_before_the_stream(tmp_path: Path) -> None:
    settings = make_settings(sqlite_url(tmp_path / "rw.db"), max_connections_per_user=2)
    async with (
        serve_runtime(settings) as live,
        httpx.AsyncClient(base_url=live.http_url, timeout=10 * scale()) as http,
    ):
        alice, bob = bearer(live, "alice"), bearer(live, "bob")

        async def status(path: str, payload: Any, headers: dict[str, str], **kw: Any) -> int:
            response = await http.post(path, json=payload, headers=headers, **kw)
            return response.status_code

        # Auth like /ws.
        assert await status("/agui", body(), {}) == 401
        assert await status("/agui", body(), {"Authorization": "Bearer nope"}) == 401
        # Not a RunAgentInput, or nothing to answer.
        assert (await http.post("/agui", content=b"{", headers=alice)).status_code == 422
        assert await status("/agui", {"threadId": "t"}, alice) == 422
        assert await status("/agui", body(None), alice) == 422
        assert await status("/agui", body("   "), alice) == 422
        assert await status("/agui", body("a\x00b"), alice) == 422
        assert await status("/agui", body(threadId="has space"), alice) == 422
        assert await status("/agui", body(forwardedProps={"agent": "nobody"}), alice) == 422
        big = b'{"x": "' + b"a" * 1_100_000 + b'"}'
        assert (await http.post("/agui", content=big, headers=alice)).status_code == 413

        # Alice's run in a thread she names; Bob cannot use the thread, the run or cancel it.
        mine = body("what is 2*3")
        async with http.stream("POST", "/agui", json=mine, headers=alice) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            frames = await read_stream(response)
        run_id = response.headers["x-runwatch-run-id"]
        assert frames[-1][1]["type"] == "RUN_FINISHED"
        assert all(fid.startswith(f"{run_id}:") for fid, _ in frames)
        assert await status("/agui", body(threadId=mine["threadId"]), bob) == 404
        assert await status("/agui/connect", mine, bob) == 404
        assert await status("/agui/cancel", {"runId": mine["runId"]}, bob) == 404
        assert await status("/agui/connect", body(), alice) == 404
        # Cancelling a run that has ended is answered, and ignored.
        ended = await http.post("/agui/cancel", json={"runId": mine["runId"]}, headers=alice)
        assert ended.status_code == 202 and ended.json()["ended"] is True
        # Last-Event-ID must be what the stream sent, name a run of yours, and match runId.
        last = {"Last-Event-ID": frames[-1][0]}
        assert await status("/agui", mine, {**alice, "Last-Event-ID": "junk"}) == 400
        assert await status("/agui", mine, {**bob, **last}) == 404
        assert await status("/agui", body(), {**alice, **last}) == 409
        # With a matching runId it is a resume: snapshot, then (the run has ended) its end.
        async with http.stream("POST", "/agui", json=mine, headers={**alice, **last}) as again:
            resumed = [e["type"] for _, e in await read_stream(again)]
        assert resumed == ["RUN_STARTED", "MESSAGES_SNAPSHOT", "RUN_FINISHED"]
        # /agui/connect also takes runwatch's own run id.
        by_id = {**mine, "runId": run_id}
        async with http.stream("POST", "/agui/connect", json=by_id, headers=alice) as again:
            assert [e["type"] for _, e in await read_stream(again)] == resumed
        # A thread runwatch has not seen becomes the caller's: Bob now owns his.
        assert await status("/agui", body("hello", threadId="bobs-thread"), bob) == 200
        assert await status("/agui", body("hello", threadId="bobs-thread"), alice) == 404

        # Connections per user, as on /ws: the third open stream is refused with 429.
        opened = []
        for _ in range(2):
            request = http.build_request("POST", "/agui", json=body("wait 2"), headers=alice)
            opened.append(await http.send(request, stream=True))
        try:
            assert all(r.status_code == 200 for r in opened)
            refused = await http.post("/agui", json=body("wait 2"), headers=alice)
            assert refused.status_code == 429 and refused.headers["retry-after"]
        finally:
            for response in opened:
                await response.aclose()


async def test_a_closed_stream_is_not_a_cancel_and_is_recorded(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "rw.db")
    async with (
        serve_runtime(make_settings(db)) as live,
        httpx.AsyncClient(base_url=live.http_url, timeout=10 * scale()) as http,
    ):
        payload = body("wait 2")
        async with http.stream("POST", "/agui", json=payload, headers=bearer(live, "carol")) as r:
            run_id = r.headers["x-runwatch-run-id"]
            async for line in r.aiter_lines():
                if "TOOL_CALL_END" in line:
                    break  # the client goes away mid-run

        async def ended() -> bool:
            run = await live.rt.store.get_run(run_id)
            return run is not None and run.ended_us is not None

        await wait_until(ended, 10)
        run = await live.rt.store.get_run(run_id)
        assert run is not None and run.outcome == "completed"
        await live.rt.writer.flush(timeout=10)
        await wait_until(lambda: live.metric("runwatch_disconnects_total", {"code": "1001"}) >= 1)
        async with live.rt.store.engine.connect() as conn:
            rows = (await conn.execute(select(ConnectionRow))).all()
        assert [(c.client, c.close_code) for c in rows] == [("agui-sse", 1001)]
        # Events after the drop were deferred (nobody watched), those before were acked on
        # write: the run is clean.
        verdicts = await judge_runs(
            live.rt.store, RuleConfig(ack_wait_s=0), since_us=0, run_id=run_id, now_us=now_us()
        )
        assert verdicts[0]["verdict"] == "pass", verdicts

        # The same run over /ws: resumed from the store, to its end.
        client = await live.client("carol")
        resumed = await client.resume(run_id, 0)
        events = await resumed.wait(10 * scale())
        assert events[0].type == EventType.AGENT_STARTED
        assert events[-1].type == EventType.AGENT_COMPLETED
