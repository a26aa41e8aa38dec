"""The reference servers ``python -m runtime.bench compare`` measures runwatch against.

Both push frames shaped like a runwatch ``text_delta`` event (the same envelope fields, a
fresh ``seq`` and ``ts`` per frame, padded to an exact byte length) as fast as they can, with
no store, no metrics and no acknowledgements:

- :func:`bare_app`: FastAPI + a WebSocket route at ``/ws``; the client sends
  ``{"count": N, "size": S}`` and receives N text frames of S bytes;
- :func:`socketio_app`: python-socketio (ASGI) at ``/socket.io/``; the client emits
  ``flood`` with ``{"count": N, "size": S}`` and receives N ``delta`` events, each frame
  (``42["delta",{...}]``) S bytes long.

Run them under uvicorn with ``--factory``, as the benchmark does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from .events import format_ts, now_us

__all__ = ["SOCKETIO_WRAPPER", "bare_app", "frame_maker", "socketio_app"]

#: What Socket.IO adds around an event's JSON payload: ``42["delta",`` and ``]``.
SOCKETIO_WRAPPER = len('42["delta",]')

_ID = "0" * 26  # the length of a ULID


def frame_maker(size: int) -> Callable[[int], dict[str, Any]]:
    """Frames ``seq -> envelope`` whose compact JSON is exactly ``size`` bytes (if it can be)."""
    text = os.urandom(size).hex()[:size]
    base = {
        "type": "text_delta",
        "event_id": _ID,
        "run_id": _ID,
        "thread_id": _ID,
        "seq": 0,
        "ts": format_ts(now_us()),
        "agent": "flood",
        "data": {"text": ""},
    }
    # The JSON length only varies with the digits of seq: pad the text by what is left.
    overhead = len(json.dumps(base, separators=(",", ":"))) - 1
    pad = size - overhead

    def make(seq: int) -> dict[str, Any]:
        return {
            "type": "text_delta",
            "event_id": _ID,
            "run_id": _ID,
            "thread_id": _ID,
            "seq": seq,
            "ts": format_ts(now_us()),
            "agent": "flood",
            "data": {"text": text[: max(0, pad - len(str(seq)))]},
        }

    return make


def bare_app() -> Any:
    """A bare FastAPI WebSocket server: a request in, N frames out, as fast as it can."""
    app = FastAPI()

    @app.websocket("/ws")
    async def flood(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                request = json.loads(await websocket.receive_text())
                make = frame_maker(int(request["size"]))
                for seq in range(1, int(request["count"]) + 1):
                    await websocket.send_text(json.dumps(make(seq), separators=(",", ":")))
        except WebSocketDisconnect:
            pass

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


def socketio_app() -> Any:
    """A python-socketio ASGI server: an emitted ``flood`` in, N ``delta`` events out."""
    import socketio  # the ``bench`` extra

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[])

    @sio.on("flood")
    async def flood(sid: str, request: dict[str, Any]) -> None:
        make = frame_maker(int(request["size"]) - SOCKETIO_WRAPPER)
        for seq in range(1, int(request["count"]) + 1):
            await sio.emit("delta", make(seq), to=sid)

    return socketio.ASGIApp(sio)
