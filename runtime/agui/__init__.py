"""AG-UI 1.0 over Server-Sent Events: ``POST /agui``, ``/agui/connect``, ``/agui/cancel``.

Chat frontends that speak AG-UI (``@ag-ui/client``'s ``HttpAgent``, CopilotKit and others) run
runwatch agents here. It is the same run as on ``/ws``, only framed differently:

- :mod:`.mapping`: runwatch lifecycle events to AG-UI events, and the conversation snapshot a
  resumed stream opens with (pure, no I/O);
- :mod:`.stream`: one SSE response as a hub connection, acknowledged by write completion;
- :mod:`.router`: the HTTP endpoints (auth, input, idempotency by ``runId``, resume, cancel).

docs/agui.md has the event mapping and the delivery accounting.
"""

from __future__ import annotations

from .mapping import RUNWATCH_KEY, RunTranslator, SequenceGap, frame_id, sse_frames
from .router import AguiConfig, build_agui_router
from .stream import SSE_CLIENT, AguiStream, EventStreamResponse, Mode, SseTransport

__all__ = [
    "RUNWATCH_KEY",
    "SSE_CLIENT",
    "AguiConfig",
    "AguiStream",
    "EventStreamResponse",
    "Mode",
    "RunTranslator",
    "SequenceGap",
    "SseTransport",
    "build_agui_router",
    "frame_id",
    "sse_frames",
]
