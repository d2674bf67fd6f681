"""A socket transport that sends each event-loop step's writes as one ``send`` (used by every server connection;
why: :class:`CorkedTransport`)."""

from __future__ import annotations

import asyncio
from typing import Any


class CorkedTransport:
    """A socket transport whose writes within one event-loop step leave as one ``send``.

    uvicorn writes a response's head and body separately, two sends where one would do; on loopback each send
    also runs the receiver's TCP path on the sender's CPU, so they were the largest single cost of a request.
    The writes are gathered and sent at the end of the step (at once past ``CORK_BYTES``, and before a close).
    """

    CORK_BYTES = 64 << 10

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the step's one send."""
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size > self.CORK_BYTES:
            self.flush()

    def writelines(self, lines: Any) -> None:
        """Queue each of ``lines``."""
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what is queued."""
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        """Send what is queued, then close."""
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Send what is queued, then half-close."""
        self.flush()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        """Whether the socket is closing (asked for every socket when the cap is reached: kept off __getattr__)."""
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        """Bytes queued here and in the socket transport."""
        return self._size + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:  # everything else is the socket transport's own
        return getattr(self._transport, name)
