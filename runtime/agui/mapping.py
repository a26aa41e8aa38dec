"""runwatch lifecycle events to AG-UI 1.0 events, as pure code (the table is in docs/agui.md).

:class:`RunTranslator` follows one run event by event (``seq`` order, each seq once) and
answers, for each, the AG-UI events that carry it. It also keeps the run's conversation as an
AG-UI client would build it from those events (the user's input, assistant text, tool calls and
results, reasoning), so that a resumed stream can open with a ``MESSAGES_SNAPSHOT`` that matches,
id for id, what the client would have had.

What it guarantees, whatever the events (the runtime's invariants make most of it moot, but
the stream never depends on them): one ``RUN_STARTED``; at most one terminal event
(``RUN_FINISHED`` or ``RUN_ERROR``) and nothing after it; no ``TOOL_CALL_RESULT`` without its
``TOOL_CALL_START``; streamed text never reopened or sent twice; a cancelled run ends with
``RUN_ERROR`` (code ``cancelled``), never ``RUN_FINISHED``.

Ids are derived from the run, so the live stream, a replay and a snapshot always agree:
``{run_id}-user`` (the input), ``{run_id}-m{seq}`` (a text message, by the seq of its first
delta), ``{run_id}-a{seq}`` (an assistant message holding tool calls that no text preceded),
``{run_id}-{tool_call_id}`` (a tool call: runwatch's ids are unique per run only),
``{run_id}-{tool_call_id}-result`` and ``{run_id}-r{seq}`` (reasoning).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ag_ui.core import (
    AssistantMessage,
    BaseEvent,
    FunctionCall,
    Message,
    MessagesSnapshotEvent,
    ReasoningEndEvent,
    ReasoningMessage,
    ReasoningMessageContentEvent,
    ReasoningMessageEndEvent,
    ReasoningMessageStartEvent,
    ReasoningStartEvent,
    RunErrorEvent,
    RunFinishedEvent,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCall,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    ToolMessage,
    UserMessage,
)
from ag_ui.encoder import EventEncoder

from ..errors import SequenceGap
from ..events import Event, EventType

__all__ = ["RUNWATCH_KEY", "RunTranslator", "SequenceGap", "frame_id", "sse_frames"]

log = logging.getLogger("runwatch.agui")

#: The metadata key under which runwatch's own fields travel (``ag-ui`` is reserved).
RUNWATCH_KEY = "runwatch"

_ENCODER = EventEncoder()


def frame_id(run_id: str, seq: int) -> str:
    """The SSE ``id:`` of frames carrying ``seq`` of ``run_id`` (what ``Last-Event-ID`` sends)."""
    return f"{run_id}:{seq}"


def sse_frames(events: list[BaseEvent], event_id: str) -> str:
    """SSE text for ``events``, one frame each, all with the SSE ``id`` ``event_id``."""
    return "".join(f"id: {event_id}\n{_ENCODER.encode(e)}" for e in events)


@dataclass
class _Assistant:
    id: str
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def model(self) -> Message:
        return AssistantMessage(
            id=self.id, content=self.content, tool_calls=self.tool_calls or None
        )


@dataclass
class _Static:
    message: Message

    @property
    def id(self) -> str:
        return self.message.id

    def model(self) -> Message:
        return self.message


@dataclass
class _Call:
    agui_id: str
    tool: str
    parent_id: str
    done: bool = False


class RunTranslator:
    """One run, runwatch events in, AG-UI events out; see the module docstring."""

    def __init__(self, *, run_id: str, thread_id: str, agui_run_id: str) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        #: The client's ``runId`` (the run's ``client_msg_id``), used in ``RUN_*`` events.
        self.agui_run_id = agui_run_id
        self.last_seq = 0
        self.started_sent = False
        #: The terminal AG-UI event once the run has ended (sent once; nothing follows it).
        self.terminal: BaseEvent | None = None
        self._messages: list[_Assistant | _Static] = []
        self._open_text: _Assistant | None = None
        self._latest_text: _Assistant | None = None
        #: The assistant message tool calls attach to: the latest text message, or one made
        #: for calls no text preceded.
        self._assistant: _Assistant | None = None
        self._calls: dict[str, _Call] = {}
        self._streamed: list[str] = []
        self._last_event: Event | None = None

    # ---- state --------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    def messages(self) -> list[Message]:
        """The run's conversation so far, as an AG-UI client holds it after these events."""
        return [m.model() for m in self._messages]

    # ---- translation --------------------------------------------------------------------

    def translate(self, event: Event) -> list[BaseEvent]:
        """The AG-UI events for the next runwatch event of this run (``seq`` = last + 1)."""
        if event.seq != self.last_seq + 1:
            raise SequenceGap(self.run_id, self.last_seq + 1, event.seq)
        self.last_seq = event.seq
        self._last_event = event
        if self.terminal is not None:
            # I2 makes this unreachable; AG-UI forbids anything after the terminal event.
            log.warning("run %s: %s after the terminal event dropped", self.run_id, event.type)
            return []
        common = self._common(event)
        data = event.data
        match event.type:
            case EventType.AGENT_STARTED:
                return self._started(event, common)
            case EventType.AGENT_THINKING:
                return self._thinking(event, common)
            case EventType.TEXT_DELTA:
                return self._delta(event, str(data.get("text") or ""), common)
            case EventType.TOOL_EXECUTING:
                return self._tool_executing(event, common)
            case EventType.TOOL_COMPLETED:
                return self._tool_completed(event, common)
            case EventType.FINAL_REPORT:
                return self._final_report(event, str(data.get("text") or ""), common)
            case EventType.AGENT_COMPLETED:
                return self._completed(event, common)
            case EventType.AGENT_ERROR:
                return self._error(event, common)
        return []

    def resume_head(self, history: list[Message], now_us: int) -> list[BaseEvent]:
        """What a resumed stream opens with: ``RUN_STARTED``, a ``MESSAGES_SNAPSHOT`` of
        ``history`` (earlier runs of the thread) and this run so far, then the starts of what
        is still open (a text message, tool calls awaiting their result), or, for a run that
        has ended, its terminal event."""
        common: dict[str, Any] = {"timestamp": now_us // 1000, "raw_event": self._resumed_ref()}
        out: list[BaseEvent] = [self._run_started(common)]
        out.append(MessagesSnapshotEvent(messages=[*history, *self.messages()], **common))
        if self.terminal is not None:
            return [*out, self.terminal]
        if self._open_text is not None:
            out.append(
                TextMessageStartEvent(message_id=self._open_text.id, role="assistant", **common)
            )
        for call in self._calls.values():
            if not call.done:
                # The snapshot holds the call and its arguments; START/END (no ARGS, which
                # would append them again) reopen it so its result pairs in this stream.
                out.append(
                    ToolCallStartEvent(
                        tool_call_id=call.agui_id,
                        tool_call_name=call.tool,
                        parent_message_id=call.parent_id,
                        **common,
                    )
                )
                out.append(ToolCallEndEvent(tool_call_id=call.agui_id, **common))
        return out

    # ---- per type -----------------------------------------------------------------------

    def _common(self, event: Event) -> dict[str, Any]:
        return {
            "timestamp": event.ts_us // 1000,
            "raw_event": {
                "run_id": event.run_id,
                "seq": event.seq,
                "event_id": event.event_id,
                "type": event.type.value,
            },
        }

    def _resumed_ref(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"run_id": self.run_id, "seq": self.last_seq, "resumed": True}
        if self._last_event is not None:
            ref["event_id"] = self._last_event.event_id
            ref["type"] = self._last_event.type.value
        return ref

    def _run_started(self, common: dict[str, Any]) -> BaseEvent:
        self.started_sent = True
        return RunStartedEvent(
            thread_id=self.thread_id,
            run_id=self.agui_run_id,
            metadata={RUNWATCH_KEY: {"run_id": self.run_id}},
            **common,
        )

    def _started(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        text = event.data.get("input")
        self._messages.append(
            _Static(UserMessage(id=f"{self.run_id}-user", content=str(text or "")))
        )
        if self.started_sent:
            return []  # a resumed stream already opened with its own RUN_STARTED
        return [self._run_started(common)]

    def _thinking(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        # A closed reasoning message per thinking step.
        rid = f"{self.run_id}-r{event.seq}"
        text = str(event.data.get("text") or "")
        self._messages.append(_Static(ReasoningMessage(id=rid, content=text)))
        out: list[BaseEvent] = [
            ReasoningStartEvent(message_id=rid, **common),
            ReasoningMessageStartEvent(message_id=rid, role="reasoning", **common),
        ]
        if text:
            out.append(ReasoningMessageContentEvent(message_id=rid, delta=text, **common))
        out.append(ReasoningMessageEndEvent(message_id=rid, **common))
        out.append(ReasoningEndEvent(message_id=rid, **common))
        return out

    def _open(self, event: Event, common: dict[str, Any]) -> tuple[_Assistant, BaseEvent]:
        message = _Assistant(id=f"{self.run_id}-m{event.seq}", content="")
        self._messages.append(message)
        self._open_text = self._latest_text = self._assistant = message
        return message, TextMessageStartEvent(message_id=message.id, role="assistant", **common)

    def _close_text(self, common: dict[str, Any]) -> list[BaseEvent]:
        if self._open_text is None:
            return []
        message_id = self._open_text.id
        self._open_text = None
        return [TextMessageEndEvent(message_id=message_id, **common)]

    def _append(self, message: _Assistant, text: str, common: dict[str, Any]) -> BaseEvent:
        message.content = (message.content or "") + text
        return TextMessageContentEvent(message_id=message.id, delta=text, **common)

    def _delta(self, event: Event, text: str, common: dict[str, Any]) -> list[BaseEvent]:
        out: list[BaseEvent] = []
        message = self._open_text
        if message is None:
            message, start = self._open(event, common)
            out.append(start)
        if text:
            self._streamed.append(text)
            out.append(self._append(message, text, common))
        return out

    def _tool_executing(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        call_id = str(event.data.get("tool_call_id"))
        tool = str(event.data.get("tool") or "")
        out = self._close_text(common)
        parent = self._assistant
        if parent is None:
            parent = _Assistant(id=f"{self.run_id}-a{event.seq}")
            self._messages.append(parent)
            self._assistant = parent
        agui_id = f"{self.run_id}-{call_id}"
        args = json.dumps(event.data.get("args", {}), ensure_ascii=False, separators=(",", ":"))
        parent.tool_calls.append(
            ToolCall(id=agui_id, type="function", function=FunctionCall(name=tool, arguments=args))
        )
        self._calls[call_id] = _Call(agui_id, tool, parent.id)
        out.append(
            ToolCallStartEvent(
                tool_call_id=agui_id, tool_call_name=tool, parent_message_id=parent.id, **common
            )
        )
        out.append(ToolCallArgsEvent(tool_call_id=agui_id, delta=args, **common))
        out.append(ToolCallEndEvent(tool_call_id=agui_id, **common))
        return out

    def _tool_completed(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        call_id = str(event.data.get("tool_call_id"))
        call = self._calls.get(call_id)
        if call is None or call.done:
            # I4 makes this unreachable; a result without its call is never sent.
            log.warning("run %s: tool_completed %s without an open call", self.run_id, call_id)
            return []
        call.done = True
        status = event.data.get("status")
        details: dict[str, Any] = {
            "tool": call.tool,
            "tool_call_id": call_id,
            "status": status,
            "duration_ms": event.data.get("duration_ms"),
        }
        if status == "ok":
            content = json.dumps(event.data.get("result"), ensure_ascii=False)
        else:
            error = str(event.data.get("error") or "the tool failed")
            details["error"] = error
            content = error
        metadata = {RUNWATCH_KEY: details}
        result_id = f"{call.agui_id}-result"
        self._insert_result(
            call.parent_id,
            ToolMessage(
                id=result_id, tool_call_id=call.agui_id, content=content, metadata=metadata
            ),
        )
        return [
            ToolCallResultEvent(
                message_id=result_id,
                tool_call_id=call.agui_id,
                content=content,
                role="tool",
                metadata=metadata,
                **common,
            )
        ]

    def _insert_result(self, parent_id: str, message: ToolMessage) -> None:
        # Where the client puts it: right after its assistant message and the results there.
        at = next(i for i, m in enumerate(self._messages) if m.id == parent_id) + 1
        while at < len(self._messages) and isinstance(self._messages[at].model(), ToolMessage):
            at += 1
        self._messages.insert(at, _Static(message))

    def _final_report(self, event: Event, text: str, common: dict[str, Any]) -> list[BaseEvent]:
        """The answer: streamed text is closed, never sent twice and never reopened."""
        streamed = "".join(self._streamed)
        latest = self._latest_text.content if self._latest_text is not None else None
        if not self._streamed:
            if not text:
                return []
            message, start = self._open(event, common)
            return [start, self._append(message, text, common), *self._close_text(common)]
        if text in ("", streamed, latest):
            return self._close_text(common)
        open_text = self._open_text
        if open_text is not None:
            for prefix in (streamed, open_text.content or ""):
                if text.startswith(prefix):
                    rest = self._append(open_text, text[len(prefix) :], common)
                    return [rest, *self._close_text(common)]
        # The answer differs from what was streamed: it is a message of its own.
        out = self._close_text(common)
        message, start = self._open(event, common)
        return [*out, start, self._append(message, text, common), *self._close_text(common)]

    def _completed(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        details = {"duration_ms": event.data.get("duration_ms")}
        if event.data.get("usage") is not None:
            details["usage"] = event.data["usage"]
        out = self._close_text(common)
        self.terminal = RunFinishedEvent(
            thread_id=self.thread_id,
            run_id=self.agui_run_id,
            metadata={RUNWATCH_KEY: details},
            **common,
        )
        return [*out, self.terminal]

    def _error(self, event: Event, common: dict[str, Any]) -> list[BaseEvent]:
        # A cancelled, timed-out or failed run ends in RUN_ERROR: never a success.
        out = self._close_text(common)
        code = str(event.data.get("code") or "internal")
        self.terminal = RunErrorEvent(
            message=str(event.data.get("message") or code),
            code=code,
            metadata={RUNWATCH_KEY: {"retryable": bool(event.data.get("retryable"))}},
            **common,
        )
        return [*out, self.terminal]
