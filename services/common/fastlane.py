"""The internal data plane between coordinator and runtimes: ModelInfer over one multiplexed TCP
connection per node, framed and length-prefixed (gRPC costs ~0.7 ms a call in Python here; this
~0.15 ms). External clients keep speaking OIP gRPC; the messages are the same OIP protobufs.

Frame: u32 length of the rest | u64 request id | u8 kind | u16 meta length | meta | payload
kinds: 1 request (meta: JSON trace context and timeout), 2 reply (payload: ModelInferResponse),
3 error (meta: error code name, payload: UTF-8 message), 4 hello (meta: JSON {"headers": {...}},
sent first on a connection by a client that has keys for a server whose `inference` API is
restricted; no reply). A request whose meta is not that (`request_meta`) is answered with an
INVALID_ARGUMENT error; a frame a server has begun to receive must arrive whole within its
`frame_timeout_s`, or the connection is closed. A server that restricts inference answers every request of a connection
without a hello that passes with PERMISSION_DENIED. A runtime serving TLS serves it here too
(same certificate, same client CA): frames then go inside the TLS stream."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import ssl
import struct
from collections.abc import Awaitable, Callable

from services.common import telemetry
from services.common.background import Background
from services.common.errors import CneiError, ErrorCode, InvalidArgument, ResourceExhausted, Unavailable, error_for

log = logging.getLogger(__name__)
HEADER = struct.Struct("<IQBH")
REQUEST, REPLY, ERROR, HELLO = 1, 2, 3, 4
# A frame carries a request as large as a client may send over gRPC (64 MiB), with room beside it
# for the header and meta (trace context, timeout). The front door's fast lane says the same.
MAX_FRAME = 65 * 1024 * 1024
FRAME_TIMEOUT_S = 30.0  # a frame a server has begun to receive must arrive whole within this (idle time is free)


def encode(request_id: int, kind: int, meta: bytes, payload: bytes) -> bytes:
    body = HEADER.size - 4 + len(meta) + len(payload)
    if body > MAX_FRAME:
        raise ResourceExhausted(f"message of {body} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(body, request_id, kind, len(meta)) + meta + payload


async def read_frame(reader: asyncio.StreamReader,
                     complete_within: float | None = None) -> tuple[int, int, bytes, bytes]:
    """(request id, kind, meta, payload); raises IncompleteReadError at end of stream, ValueError
    for bytes that are no frame. With `complete_within`, a frame whose first byte came must
    arrive whole within that many seconds (else TimeoutError); the wait for that first byte has
    no limit (a connection may idle between frames)."""
    if complete_within is None:
        return await _read_frame(reader, b"")
    first = await reader.readexactly(1)
    async with asyncio.timeout(complete_within):
        return await _read_frame(reader, first)


async def _read_frame(reader: asyncio.StreamReader, start: bytes) -> tuple[int, int, bytes, bytes]:
    """The frame whose first bytes, `start`, were read already."""
    head = start + await reader.readexactly(HEADER.size - len(start))
    body, request_id, kind, meta_len = HEADER.unpack(head)
    after_header = body - (HEADER.size - 4)
    if body > MAX_FRAME or after_header < 0 or meta_len > after_header:
        raise ValueError(f"bad frame: length {body}, meta {meta_len}")
    rest = await reader.readexactly(after_header)
    return request_id, kind, rest[:meta_len], rest[meta_len:]


def request_meta(meta: bytes) -> tuple[dict[str, str] | None, float | None]:
    """A request frame's meta -> (the caller's trace context, its timeout in seconds), or
    InvalidArgument saying what is wrong with it (empty meta: neither)."""
    try:
        info = json.loads(meta) if meta else {}
    except ValueError as exc:  # not UTF-8, or not JSON
        raise InvalidArgument(f"fast-lane request meta is not JSON: {exc}") from None
    if not isinstance(info, dict):
        raise InvalidArgument(f"fast-lane request meta must be a JSON object, got {type(info).__name__}")
    trace, timeout = info.get("trace"), info.get("timeout")
    if trace is not None and not (isinstance(trace, dict)
                                  and all(isinstance(v, str) for v in trace.values())):
        raise InvalidArgument("fast-lane request meta: 'trace' must be an object of string headers")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument(f"fast-lane request meta: 'timeout' must be a non-negative number of seconds "
                              f"or null, got {json.dumps(timeout)}")
    return trace, timeout


Handler = Callable[[bytes, float | None], Awaitable[bytes]]
Refuse = Callable[[dict[str, str]], str]  # a connection's hello headers -> why it is refused ('' if not)


class FastServer:
    """Serves framed requests with `handler(payload, timeout_s) -> reply payload`, concurrently."""

    def __init__(self, handler: Handler, refuse: Refuse | None = None, ssl_context: ssl.SSLContext | None = None,
                 frame_timeout_s: float = FRAME_TIMEOUT_S):
        """`refuse`: judges each connection's hello (None: every connection is served);
        `ssl_context`: serve TLS (services.common.tls.server_ssl_context), else plaintext;
        `frame_timeout_s`: a frame begun must arrive whole within it, or its connection is closed
        (a peer that sends part of a frame and holds the socket holds nothing for long)."""
        self.handler = handler
        self.refuse = refuse
        self.ssl_context = ssl_context
        self.frame_timeout_s = frame_timeout_s
        self.server: asyncio.base_events.Server | None = None
        self._tasks = Background()
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}  # each open connection's reader
        self.closing = False  # stopping: requests that come are refused UNAVAILABLE

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._connection, host, port, ssl=self.ssl_context,
                                                 ssl_handshake_timeout=5.0 if self.ssl_context else None)
        return self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = self.refuse({}) if self.refuse else ""  # until a hello says otherwise
        me = asyncio.current_task()
        self._connections[me] = writer
        try:
            while True:
                request_id, kind, meta, payload = await read_frame(reader, self.frame_timeout_s)
                if kind == HELLO:
                    hello = json.loads(meta or b"{}")
                    headers = hello.get("headers") or {} if isinstance(hello, dict) else None
                    if not isinstance(headers, dict):
                        raise ValueError("hello is not an object with a headers object")
                    if self.refuse is not None:
                        refused = self.refuse({str(k).lower(): str(v) for k, v in headers.items()})
                    continue
                if kind != REQUEST:
                    raise ValueError(f"unexpected frame kind {kind}")
                if refused or self.closing:  # a stopping server's callers retry elsewhere
                    code = ErrorCode.PERMISSION_DENIED if refused else ErrorCode.UNAVAILABLE
                    writer.write(encode(request_id, ERROR, code.value.encode(),
                                        (refused or "server is shutting down").encode()))
                    await writer.drain()  # a client that sends without reading is not buffered for
                    continue
                self._tasks.spawn(self._serve(writer, request_id, meta, payload))
        except TimeoutError:
            log.warning("closing fast-lane connection: a frame did not arrive whole within %.1fs",
                        self.frame_timeout_s)
        except (asyncio.IncompleteReadError, OSError):  # ConnectionError, ssl.SSLError
            pass
        except ValueError as exc:
            log.warning("closing fast-lane connection: %s", exc)
        finally:
            self._connections.pop(me, None)
            writer.close()

    async def _serve(self, writer, request_id: int, meta: bytes, payload: bytes) -> None:
        token = None
        try:
            trace, timeout = request_meta(meta)
            token = telemetry.attach(telemetry.caller_context(trace))
            reply = encode(request_id, REPLY, b"", await self.handler(payload, timeout))
        except CneiError as exc:
            reply = encode(request_id, ERROR, exc.code.value.encode(), exc.message.encode())
        except Exception as exc:  # noqa: BLE001 - reported to the caller as INTERNAL
            log.exception("fast-lane request failed")
            reply = encode(request_id, ERROR, b"INTERNAL", f"internal error: {exc}".encode())
        finally:
            if token is not None:
                telemetry.detach(token)
        if not writer.is_closing():
            writer.write(reply)
            with contextlib.suppress(ConnectionError):  # the caller hung up: nobody to answer
                await writer.drain()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, answer the requests in hand (within `grace`), then close every open
        connection and let its reader end (left to the loop's end, each would be cancelled,
        and asyncio logs a cancelled connection as an error). Requests that come meanwhile on
        open connections are refused UNAVAILABLE."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        if self._tasks.tasks:
            await asyncio.wait(self._tasks.tasks, timeout=grace)
        for writer in list(self._connections.values()):
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)


class FastClient:
    """One multiplexed connection to a node, opened on first use and after a failure."""

    def __init__(self, address: str, connect_timeout: float = 1.0, headers: list[tuple[str, str]] | tuple = (),
                 ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None, server_name: str = ""):
        """`headers`: the keys of a node whose inference API is restricted (sent in a hello);
        `ssl_context`: TLS to a node serving it (services.common.tls.ClientTls), else plaintext;
        a callable is asked for the context at each connection (renewed certificates);
        `server_name`: the name its certificate must hold ("": the host dialled)."""
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.server_name = server_name or self.host.strip("[]")
        self._hello = encode(0, HELLO, json.dumps({"headers": dict(headers)}).encode(), b"") if headers else b""
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader_task: asyncio.Task | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                # a TLS handshake gets a budget of its own, as the connect (the front door's too)
                context = self.ssl_context() if callable(self.ssl_context) else self.ssl_context
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    self.host, self.port, ssl=context,
                    server_hostname=self.server_name if self.ssl_context else None),
                    self.connect_timeout * (2 if self.ssl_context else 1))
            except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError too: an OSError
                raise Unavailable(f"fast lane {self.host}:{self.port} unreachable: {exc}") from None
            if self._hello:
                writer.write(self._hello)
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        error: CneiError = Unavailable(f"fast lane {self.host}:{self.port} closed the connection")
        try:
            while True:
                request_id, kind, meta, payload = await read_frame(reader)
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if kind == REPLY:
                    future.set_result(payload)
                else:
                    code = ErrorCode.__members__.get(meta.decode(), ErrorCode.INTERNAL)
                    future.set_exception(error_for(code, payload.decode("utf-8", "replace")))
        except (asyncio.IncompleteReadError, OSError, ValueError) as exc:  # OSError: ssl.SSLError too
            error = Unavailable(f"fast lane {self.host}:{self.port} connection lost: {exc or 'closed'}")
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    async def call(self, payload: bytes, timeout: float) -> bytes:
        """Send one request payload, wait for its reply payload (CneiError on failure)."""
        writer = await self._connect()
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[request_id] = future
        meta = json.dumps({"trace": telemetry.inject(), "timeout": timeout}).encode()
        frame = encode(request_id, REQUEST, meta, payload)
        timer = loop.call_later(timeout, self._expire, future, timeout)  # cheaper than wait_for
        try:
            try:
                writer.write(frame)
                await writer.drain()
            except (ConnectionError, OSError, RuntimeError) as exc:
                # the node hung up while the request was going; uvloop says so of a transport it
                # closed before is_closing() turned true with RuntimeError ("the handler is closed")
                if isinstance(exc, RuntimeError):
                    writer.close()
                    if self._writer is writer:
                        self._writer = None
                raise Unavailable(f"fast lane {self.host}:{self.port} connection lost: {exc}") from None
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # the reader may have failed it meanwhile: nobody waits for it now

    def _expire(self, future: asyncio.Future, timeout: float) -> None:
        if not future.done():
            future.set_exception(error_for(ErrorCode.DEADLINE_EXCEEDED,
                                           f"no reply from {self.host}:{self.port} within {timeout:.3f}s"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
