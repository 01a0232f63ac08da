"""Transport-level defences for the screening service: what one connection may hold, and for how long.

uvicorn bounds idle keep-alive connections but puts no deadline on a request's *headers*, *body* or on
a client that never reads its *response*, and its connection limit counts sockets that have not sent a
request yet. The guards here give each phase a bound:

* :class:`BodyGuard`: ASGI middleware answering 413 for bodies over the limit (by Content-Length and
  while streaming), 408 when the server waited longer than ``body_timeout_s`` for a body or it arrived
  slower than ``min_rate`` *while the server was waiting for it* (time the server itself spent elsewhere
  is not the client's: under load a wall-clock rate cut off honest uploads), and 503 when the bodies
  held by all requests together would pass ``max_inflight_bytes``.
* :func:`guarded_protocol`: uvicorn's h11 protocol, subclassed (chosen explicitly so the guards do not
  depend on which HTTP parser happens to be installed), which
  - closes a connection whose request headers are not complete within ``header_timeout_s``;
  - keeps at most ``max_pending_headers`` connections waiting for headers and closes the *oldest* when a
    new one arrives (an honest client sends its headers in milliseconds, a slowloris socket is always the
    oldest), and counts only connections past their headers against ``max_connections`` (uvicorn counted
    half-open sockets, so a slowloris kept honest clients at 503);
  - drops a connection whose response makes no progress for ``write_timeout_s``, and the longest-stalled
    ones while responses waiting for slow readers pass ``max_unsent_bytes`` all together (clients that
    never read their explain answers held gigabytes);
  - answers 414/431 to request lines and header blocks over their limits (h11 bounds only *incomplete*
    events, so a huge URL sent in one segment was accepted) and 400 to a body sent as a flood of tiny
    chunks (uvicorn merges chunks before the app sees them, so only the protocol can count them);
  - after answering a request whose body it did not read (408, 413, 503), shuts its write side and reads
    and drops what the client still sends for a moment (a lingering close, as nginx does) before closing,
    so the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("cxr_edge.serve")


#: seconds of waiting for a body before the minimum rate applies (TCP slow start, a phone on a weak link)
RATE_GRACE_S = 2.0
#: chunks a body may arrive in before their average size is judged
SMALL_CHUNK_ALLOWANCE = 256
#: smallest average chunk (bytes) past the allowance; curl and browsers send 16-64 kB
MIN_AVERAGE_CHUNK = 512
#: how often stalled responses are looked at (progress, total unsent bytes)
STALL_CHECK_S = 1.0
#: a connection waiting for headers is never closed for a newcomer before this age: when many clients connect at
#: once, the oldest may simply not have been read yet (one honest client was cut off that way)
EVICT_GRACE_S = 1.0
#: after dropping slow readers, when to give the freed memory back to the system
TRIM_DELAY_S = 1.0


@dataclass(frozen=True)
class TransportLimits:
    """What one connection may hold of the server and for how long (the module docstring says why each)."""

    header_timeout_s: float = 10.0  # request headers complete within this, or the connection is closed
    max_connections: int = 512  # connections past their headers (requests in progress); 503 above
    max_pending_headers: int = 256  # connections still sending headers; the oldest is closed beyond
    write_timeout_s: float = 30.0  # a response making no progress this long is dropped
    max_unsent_bytes: int = 256 * 1024 * 1024  # response bytes waiting for slow readers, all connections
    max_target_bytes: int = 8 * 1024  # request line target (path and query): 414 above
    max_header_count: int = 100  # request header fields: 431 above
    max_header_bytes: int = 32 * 1024  # request header block: 431 above
    linger_s: float = 2.0  # lingering close: quiet time after which the connection is closed
    max_linger_s: float = 10.0  # lingering close: longest time the client's unread body is drained


#: what the transport guards did, by event (exported by /metrics)
STATS: Counter = Counter()
_BOOKS: weakref.WeakSet[ConnectionBook] = weakref.WeakSet()


def transport_snapshot() -> dict:
    """Connections waiting for headers, response bytes waiting for slow readers, and the guards' event counts."""
    books = list(_BOOKS)
    return {"pending_headers": sum(len(b.pending) for b in books),
            "unsent_response_bytes": sum(b.unsent_bytes() for b in books), "events": dict(STATS)}


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
        waited = 0.0  # seconds the app spent waiting for this body: the client's share of the time
        body_done = False

        def cut(status: int, text: str, extra: dict | None = None):
            return HTTPException(status, text, headers={"Connection": "close", **(extra or {})})

        # Raised from inside the app's receive(), these surface as the route's own 413/408/503 answer
        # (Starlette turns HTTPException into a response); the connection is closed after it.
        async def guarded():
            nonlocal seen, body_done, waited
            if body_done or not self.timeout_s:
                msg = await receive()
            else:
                t = time.monotonic()
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, self.timeout_s - waited))
                except asyncio.TimeoutError:
                    log.warning("request body from %s did not arrive within %.0f s of waiting; answering 408",
                                _client(scope), self.timeout_s)
                    raise cut(408, f"request body did not arrive within {self.timeout_s:.0f} s") from None
                finally:
                    waited += time.monotonic() - t
            if msg["type"] == "http.request" and not body_done:
                n = len(msg.get("body", b""))
                seen += n
                self.inflight += n
                if self.max_bytes and seen > self.max_bytes:
                    raise cut(413, f"request body over {self.max_bytes} bytes")
                if self.max_inflight and self.inflight > self.max_inflight:
                    raise cut(503, "the server holds too many uploads right now; retry shortly", {"Retry-After": "1"})
                body_done = not msg.get("more_body", False)
                if not body_done and self.min_rate and waited > RATE_GRACE_S and seen / waited < self.min_rate:
                    log.warning("cutting off %s: body arriving at %.0f B/s while the server waited for it",
                                _client(scope), seen / waited)
                    raise cut(408, f"request body arrives at {seen / waited:.0f} bytes/s, under the "
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




class ConnectionBook:
    """The connections of one server: which still wait for headers (oldest first) and which responses stall."""

    def __init__(self, limits: TransportLimits):
        self.limits = limits
        self.pending: dict = {}  # protocol -> time it began waiting for headers (insertion order is age)
        self.idle: dict = {}  # protocol -> time its last answer completed (keep-alive, nothing sent since)
        self.lingering: set = set()  # answered, draining what the client still sends before closing
        self.stalled: dict = {}  # protocol -> [bytes buffered, time of last progress]
        self._ticker: asyncio.TimerHandle | None = None
        self._trim: asyncio.TimerHandle | None = None
        _BOOKS.add(self)

    # ---- header slots
    def wait_headers(self, proto) -> None:
        """``proto`` waits for a request's headers; beyond the limit the oldest waiting connection is closed."""
        self.pending.pop(proto, None)
        self.pending[proto] = time.monotonic()
        while len(self.pending) > self.limits.max_pending_headers:
            oldest = next(iter(self.pending))
            age = time.monotonic() - self.pending[oldest]
            if oldest is proto or age < EVICT_GRACE_S:  # a burst of new clients: give the loop time to read them
                break
            self.pending.pop(oldest)
            STATS["pending_headers_evicted"] += 1
            if STATS["pending_headers_evicted"] % 100 == 1:  # one line per hundred: a slowloris would flood the log
                log.warning("%d connections waiting for headers: closed the oldest (%s, %.1f s; %d closed so far)",
                            self.limits.max_pending_headers, _peer(oldest), age, STATS["pending_headers_evicted"])
            oldest.close_now()

    def headers_done(self, proto) -> None:
        self.pending.pop(proto, None)

    def go_idle(self, proto) -> None:
        """``proto`` answered and keeps the connection open; beyond as many idle connections as requests may be in
        progress, the one idle longest is closed (uvicorn's keep-alive timeout closes the others). Idle connections
        are kept apart from those sending headers: evicting them for a slowloris closed an honest client's
        connection just as it sent its next request."""
        self.idle.pop(proto, None)
        self.idle[proto] = time.monotonic()
        while len(self.idle) > self.limits.max_connections:
            oldest = next(iter(self.idle))
            if oldest is proto:
                break
            self.idle.pop(oldest)
            STATS["idle_connections_closed"] += 1
            oldest.close_now()

    def busy(self, proto) -> None:
        self.idle.pop(proto, None)

    def forget(self, proto) -> None:
        self.pending.pop(proto, None)
        self.idle.pop(proto, None)
        self.lingering.discard(proto)
        self.stalled.pop(proto, None)

    # ---- response bytes nobody reads
    def stall(self, proto) -> None:
        """``proto``'s transport buffer passed its high-water mark: watch it until it drains."""
        self.stalled[proto] = [proto.write_buffer_size(), time.monotonic()]
        self._enforce()
        if self.stalled and self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(STALL_CHECK_S, self._tick)

    def unstall(self, proto) -> None:
        self.stalled.pop(proto, None)

    def unsent_bytes(self) -> int:
        return sum(v[0] for v in self.stalled.values())

    def _tick(self) -> None:
        self._ticker = None
        self._enforce()
        if self.stalled:
            self._ticker = asyncio.get_running_loop().call_later(STALL_CHECK_S, self._tick)

    def _enforce(self) -> None:
        now = time.monotonic()
        for proto, st in list(self.stalled.items()):
            size = proto.write_buffer_size()
            if size < st[0]:
                st[1] = now
            st[0] = size
            if now - st[1] > self.limits.write_timeout_s:
                self._drop(proto, f"its response made no progress for {self.limits.write_timeout_s:.0f} s")
        while self.stalled and self.unsent_bytes() > self.limits.max_unsent_bytes:
            proto = min(self.stalled, key=lambda p: self.stalled[p][1])
            self._drop(proto, f"responses waiting for slow readers passed {self.limits.max_unsent_bytes >> 20} MB "
                              "together (this one made the least progress)")

    def _drop(self, proto, why: str) -> None:
        self.stalled.pop(proto, None)
        STATS["slow_readers_dropped"] += 1
        log.warning("dropping the connection from %s: %s", _peer(proto), why)
        proto.abort_now()
        if self._trim is None:  # once the answers it held are freed, hand the pages back (debounced)
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._release_memory)

    def _release_memory(self) -> None:
        """glibc keeps freed heap pages for reuse, so the answers of dropped readers stayed resident after their
        sockets closed. ``malloc_trim`` returns them (a no-op where the C library has no such call)."""
        self._trim = None
        STATS["memory_trims"] += 1
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _peer(proto) -> str:
    c = getattr(proto, "client", None)
    return f"{c[0]}:{c[1]}" if c else "unknown client"


class _ActiveConnections:
    """uvicorn's connection set as its concurrency limit should see it: only connections with a request under way
    (not those still sending headers, idle keep-alive ones, or answered ones draining before their close)."""

    def __init__(self, real: set, book: ConnectionBook):
        self.real, self.book = real, book

    def add(self, proto) -> None:
        self.real.add(proto)

    def discard(self, proto) -> None:
        self.real.discard(proto)

    def __len__(self) -> int:
        return max(0, len(self.real) - len(self.book.pending) - len(self.book.idle) - len(self.book.lingering))

    def __iter__(self):
        return iter(self.real)

    def __contains__(self, proto) -> bool:
        return proto in self.real


class _LingeringTransport:
    """The transport as uvicorn sees it: ``close()`` with a request body still unread becomes a lingering close."""

    __slots__ = ("_t", "_p")

    def __init__(self, transport, proto):
        self._t, self._p = transport, proto

    def __getattr__(self, name):
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self._t.is_closing() or self._p._lingering

    def close(self) -> None:
        if self._p._lingering:
            return  # the linger timers close it
        if not self._t.is_closing() and self._p._body_unread():
            self._p._linger()
        else:
            self._t.close()


def _header_refusal(event, limits: TransportLimits) -> tuple[int, str] | None:
    if len(event.target) > limits.max_target_bytes:
        return 414, f"request target over {limits.max_target_bytes} bytes"
    if len(event.headers) > limits.max_header_count:
        return 431, f"more than {limits.max_header_count} request header fields"
    size = sum(len(k) + len(v) + 4 for k, v in event.headers)
    if size > limits.max_header_bytes:
        return 431, f"request headers over {limits.max_header_bytes} bytes"
    return None


def guarded_protocol(limits: TransportLimits = TransportLimits()):
    """uvicorn's h11 protocol with the transport guards of the module docstring; one book per server."""
    import h11
    from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

    book = ConnectionBook(limits)

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # a duck-typed view of uvicorn's connection set (add, discard, len, iter and `in` are all uvicorn uses)
            self.connections = _ActiveConnections(self.connections, book)  # type: ignore[assignment]
            self._header_deadline = self._linger_idle = self._linger_end = None
            self._lingering, self._refusal = False, None
            self._raw: asyncio.Transport | None = None  # the real transport, set by connection_made

        # ---- asyncio protocol interface
        def connection_made(self, transport):
            self._raw = transport
            # the proxy forwards every other attribute to the real transport (__getattr__), which mypy cannot see
            super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
            book.wait_headers(self)
            self._arm()
            self._count_chunks()

        def data_received(self, data):
            if self._lingering:  # the answer is sent: what the client still sends is dropped unread
                self._linger_quiet()
                return
            if self._waiting_for_headers():
                self._arm()  # a new request starts: its headers get their own deadline
                if self not in book.pending:
                    book.busy(self)
                    book.wait_headers(self)  # a keep-alive connection starts its next request
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            for h in (self._linger_idle, self._linger_end):
                if h is not None:
                    h.cancel()
            book.forget(self)
            super().connection_lost(exc)

        def on_response_complete(self):
            if not self.transport.is_closing():
                book.go_idle(self)
            super().on_response_complete()

        def pause_writing(self):
            super().pause_writing()
            book.stall(self)

        def resume_writing(self):
            super().resume_writing()
            book.unstall(self)


        # ---- used by the book
        @property
        def _sock(self) -> asyncio.Transport:
            """The real transport: asyncio calls connection_made before anything else reaches the protocol."""
            assert self._raw is not None, "connection_made sets the transport first"
            return self._raw

        def write_buffer_size(self) -> int:
            return self._raw.get_write_buffer_size() if self._raw is not None else 0

        def close_now(self):
            self._sock.close()

        def abort_now(self):
            self._sock.abort()

        # ---- request line and header limits, tiny-chunk floods
        def _count_chunks(self):
            """Wrap h11's event source: header limits per request; too many small body chunks end it with 400."""
            next_event = self.conn.next_event
            counts = {"chunks": 0, "bytes": 0}

            def counted():
                event = next_event()
                if isinstance(event, h11.Request):
                    counts.update(chunks=0, bytes=0)
                    book.headers_done(self)
                    book.busy(self)  # a pipelined request arrives without data_received
                    self._refusal = _header_refusal(event, limits)
                    if self._refusal:
                        STATS[f"refused_{self._refusal[0]}"] += 1
                        log.warning("refusing a request from %s: %s", _peer(self), self._refusal[1])
                        raise h11.RemoteProtocolError(self._refusal[1])
                elif isinstance(event, h11.Data):
                    counts["chunks"] += 1
                    counts["bytes"] += len(event.data)
                    if counts["chunks"] > SMALL_CHUNK_ALLOWANCE and counts["bytes"] < MIN_AVERAGE_CHUNK * counts["chunks"]:
                        log.warning("cutting off %s: request body in %d chunks of %.0f bytes on average",
                                    _peer(self), counts["chunks"], counts["bytes"] / counts["chunks"])
                        raise h11.RemoteProtocolError("request body sent in too many tiny chunks")
                return event

            # wraps h11's bound method on this one connection object only
            self.conn.next_event = counted  # type: ignore[method-assign]

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a protocol error, with our status (414/431) where one of our limits refused."""
            status, text = self._refusal or (400, msg)
            self._refusal = None
            if status == 400 and self._waiting_for_headers() and \
                    len(self.conn.trailing_data[0]) > limits.max_header_bytes:  # h11's incomplete-event bound
                status, text = 431, f"request headers over {limits.max_header_bytes} bytes"
                STATS["refused_431"] += 1
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True  # the app stops waiting for a body that will not come
                self.cycle.message_event.set()
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
            try:
                out = self.conn.send(h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]))
                out += self.conn.send(h11.Data(data=text.encode("ascii", "replace")))
                out += self.conn.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:  # an answer was already sent: nothing for the client to read, close now
                self._sock.close()
                return
            if self._lingering or self._sock.is_closing():
                return
            self._linger()  # the client may still be sending: it reads this answer instead of a reset

        def shutdown(self) -> None:
            """uvicorn's graceful shutdown, skipping connections already closing: sending h11's close event on a
            connection in ERROR state raised out of uvicorn's shutdown loop and cut the drain short."""
            if self._lingering or self._sock.is_closing() or self.conn.our_state is h11.ERROR:
                self._sock.close()
                return
            super().shutdown()

        def handle_websocket_upgrade(self, event) -> None:
            self._disarm()  # the upgraded socket is no longer an HTTP connection waiting for headers
            book.forget(self)
            super().handle_websocket_upgrade(event)

        # ---- header deadline
        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self):
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(limits.header_timeout_s, self._expire)

        def _disarm(self):
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expire(self):
            self._header_deadline = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                STATS["header_timeouts"] += 1
                log.warning("closing connection from %s: request headers incomplete after %.0f s",
                            _peer(self), limits.header_timeout_s)
                self._sock.close()

        # ---- lingering close
        def _body_unread(self) -> bool:
            return self.cycle is not None and self.conn.their_state is h11.SEND_BODY

        def _linger(self):
            """Answer flushed, write side shut; the unread body is drained for a moment, then the socket closed.
            Beyond ``max_pending_headers`` lingering connections the socket is closed at once instead."""
            if len(book.lingering) >= limits.max_pending_headers:
                self._sock.close()
                return
            try:
                self._sock.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                self._sock.close()
                return
            self._lingering = True
            book.headers_done(self)  # draining, not waiting for headers: counted once, as lingering
            book.busy(self)
            book.lingering.add(self)
            STATS["lingering_closes"] += 1
            self._sock.resume_reading()
            self._linger_end = self.loop.call_later(limits.max_linger_s, self._sock.close)
            self._linger_quiet()

        def _linger_quiet(self):
            if self._linger_idle is not None:
                self._linger_idle.cancel()
            self._linger_idle = self.loop.call_later(limits.linger_s, self._sock.close)

    return GuardedH11Protocol


def run_server(app, host: str, port: int, *, limits: TransportLimits = TransportLimits(),
               graceful_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn with the guards above (h11 parser, transport limits, graceful drain)."""
    from ..extras import require

    uvicorn = require("uvicorn")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(limits),
                            timeout_graceful_shutdown=int(graceful_timeout_s), limit_concurrency=limits.max_connections,
                            h11_max_incomplete_event_size=limits.max_header_bytes + limits.max_target_bytes)
    uvicorn.Server(config).run()
