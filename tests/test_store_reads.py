"""Contract of the chat read queries (runtime/store/reads.py) on real SQLite and PostgreSQL."""

from __future__ import annotations

import itertools

from runtime.events import new_id
from runtime.lifecycle import RunLifecycle
from runtime.store.audit import AuditStore, Batch, RunInfo
from runtime.store.reads import TITLE_CHARS, list_threads, thread_runs

_clock = itertools.count(1_800_000_000_000_000, 1_000_000)


async def add_run(
    store: AuditStore, user: str, thread: str, text: str, *, new_thread: bool, end: bool = True
) -> RunInfo:
    created = next(_clock)
    info = RunInfo(new_id(), user, thread, "demo", new_id(), "test", created)
    await store.create_run(info, new_thread=new_thread)
    ticks = itertools.count(created, 100)
    lc = RunLifecycle(info.run_id, thread, "demo", lambda: next(ticks))
    events = [lc.started(text), lc.thinking("t")]
    if end:
        events += [lc.final_report("ok"), lc.completed()]
    await store.write(Batch(events=[(e, True) for e in events]), created + 1000)
    return info


async def test_threads_newest_activity_first_titled_by_their_first_message(
    store: AuditStore,
) -> None:
    a, b = new_id(), new_id()
    await add_run(store, "alice", a, "first   question\nof thread a", new_thread=True)
    await add_run(store, "alice", b, "only question of b", new_thread=True)
    last = await add_run(store, "alice", a, "second of a", new_thread=False, end=False)
    await add_run(store, "bob", new_id(), "bob's secret", new_thread=True)

    async with store.engine.connect() as conn:
        threads, cursor = await list_threads(conn, "alice")
    assert cursor is None
    assert [t.thread_id for t in threads] == [a, b], "the thread with the newest run first"
    assert threads[0].title == "first question of thread a"
    assert threads[0].run_count == 2 and threads[1].run_count == 1
    assert threads[0].last_run_us == last.created_us
    assert threads[0].to_dict()["last_run_at"].endswith("Z")

    async with store.engine.connect() as conn:
        assert [t.title for t in (await list_threads(conn, "bob"))[0]] == ["bob's secret"]
        assert (await list_threads(conn, "carol"))[0] == []


async def test_threads_page_by_cursor_without_gaps_or_repeats(store: AuditStore) -> None:
    made = []
    for n in range(7):
        thread = new_id()
        await add_run(store, "pager", thread, f"question {n} " + "x" * 200, new_thread=True)
        made.append(thread)
    seen: list[str] = []
    cursor = None
    async with store.engine.connect() as conn:
        while True:
            page, cursor = await list_threads(conn, "pager", limit=3, before=cursor)
            seen += [t.thread_id for t in page]
            assert all(len(t.title) <= TITLE_CHARS and t.title.endswith("…") for t in page)
            if cursor is None:
                break
    assert seen == list(reversed(made))


async def test_thread_runs_in_order_and_only_for_the_owner(store: AuditStore) -> None:
    thread = new_id()
    one = await add_run(store, "alice", thread, "one", new_thread=True)
    two = await add_run(store, "alice", thread, "two", new_thread=False, end=False)
    async with store.engine.connect() as conn:
        runs = await thread_runs(conn, "alice", thread)
        assert runs is not None
        assert [(r.run_id, r.input) for r in runs] == [(one.run_id, "one"), (two.run_id, "two")]
        assert runs[0].outcome == "completed" and runs[0].last_seq == 4
        assert runs[1].outcome is None and runs[1].ended_us is None
        assert runs[1].to_dict()["ended_at"] is None
        newest = await thread_runs(conn, "alice", thread, limit=1)
        assert newest is not None and [r.run_id for r in newest] == [two.run_id]
        # Someone else's thread and a thread that does not exist read the same: absent.
        assert await thread_runs(conn, "mallory", thread) is None
        assert await thread_runs(conn, "alice", "no-such-thread") is None
