"""A fault-injecting HTTP/1.1 proxy between an S3 client and a real S3 server, for tests.

    with FaultProxy("127.0.0.1", urlsplit(s3.endpoint).port) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint_url, ...)
        proxy.add(Fault("stall_body", method="GET", ranged=True, count=1))
        proxy.add(Fault("status", status=503, match="list-type=2"))
        ...
        proxy.clear()
        assert proxy.stats.faults["stall_body"] == 1

Each client connection gets its own upstream connection, and requests on it are
served one at a time, so a fault picked for a request hits that request's
response and no other. Rules are checked in the order they were added; the
first that matches (and wins its probability roll) applies. A rule with a count
applies to that many requests, then is skipped; without one it applies until
removed. One rule per request: a delay rule and a fault rule do not combine.
`where` sees a Request (method, target, headers, conn, seq) for anything the
other matchers cannot say, such as "the third request on a connection".

Modes (`Fault.mode`):

  delay          sleep `seconds` before forwarding the request head and/or every
                 response head (`side`); seconds = RTT/2 on both sides emulates a
                 store that far away (one RTT per request, 1.5 for a PUT with
                 Expect: 100-continue).
  stall          read the request, never forward it, never answer.
  stall_body     forward the response head and the body up to `offset`, then hold.
  trickle        forward the response body at `rate` bytes per second.
  reset          forward the body up to `offset`, then reset the connection (RST).
  truncate       forward the body up to `offset`, then close cleanly (FIN).
  flip           flip `bits` consecutive bits of the response body at `offset`.
  status         answer with an S3 error (`status`, `code`) without asking the server.
  flip_request   flip `bits` bits of the request body at `offset` on its way up.
  reset_request  forward the request body up to `offset`, then reset both sides.
  refuse         close the listening socket until the rule is removed, so new
                 connections are refused; `drop` also aborts the open ones.

`offset` defaults to the middle of the body (0 for stall_body, or when the
length is unknown) and never reaches the body's last byte, so the client never has the whole body.
When the response has no body (HEAD, 204, 304, Content-Length: 0), stall_body,
reset and truncate strike before the response head instead: the server has
acted, the client never hears of it (the lost-acknowledgement case).
Held connections (stall, stall_body) end when their rule is removed, when the
client closes them, or when the proxy closes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = frozenset({"delay", "stall", "stall_body", "trickle", "reset", "truncate", "flip",
                   "status", "flip_request", "reset_request", "refuse"})
_CUTS = frozenset({"stall_body", "reset", "truncate"})  # response faults that end the body early
_BODY_CUTS = _CUTS | {"reset_request"}
_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("SlowDown", "Please reduce your request rate.")}
_CHUNK = 1 << 20  # read size for bodies: ~800 MiB/s on loopback, 256 KiB gives ~650
_LIMIT = 1 << 20  # stream buffer; also the longest head or chunk-size line accepted
_CHUNKED = -1  # framing: Transfer-Encoding: chunked
_UNTIL_EOF = -2  # framing: a response body that ends when the server closes
_SEAWEED_PORTS = range(10000, 32768)  # tests/seaweedfs.py picks ports (and port + 10000) here
_HISTORY = 10000  # requests remembered in Stats.history


@dataclass(frozen=True)
class Request:
    """What a rule can match on: one request as the proxy read it."""

    method: str
    target: str  # path and query, as sent: "/bucket/key?partNumber=2&uploadId=..."
    headers: dict[str, str]  # lower-case names
    conn: int  # 1 for the proxy's first client connection, then 2, ...
    seq: int  # 0 for the connection's first request, then 1, ...

    @property
    def ranged(self) -> bool:
        return "range" in self.headers


@dataclass(eq=False)
class Fault:
    """A rule: which requests (method, ranged, match, where), how often, and what to do."""

    mode: str
    method: str | None = None
    ranged: bool | None = None
    match: str | None = None  # a substring of Request.target
    where: Callable[[Request], bool] | None = None  # anything else, e.g. a connection
    count: int | None = None  # None: every matching request until removed
    probability: float = 1.0  # rolled on the proxy's seeded RNG
    seconds: float = 0.0  # delay
    side: str = "both"  # delay: "request", "response" or "both"
    rate: float = 2.0  # trickle: bytes per second
    offset: int | None = None  # stall_body, reset, truncate, flip, *_request: body byte
    bits: int = 1  # flip, flip_request
    status: int = 503  # status
    code: str | None = None  # status; default from `status`: SlowDown, InternalError
    drop: bool = False  # refuse: also abort open connections
    applied: int = field(default=0, init=False)  # requests it struck so far

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {sorted(MODES)}")
        if self.side not in ("request", "response", "both"):
            raise ValueError(f"side must be request, response or both, not {self.side!r}")
        if self.mode == "status" and self.code is None and self.status not in _ERRORS:
            raise ValueError(f"give an S3 error code for status {self.status}")
        if self.mode == "trickle" and self.rate <= 0:
            raise ValueError("trickle needs a rate above 0 bytes per second")
        per_request = (self.method, self.ranged, self.match, self.where, self.count)
        if self.mode == "refuse" and (any(v is not None for v in per_request)
                                      or self.probability != 1.0):
            raise ValueError("refuse is not per request: no matchers, count or probability")

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.applied >= self.count

    def matches(self, request: Request) -> bool:
        return ((self.method is None or request.method == self.method.upper())
                and (self.ranged is None or request.ranged == self.ranged)
                and (self.match is None or self.match in request.target)
                and (self.where is None or self.where(request)))


class Seen(NamedTuple):
    conn: int
    method: str
    target: str
    fault: str | None  # the mode applied, if any


@dataclass
class Stats:
    """Counters since the proxy started (or reset_stats); a snapshot, safe to keep."""

    connections: int = 0
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)  # mode -> requests it hit
    bytes_to_server: int = 0  # everything written upstream: heads and bodies
    bytes_to_client: int = 0
    history: list[Seen] = field(default_factory=list)  # the last 10,000 requests


class _Cut(Exception):
    """A body fault ended the stream; the connection must end the way its mode says."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.mode)
        self.fault = fault
        self.mode = fault.mode


class _Head(NamedTuple):
    raw: bytes
    start: list[str]  # request: method, target, version; response: version, status, reason
    headers: dict[str, str]


async def _read_head(reader: asyncio.StreamReader) -> _Head | None:
    """The next head on the stream, or None at a clean end of stream before one."""
    raw = b""
    while not raw.strip():  # RFC 9112 2.2: ignore empty lines before a request line
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None
            raise
    lines = raw.decode("latin-1").strip("\r\n").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return _Head(raw, lines[0].split(" ", 2), headers)


def _tokens(headers: dict[str, str], name: str) -> list[str]:
    return [t.strip().lower() for t in headers.get(name, "").split(",") if t.strip()]


def _request_framing(headers: dict[str, str]) -> int:
    if _tokens(headers, "transfer-encoding")[-1:] == ["chunked"]:
        return _CHUNKED
    return int(headers.get("content-length", "0"))


def _response_framing(method: str, status: int, headers: dict[str, str]) -> int:
    if method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    if _tokens(headers, "transfer-encoding")[-1:] == ["chunked"]:
        return _CHUNKED
    if "content-length" in headers:
        return int(headers["content-length"])
    return _UNTIL_EOF


def _keeps_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = _tokens(headers, "connection")
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def _error_response(fault: Fault, request: Request, close: bool) -> bytes:
    """An S3 error as AWS sends it, so botocore raises ClientError with its code."""
    code, message = _ERRORS.get(fault.status, (fault.code, "Injected by faultproxy."))
    code = fault.code or code
    request_id = secrets.token_hex(8).upper()
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{request.target.split('?')[0]}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>").encode()
    if request.method == "HEAD":
        body = b""
    head = (f"HTTP/1.1 {fault.status} {HTTPStatus(fault.status).phrase}\r\n"
            f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: {request_id}\r\nx-amz-id-2: {secrets.token_hex(16)}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\nServer: faultproxy\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


class _Shaper:
    """Carries one body to `writer` (None: drop it), applying the fault meant for it."""

    def __init__(self, writer: asyncio.StreamWriter | None, tally: Callable[[int], None],
                 fault: Fault | None = None, length: int = _UNTIL_EOF,
                 modes: frozenset[str] = frozenset()) -> None:
        self.writer = writer
        self.tally = tally
        self.pos = 0
        self.fault = fault if fault is not None and fault.mode in modes else None
        mode = self.mode = self.fault.mode if self.fault is not None else None
        middle = length // 2 if length > 0 and mode != "stall_body" else 0
        at = middle if fault is None or fault.offset is None else fault.offset
        self.cut_at = min(at, max(length - 1, 0)) if length >= 0 else at
        self.rate = fault.rate if mode == "trickle" and fault is not None else 0.0
        self.flips = range(0)
        if mode in ("flip", "flip_request") and fault is not None:
            start = min(at, max(length - (fault.bits + 7) // 8, 0)) if length >= 0 else at
            self.flips = range(start * 8, start * 8 + fault.bits)

    async def data(self, piece: bytes) -> None:
        if self.mode in _BODY_CUTS and self.pos + len(piece) > self.cut_at:
            await self._write(piece[:self.cut_at - self.pos])
            await self._flush()
            raise _Cut(self.fault)  # type: ignore[arg-type]
        if self.flips:
            piece = self._flip(piece)
        self.pos += len(piece)
        if self.rate:
            await self._trickle(piece)
        else:
            await self._write(piece)

    async def frame(self, raw: bytes) -> None:
        """Chunked framing: passed on as it came, not counted as body."""
        await self._write(raw)

    async def end(self) -> None:
        """The body is complete; a cut that has not struck yet strikes now."""
        if self.mode in _BODY_CUTS:
            await self._flush()
            raise _Cut(self.fault)  # type: ignore[arg-type]

    def _flip(self, piece: bytes) -> bytes:
        first, last = self.pos * 8, (self.pos + len(piece)) * 8
        hits = range(max(first, self.flips.start), min(last, self.flips.stop))
        if not hits:
            return piece
        flipped = bytearray(piece)
        for bit in hits:
            flipped[bit // 8 - self.pos] ^= 0x80 >> (bit % 8)
        return bytes(flipped)

    async def _trickle(self, piece: bytes) -> None:
        step = max(1, int(self.rate / 10))
        for i in range(0, len(piece), step):
            await self._write(piece[i:i + step])
            await asyncio.sleep(step / self.rate)

    async def _write(self, data: bytes) -> None:
        if self.writer is None or not data:
            return
        self.writer.write(data)
        self.tally(len(data))
        await self.writer.drain()

    async def _flush(self) -> None:
        """Everything written so far reaches the kernel, so a reset does not eat it."""
        if self.writer is not None:
            self.writer.transport.set_write_buffer_limits(high=0)
            await self.writer.drain()


async def _copy_body(reader: asyncio.StreamReader, framing: int, shaper: _Shaper) -> None:
    """One body, framed by Content-Length, chunked encoding or the end of the stream."""
    if framing >= 0:
        await _copy_exact(reader, framing, shaper)
    elif framing == _UNTIL_EOF:
        while data := await reader.read(_CHUNK):
            await shaper.data(data)
    else:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            await shaper.frame(line)
            await _copy_exact(reader, size, shaper)
            await shaper.frame(await reader.readexactly(2))
        await shaper.end()
        await shaper.frame(line)
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
            await shaper.frame(line)
        await shaper.frame(line)
        return
    await shaper.end()


async def _copy_exact(reader: asyncio.StreamReader, size: int, shaper: _Shaper) -> None:
    while size:
        data = await reader.read(min(_CHUNK, size))
        if not data:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(data)
        await shaper.data(data)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST instead of FIN: SO_LINGER on, timeout zero."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection and its upstream connection, serving requests in turn."""

    def __init__(self, proxy: FaultProxy, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, number: int) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.number = number
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None

    async def serve(self) -> None:
        graceful = True
        try:
            seq = 0
            while (head := await _read_head(self.reader)) is not None:
                method, target, version = (head.start + ["", "", ""])[:3]
                request = Request(method.upper(), target, head.headers, self.number, seq)
                seq += 1
                fault = self.proxy._pick(request)
                if not await self._handle(request, head, fault) \
                        or not _keeps_alive(version, head.headers):
                    break
        except _Cut as cut:
            graceful = cut.mode == "truncate"
            if cut.mode == "stall_body":
                await self.proxy._hold(cut.fault, self.reader)
            if cut.mode == "reset_request":
                _reset(self.up_writer)
            if cut.mode in ("reset", "reset_request"):
                _reset(self.writer)
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
            graceful = False  # the peer went away or sent something that is not HTTP
            log.debug("faultproxy: connection %d ended: %r", self.number, e)
        except Exception:
            graceful = False
            log.exception("faultproxy: connection %d failed", self.number)
        finally:
            await self._close(graceful)

    async def _handle(self, request: Request, head: _Head, fault: Fault | None) -> bool:
        """Serve one request; False when the connection must end after it."""
        framing = _request_framing(request.headers)
        mode = fault.mode if fault is not None else None
        if fault is not None and mode == "stall":
            await self.proxy._hold(fault, self.reader)
            return False
        if fault is not None and mode == "status":
            # A client waiting for 100 Continue will not send the body: end the connection.
            close = framing != 0 and "100-continue" in _tokens(request.headers, "expect")
            if not close:
                await _copy_body(self.reader, framing, _Shaper(None, self.proxy._tally_up))
            self.writer.write(answer := _error_response(fault, request, close))
            self.proxy._tally_down(len(answer))
            await self.writer.drain()
            return not close
        if fault is not None and mode == "delay" and fault.side != "response":
            await asyncio.sleep(fault.seconds)
        up_reader, up_writer = await self._upstream()
        up_writer.write(head.raw)
        self.proxy._tally_up(len(head.raw))
        if framing == 0 and mode != "reset_request":  # most requests: no body to send
            return await self._relay_response(request, fault, up_reader)
        sending = asyncio.ensure_future(_copy_body(
            self.reader, framing,
            _Shaper(up_writer, self.proxy._tally_up, fault, framing,
                    frozenset({"flip_request", "reset_request"}))))
        relaying = asyncio.ensure_future(self._relay_response(request, fault, up_reader))
        try:
            done, _ = await asyncio.wait({sending, relaying},
                                         return_when=asyncio.FIRST_COMPLETED)
            if sending in done:
                sending.result()  # raises if the body broke off or was cut
                return await relaying
            keep = relaying.result()
            # Answered before the whole body came (an early error, or a client that got no
            # 100 Continue): unless the rest is just arriving, the two sides are out of step.
            await asyncio.wait({sending}, timeout=0.2)
            return keep and sending.done() and sending.exception() is None
        finally:
            sending.cancel()
            relaying.cancel()

    async def _relay_response(self, request: Request, fault: Fault | None,
                              up_reader: asyncio.StreamReader) -> bool:
        """Forward 1xx heads and the final response; False when the connection must end."""
        delay = fault.seconds if fault is not None and fault.mode == "delay" \
            and fault.side != "request" else 0.0
        while True:
            head = await _read_head(up_reader)
            if head is None:
                raise EOFError("the server closed the connection before answering")
            version, status = head.start[0], int(head.start[1])
            framing = _response_framing(request.method, status, head.headers)
            if delay:
                await asyncio.sleep(delay)
            if fault is not None and fault.mode in _CUTS and framing == 0 and status >= 200:
                raise _Cut(fault)  # no body to cut: the answer is lost instead
            self.writer.write(head.raw)
            self.proxy._tally_down(len(head.raw))
            await self.writer.drain()
            if status >= 200:
                break
        await _copy_body(up_reader, framing, _Shaper(self.writer, self.proxy._tally_down, fault,
                                                     framing, _CUTS | {"flip", "trickle"}))
        return framing != _UNTIL_EOF and _keeps_alive(version, head.headers)

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The upstream connection, reopened if the server closed it while idle."""
        if self.up_reader is None or self.up_writer is None or self.up_reader.at_eof():
            if self.up_writer is not None:
                self.up_writer.transport.abort()
            self.up_reader, self.up_writer = await asyncio.open_connection(
                self.proxy.upstream_host, self.proxy.upstream_port, limit=_LIMIT)
        return self.up_reader, self.up_writer

    def abort(self) -> None:
        for writer in (self.writer, self.up_writer):
            if writer is not None:
                writer.transport.abort()

    async def _close(self, graceful: bool) -> None:
        if self.up_writer is not None:
            self.up_writer.transport.abort()
        if not graceful:
            self.writer.transport.abort()
            return
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.writer.transport.abort()  # a no-op once closed


class FaultProxy:
    """A proxy on 127.0.0.1:<free port> that runs an asyncio loop in its own thread.

    The test thread adds and removes rules and reads `stats`; everything else
    happens on the loop. close() (or leaving the with block) takes well under
    2 s, stalled connections included, and leaves no thread behind.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 seed: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # rules, stats
        self._rules: list[Fault] = []
        self._released: dict[Fault, asyncio.Event] = {}
        self._stats = Stats()
        self._history: collections.deque[Seen] = collections.deque(maxlen=_HISTORY)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, asyncio.Task[None]] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("FaultProxy already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen_first())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abort every connection, stop the loop and join its thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                self._call(self._shutdown(), timeout=1.5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(2)
            self._loop = self._thread = None

    def add(self, fault: Fault) -> Fault:
        """Start applying `fault`, after the rules already there; returns it."""
        with self._lock:
            self._rules.append(fault)
            self._released[fault] = asyncio.Event()
            if fault.mode == "refuse":
                self._stats.faults["refuse"] += 1
                fault.applied += 1
        if fault.mode == "refuse":
            self._call(self._refuse(fault.drop))
        return fault

    def remove(self, fault: Fault) -> None:
        """Stop applying `fault` and let go of the connections it holds."""
        self._drop_rules([fault])

    def clear(self) -> None:
        """Remove every rule: traffic passes untouched again, held connections end."""
        with self._lock:
            rules = list(self._rules)
        self._drop_rules(rules)

    def drop_connections(self) -> None:
        """Abort every open connection (both sides), as a server restart would."""
        self._call(self._abort_all())

    @property
    def stats(self) -> Stats:
        with self._lock:
            return Stats(self._stats.connections, self._stats.requests,
                         Counter(self._stats.faults), self._stats.bytes_to_server,
                         self._stats.bytes_to_client, list(self._history))

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = Stats()
            self._history.clear()

    # The rest runs on the loop, apart from _drop_rules and _call.

    def _drop_rules(self, rules: list[Fault]) -> None:
        with self._lock:
            events = [self._released.pop(rule) for rule in rules if rule in self._released]
            self._rules = [rule for rule in self._rules if rule not in rules]
            refusing = any(rule.mode == "refuse" for rule in self._rules)
        loop = self._loop
        if loop is not None:
            for event in events:
                loop.call_soon_threadsafe(event.set)
            if not refusing:
                self._call(self._listen())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        assert self._loop is not None, "FaultProxy not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), 0.5))
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            log.exception("faultproxy: the event loop ended badly")
        finally:
            loop.close()

    def _pick(self, request: Request) -> Fault | None:
        with self._lock:
            self._stats.requests += 1
            chosen = None
            for rule in self._rules:
                if rule.mode == "refuse" or rule.exhausted or not rule.matches(request):
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.applied += 1
                self._stats.faults[rule.mode] += 1
                chosen = rule
                break
            self._history.append(Seen(request.conn, request.method, request.target,
                                      chosen.mode if chosen else None))
        return chosen

    def _tally_up(self, n: int) -> None:
        self._stats.bytes_to_server += n

    def _tally_down(self, n: int) -> None:
        self._stats.bytes_to_client += n

    async def _hold(self, fault: Fault, reader: asyncio.StreamReader) -> None:
        """Hold a connection open, dropping what the client sends, until it is let go."""
        with self._lock:
            event = self._released.get(fault)
        if event is None:  # removed meanwhile
            return
        released = asyncio.ensure_future(event.wait())
        drained = asyncio.ensure_future(self._discard(reader))
        try:
            await asyncio.wait({released, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            drained.cancel()

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        while await reader.read(_CHUNK):
            pass

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._stats.connections += 1
            number = self._stats.connections
        connection = _Connection(self, reader, writer, number)
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection] = task
        try:
            await connection.serve()
        except asyncio.CancelledError:
            pass  # closing; asyncio 3.11 would log a cancelled handler as an error
        finally:
            del self._connections[connection]

    async def _listen_first(self) -> None:
        """Bind a free ephemeral port, never one SeaweedFS in these tests could pick."""
        for _ in range(20):
            await self._listen()
            if self.port not in _SEAWEED_PORTS:
                return
            await self._unlisten()
            self.port = 0
        raise RuntimeError("no free port outside SeaweedFS's range 10000-32767")

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      limit=_LIMIT, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket now; connections stay

    async def _refuse(self, drop: bool) -> None:
        await self._unlisten()
        if drop:
            await self._abort_all()

    async def _abort_all(self) -> None:
        for connection in list(self._connections):
            connection.abort()

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._abort_all()
        tasks = list(self._connections.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` (e.g. on proxy.stats) until it holds; False on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
