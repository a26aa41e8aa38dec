"""A fault-injecting TCP proxy for outage tests: up, or down (connections cut and refused)."""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    """Forwards 127.0.0.1:<port> to a target; :meth:`down` cuts every connection and refuses
    new ones until :meth:`up`. Runs in the test's event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.is_up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refused = 0
        #: (marker, then): once a client sends ``marker``, its next chunk holding ``then`` is
        #: forwarded, and the connection is cut when the server answers, the answer held back
        #: (an ambiguous outcome: the server acted, the client never learns it).
        self.cut_after: tuple[bytes, bytes] | None = None
        self.cuts = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def down(self) -> None:
        self.is_up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def up(self) -> None:
        self.is_up = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_up:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})

        muted = asyncio.Event()
        answered = asyncio.Event()

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            armed = False
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if not upstream and muted.is_set():
                        answered.set()  # the server acted on what it was sent last
                        continue
                    cut = self.cut_after if upstream else None
                    cutting = False
                    if cut is not None:
                        armed = armed or cut[0] in data
                        if armed and cut[1] in data and data.find(cut[1]) > data.find(cut[0]):
                            self.cut_after = None
                            self.cuts += 1
                            muted.set()  # before forwarding: no part of the answer gets back
                            cutting = True
                    dst.write(data)
                    await dst.drain()
                    if cutting:
                        # Cut once the server has answered, so it surely acted on it.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(answered.wait(), 10)
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
