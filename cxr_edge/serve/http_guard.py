"""Transport-level defences for the screening service: body size and time limits, slow-header clients.

uvicorn bounds idle keep-alive connections but puts no deadline on a request's *headers* or *body*:
a client that trickles one byte every few seconds holds a connection (and, mid-body, a request
handler) for as long as it likes. The guards here give each phase a deadline:

* :class:`HeaderDeadlineH11Protocol`: a connection whose request headers are not complete within
  ``header_timeout_s`` is closed (uvicorn's h11 protocol, subclassed; chosen explicitly so the
  guard does not depend on which HTTP parser happens to be installed).
* :class:`BodyGuard`: ASGI middleware answering 413 for bodies over the limit (by Content-Length and
  while streaming), 408 when a body does not finish arriving within ``body_timeout_s`` or arrives
  slower than ``min_rate`` after a grace period, and 503 when the bodies held by all requests together
  would pass ``max_inflight_bytes`` (24 held 64 MB bodies were 1.4 GB).
* the same h11 protocol answers 400 to a body sent as a flood of tiny chunks: h11 parses each chunk in
  Python (1-byte chunks delayed everyone else's requests to 7.8 s), and uvicorn merges them before the
  app sees them, so only the protocol can count them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("cxr_edge.serve")


#: seconds before the minimum body rate applies (TCP slow start, a phone on a weak link)
RATE_GRACE_S = 2.0
#: chunks a body may arrive in before their average size is judged
SMALL_CHUNK_ALLOWANCE = 256
#: smallest average chunk (bytes) past the allowance; curl and browsers send 16-64 kB
MIN_AVERAGE_CHUNK = 512


class BodyGuard:
    """ASGI middleware bounding each request body (size, time, rate, chunking) and all bodies together."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = 30.0, max_inflight_bytes: int | None = None,
                 min_rate: float | None = None):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.max_inflight, self.min_rate = max_inflight_bytes, min_rate
        self.inflight = 0  # body bytes held by requests in progress (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if self.max_bytes and length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await plain_response(send, 413, f"request body over {self.max_bytes} bytes")
        if self.max_inflight and length is not None and length.isdigit() and self.inflight + int(length) > self.max_inflight:
            return await plain_response(send, 503, "the server holds too many uploads right now; retry shortly",
                                        extra=[(b"retry-after", b"1")])
        from starlette.exceptions import HTTPException

        seen = 0
        start = time.monotonic()
        deadline = start + self.timeout_s if self.timeout_s else None
        body_done = False

        def cut(status: int, text: str, extra: dict | None = None):
            return HTTPException(status, text, headers={"Connection": "close", **(extra or {})})

        # Raised from inside the app's receive(), these surface as the route's own 413/408/503 answer
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
                    raise cut(408, f"request body did not arrive within {self.timeout_s:.0f} s") from None
            if msg["type"] == "http.request" and not body_done:
                n = len(msg.get("body", b""))
                seen += n
                self.inflight += n
                if self.max_bytes and seen > self.max_bytes:
                    raise cut(413, f"request body over {self.max_bytes} bytes")
                if self.max_inflight and self.inflight > self.max_inflight:
                    raise cut(503, "the server holds too many uploads right now; retry shortly", {"Retry-After": "1"})
                body_done = not msg.get("more_body", False)
                if not body_done:
                    elapsed = time.monotonic() - start
                    if self.min_rate and elapsed > RATE_GRACE_S and seen / elapsed < self.min_rate:
                        log.warning("cutting off %s: body arriving at %.0f B/s", _client(scope), seen / elapsed)
                        raise cut(408, f"request body arrives at {seen / elapsed:.0f} bytes/s, under the "
                                       f"{self.min_rate:.0f} bytes/s minimum")
            return msg

        try:
            await self.app(scope, guarded, send)
        finally:
            self.inflight -= seen


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "unknown client"


async def plain_response(send, status: int, text: str, close: bool = True, extra: list | None = None):
    body = json.dumps({"detail": text}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
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
            self._count_chunks()

        def _count_chunks(self):
            """Wrap h11's event source: count body chunks per request; too many small ones end it with 400."""
            import h11

            next_event = self.conn.next_event
            counts = {"chunks": 0, "bytes": 0}

            def counted():
                event = next_event()
                if isinstance(event, h11.Request):
                    counts.update(chunks=0, bytes=0)
                elif isinstance(event, h11.Data):
                    counts["chunks"] += 1
                    counts["bytes"] += len(event.data)
                    if counts["chunks"] > SMALL_CHUNK_ALLOWANCE and counts["bytes"] < MIN_AVERAGE_CHUNK * counts["chunks"]:
                        log.warning("cutting off %s: request body in %d chunks of %.0f bytes on average",
                                    f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client",
                                    counts["chunks"], counts["bytes"] / counts["chunks"])
                        raise h11.RemoteProtocolError("request body sent in too many tiny chunks")
                return event

            self.conn.next_event = counted

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
