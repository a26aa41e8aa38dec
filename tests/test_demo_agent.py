"""The demo agent streams every answer: ``text_delta`` chunks whose concatenation is the final
report, over a real socket to a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.agents.demo import chunks
from runtime.events import EventType
from runtime.tools.builtin import docs_search_tool, snippet

from .conftest import LiveServer
from .invariants import assert_valid


@pytest.mark.parametrize(
    "text",
    ["hello there", "what is 6*7", "what time is it", "search resume", "fail tool", "wait 1"],
)
async def test_every_answer_is_streamed_and_equals_its_deltas(live: LiveServer, text: str) -> None:
    client = await live.client("alice")
    events = await (await client.chat(text)).wait(20)
    assert_valid(events)
    kinds = [e.type for e in events]
    final = kinds.index(EventType.FINAL_REPORT)
    deltas = [i for i, k in enumerate(kinds) if k == EventType.TEXT_DELTA]
    assert len(deltas) >= 2, kinds
    # The answer streams after the tools and thinking, right before the final report.
    assert deltas == list(range(final - len(deltas), final))
    streamed = "".join(events[i].data["text"] for i in deltas)
    assert streamed == events[final].data["text"]


async def test_a_crash_streams_nothing(live: LiveServer) -> None:
    client = await live.client("alice")
    events = await (await client.chat("crash")).wait(20)
    assert not any(e.type == EventType.TEXT_DELTA for e in events)
    assert events[-1].data["code"] == "agent_failed"


def test_chunks_keep_every_character() -> None:
    for text in ["", "one", "  two  words ", "a\n\n- b\n- `c d`\n", "x " * 50]:
        pieces = chunks(text)
        assert "".join(pieces) == text
        assert all(pieces)


def test_search_snippets_are_cut_between_words() -> None:
    text = "alpha beta `gamma delta` epsilon " * 20
    cut = snippet(text, 60)
    assert len(cut) <= 60 and cut.endswith("…")
    words = set(text.split()) | {"`gamma", "delta`", "`gamma`"}
    assert all(w in words for w in cut[:-1].split()), cut
    assert cut.count("`") % 2 == 0, "a code span the cut opened is closed"
    assert snippet("short text") == "short text"


def test_search_reads_tables_as_prose(tmp_path: Path) -> None:
    doc = tmp_path / "ops.md"
    doc.write_text(
        "# Close codes\n\n| code | meaning |\n|---|---|\n| 4401 | unauthorized: resume later |\n"
        "| 4008 | slow consumer |\n",
        encoding="utf-8",
    )
    hits = docs_search_tool([str(doc)]).func(query="resume")["hits"]
    assert [h["snippet"] for h in hits] == ["4401 — unauthorized: resume later"]
    assert hits[0]["section"] == "Close codes"
