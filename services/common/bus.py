"""NATS/JetStream for every service: background (re)connection, traced publish with an on-disk
outbox while NATS is away, subscriptions that join the publisher's trace."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import DEFAULT_MAX_PAYLOAD_SIZE, Client
from nats.errors import MaxPayloadError
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from prometheus_client import Counter

from services.common import events, lifecycle, telemetry
from services.common.backoff import Backoff
from services.common.background import Background
from services.common.errors import Unavailable, describe
from services.common.events import EventRefused, EventTooLarge
from services.common.outbox import Outbox

log = logging.getLogger(__name__)
Handler = Callable[[events.Envelope], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
RETRY_S = 1.0  # the first retry of a connect; each next one waits twice as long, up to RETRY_MAX_S
RETRY_MAX_S = 15.0
EVENTS_REFUSED = Counter("cnei_events_refused_total", "Events dropped because NATS would never take them",
                         ["subject", "reason"])  # reason: too_large (over max_payload) | refused (by JetStream)


@dataclass(frozen=True)
class StreamLimits:
    """How the events stream is made when no service has made it yet: copies kept on a NATS
    cluster, and how much it keeps (the oldest events go first)."""

    replicas: int = 1
    max_age_s: float = 7 * 24 * 3600.0
    max_bytes: int = 1 << 30

    def config(self) -> StreamConfig:
        return StreamConfig(name=events.STREAM, subjects=events.STREAM_SUBJECTS, num_replicas=self.replicas,
                            max_age=self.max_age_s, max_bytes=self.max_bytes, discard=DiscardPolicy.OLD)


class EventBus:
    """Events in and out. With an outbox, `publish` fails only for an event NATS would never take
    (EventRefused): what cannot be sent now is kept on disk and flushed in order once NATS answers
    again."""

    def __init__(self, url: str, source: str, outbox: Outbox | Path | str | None = None,
                 timeout: float = 2.0, stream: StreamLimits = StreamLimits()):
        self.stream = stream
        self.url = url
        self.source = source
        self.timeout = timeout
        self.outbox = Outbox(outbox) if isinstance(outbox, (str, Path)) else outbox
        self.nc: Client | None = None
        self.on_connect: list[Hook] = []
        self._handlers: list[tuple[str, Handler]] = []
        self._tasks: list[asyncio.Task] = []
        self._flush_lock = asyncio.Lock()
        self._online = asyncio.Event()
        self._hooks = Background()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def max_payload(self) -> int:
        """The most bytes (headers and data) NATS takes in a message: the server's, or before the
        first connect its default."""
        return self.nc.max_payload if self.nc is not None else DEFAULT_MAX_PAYLOAD_SIZE

    async def connect(self) -> None:
        """Connect once: the client is kept only with the stream ensured and the subscriptions
        made; when NATS or its JetStream (a cluster still electing its leader) does not answer,
        it is closed and this raises."""
        nc = Client()
        try:
            # nats-py retries a failed first connect forever when reconnects are unlimited: bound it.
            await asyncio.wait_for(nc.connect(
                self.url, name=self.source, connect_timeout=self.timeout, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, drain_timeout=2,
                reconnected_cb=self._reconnected, disconnected_cb=self._disconnected,
                error_cb=self._error,
            ), timeout=self.timeout + 1.0)
            await self._ensure_stream(nc)
            for subject, handler in self._handlers:
                await self._subscribe(nc, subject, handler)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self.nc = nc
        await self._came_online()

    async def start(self) -> None:
        """Connect now if NATS answers, else keep trying in the background; never raises."""
        try:
            await self.connect()
        except Exception as exc:  # noqa: BLE001 - offline start is allowed
            log.warning("NATS at %s not ready (%s); retrying in the background", self.url, describe(exc))
            self._tasks.append(asyncio.create_task(self._connect_loop(), name="nats-connect"))
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="outbox-flush"))

    async def _connect_loop(self) -> None:
        """Try again until connected, backing off; a new reason for failing is logged."""
        backoff, last = Backoff(first_s=RETRY_S, max_s=RETRY_MAX_S), ""
        while self.nc is None:
            await asyncio.sleep(backoff.next_wait(time.monotonic()))
            try:
                await self.connect()
            except Exception as exc:  # noqa: BLE001 - keep trying
                if (reason := describe(exc)) != last:
                    log.warning("NATS at %s not ready (%s); still trying", self.url, reason)
                    last = reason
        log.info("connected to NATS at %s", self.url)

    async def _ensure_stream(self, nc: Client) -> None:
        """The events stream as `self.stream` says, unless it is there: then only the subjects it
        lacks are added, and its copies and limits (an operator's, another service's) are kept."""
        js = nc.jetstream(timeout=self.timeout)
        try:
            info = await js.stream_info(events.STREAM)
        except NotFoundError:
            try:
                await js.add_stream(self.stream.config())
                return
            except Exception:  # noqa: BLE001 - made meanwhile by another service (its settings stand)
                info = await js.stream_info(events.STREAM)
        missing = [s for s in events.STREAM_SUBJECTS if s not in (info.config.subjects or [])]
        if missing:
            await js.update_stream(info.config.evolve(subjects=[*(info.config.subjects or []), *missing]))

    async def _ensure_stream_or_log(self) -> None:
        try:
            await self._ensure_stream(self.nc)
        except Exception as exc:  # noqa: BLE001 - tried again at the next failed publish
            log.warning("could not create the %s stream: %s", events.STREAM, exc)

    async def _reconnected(self) -> None:
        log.info("reconnected to NATS")
        self._hooks.spawn(self._back_online())  # not inside nats-py's reconnect

    async def _back_online(self) -> None:
        """NATS may be back without its JetStream state (a fresh store): the stream first, then
        the outbox is flushed and the on-connect hooks run. (A reconnect of a client `connect` is
        still setting up is its own: `connect` runs them once it has kept the client.)"""
        if self.nc is None:
            return
        await self._ensure_stream_or_log()
        await self._came_online()

    async def _disconnected(self) -> None:
        self._online.clear()

    async def _error(self, exc: Exception) -> None:
        log.debug("NATS error: %s", exc)

    async def _came_online(self) -> None:
        self._online.set()
        for hook in self.on_connect:
            self._hooks.spawn(hook())

    # --- publishing ---------------------------------------------------------------------------
    async def publish(self, subject: str, payload: dict) -> events.Envelope:
        """Send an event, or keep it in the outbox; EventTooLarge (before it is kept) or
        EventRefused for one NATS would never take."""
        envelope = events.Envelope(type=subject, source=self.source, payload=payload,
                                   trace=telemetry.inject())
        if self.outbox is not None and (len(self.outbox) or not self.connected):
            self._message(subject, envelope)
            self.outbox.put(subject, envelope)
            return envelope
        try:
            await self._send(subject, envelope)
        except EventRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - kept for later, or reported
            if self.outbox is None:
                raise Unavailable(f"could not publish {subject}: {exc}") from None
            self.outbox.put(subject, envelope)
        return envelope

    def _message(self, subject: str, envelope: events.Envelope) -> tuple[bytes, dict[str, str]]:
        """The event's data and headers; EventTooLarge (logged and counted) when NATS would refuse
        them, or close the connection for headers and data over its limit together."""
        data, headers = events.encode(envelope), {**envelope.trace, "Nats-Msg-Id": envelope.id}
        if (size := _wire_size(data, headers)) > self.max_payload:
            raise _refused(EventTooLarge(subject, envelope.id, size, self.max_payload))
        return data, headers

    async def _send(self, subject: str, envelope: events.Envelope) -> None:
        if not self.connected:
            raise Unavailable(f"NATS at {self.url} is not connected")
        data, headers = self._message(subject, envelope)
        try:
            await self.nc.jetstream(timeout=self.timeout).publish(subject, data, headers=headers)
        except (TimeoutError, NoStreamResponseError):
            # No stream took it (NATS came back without it, or it was deleted): JetStream would
            # never acknowledge this or any retry. Live subscribers may have had this try: theirs
            # drop the retry by its envelope id (RecentIds); JetStream by its Nats-Msg-Id.
            await self._ensure_stream_or_log()
            raise
        except (MaxPayloadError, APIError) as exc:
            if _refused_for_good(exc):
                raise _refused(EventRefused(subject, envelope.id, describe(exc))) from exc
            raise

    async def flush(self) -> int:
        """Send buffered events oldest first, stopping at the first that fails for now; one NATS
        would never take is dropped (logged and counted). Returns how many went."""
        if self.outbox is None:
            return 0
        sent = 0
        async with self._flush_lock:
            while self.connected and (batch := self.outbox.peek(100)):
                done = None
                try:
                    for entry in batch:
                        try:
                            await self._send(entry.subject, entry.envelope)
                            sent += 1
                        except EventRefused:
                            pass  # logged and counted; dropped from the outbox with those sent
                        done = entry.seq
                finally:
                    if done is not None:
                        self.outbox.pop(through=done)
        if sent:
            log.info("flushed %d buffered events", sent)
        return sent

    async def _flush_loop(self) -> None:
        while True:
            await self._online.wait()
            if self.outbox is not None and len(self.outbox):
                try:
                    await self.flush()
                except Exception as exc:  # noqa: BLE001 - retried on the next round
                    log.warning("outbox flush stopped: %s", exc)
            await asyncio.sleep(0.2)

    # --- subscribing --------------------------------------------------------------------------
    async def subscribe(self, subject: str, handler: Handler) -> None:
        """Live (core NATS) subscription; registered now, or when the bus connects. A client that
        is away keeps it and makes it when it is back (nats-py restores the ones it was given)."""
        self._handlers.append((subject, handler))
        if self.nc is not None:
            await self._subscribe(self.nc, subject, handler)

    async def _subscribe(self, nc: Client, subject: str, handler: Handler) -> None:
        seen = events.RecentIds()

        async def on_message(msg) -> None:
            try:
                envelope = events.decode(msg.data)
            except ValueError as exc:
                log.warning("dropping malformed event on %s: %s", msg.subject, exc)
                return
            if not seen.first_time(envelope.id):
                log.debug("dropping event %s on %s: handled before (a retried publish)", envelope.id, msg.subject)
                return
            token = telemetry.attach(telemetry.extract(msg.headers))
            try:
                await handler(envelope)
            except Exception:  # noqa: BLE001 - one bad handler run must not kill the subscription
                log.exception("handler for %s failed", msg.subject)
            finally:
                telemetry.detach(token)

        await nc.subscribe(subject, cb=on_message)

    async def close(self) -> None:
        await lifecycle.cancel_and_wait(*self._tasks)
        if self.nc is None or self.nc.is_closed:
            return
        if not self.nc.is_connected:
            await self.nc.close()
            return
        try:
            await self.flush()
            await self.nc.drain()
        except Exception:  # noqa: BLE001 - closing anyway
            await self.nc.close()


def _wire_size(data: bytes, headers: dict[str, str]) -> int:
    """Bytes of a message as NATS counts them against max_payload: its header block (as nats-py
    writes it: `NATS/1.0`, one `key: value` line each, an empty line) and its data."""
    return len(data) + len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


def _refused_for_good(exc: Exception) -> bool:
    """NATS would refuse the message again: over max_payload, or a JetStream error about the
    message itself (4xx: too large for the stream, say), not a timeout or JetStream away."""
    if isinstance(exc, MaxPayloadError):
        return True
    return isinstance(exc, APIError) and exc.code is not None and 400 <= exc.code < 500 and exc.code not in (408, 429)


def _refused(error: EventRefused) -> EventRefused:
    """`error`, logged and counted."""
    EVENTS_REFUSED.labels(error.subject, error.reason_label).inc()
    log.error("%s", error)
    return error
