"""Transport-level defences for the screening service: body size and time limits, slow-header clients.

uvicorn bounds idle keep-alive connections but puts no deadline on a request's *headers* or *body*:
a client that trickles one byte every few seconds holds a connection (and, mid-body, a request
handler) for as long as it likes. The guards here give each phase a deadline:

* :class:`HeaderDeadlineH11Protocol`: a connection whose request headers are not complete within
  ``header_timeout_s`` is closed (uvicorn's h11 protocol, subclassed; chosen explicitly so the
  guard does not depend on which HTTP parser happens to be installed).
* :class:`BodyGuard`: ASGI middleware answering 413 for bodies over the limit (by Content-Length and
  while streaming) and 408 when a body does not finish arriving within ``body_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("cxr_edge.serve")


class BodyGuard:
    """ASGI middleware: 413 over ``max_bytes``, 408 when the body takes longer than ``timeout_s``."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if self.max_bytes and length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await plain_response(send, 413, f"request body over {self.max_bytes} bytes")
        from starlette.exceptions import HTTPException

        seen = 0
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        body_done = False

        # Raised from inside the app's receive(), these surface as the route's own 413/408 answer
        # (Starlette turns HTTPException into a response); the connection is closed after it.
        async def guarded():
            nonlocal seen, body_done
            if body_done or deadline is None:
                msg = await receive()
            else:
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    log.warning("request body from %s did not arrive within %.0f s; answering 408",
                                _client(scope), self.timeout_s)
                    raise HTTPException(408, f"request body did not arrive within {self.timeout_s:.0f} s",
                                        headers={"Connection": "close"}) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if self.max_bytes and seen > self.max_bytes:
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes", headers={"Connection": "close"})
                body_done = not msg.get("more_body", False)
            return msg

        await self.app(scope, guarded, send)


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "unknown client"


async def plain_response(send, status: int, text: str, close: bool = True):
    body = json.dumps({"detail": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header_deadline_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on receiving each request's headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_deadline = None
            self._arm()

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self):
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self):
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expire(self):
            self._header_deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                log.warning("closing connection from %s: request headers incomplete after %.0f s",
                            f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client",
                            header_timeout_s)
                self.transport.close()

        def data_received(self, data):
            if self._waiting_for_headers():
                self._arm()  # a new request starts: its headers get their own deadline
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11Protocol


def run_server(app, host: str, port: int, *, header_timeout_s: float = 10.0, graceful_timeout_s: float = 30.0,
               limit_concurrency: int | None = None, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn with the guards above (h11 parser, header deadline, graceful drain)."""
    from ..extras import require

    uvicorn = require("uvicorn")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=header_deadline_protocol(header_timeout_s),
                            timeout_graceful_shutdown=int(graceful_timeout_s), limit_concurrency=limit_concurrency)
    uvicorn.Server(config).run()
