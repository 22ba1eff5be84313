"""NATS/JetStream connection shared by services: traced publish, durable stream set-up."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js.api import StreamConfig

from services.common import events, telemetry

log = logging.getLogger(__name__)
Handler = Callable[[events.Envelope], Awaitable[None]]


class EventBus:
    """Publishes envelopes to JetStream with W3C trace headers; subscribes with trace extraction."""

    def __init__(self, url: str, source: str):
        self.url = url
        self.source = source
        self.nc: Client | None = None
        self._subs = []

    async def connect(self, timeout: float = 5.0) -> None:
        self.nc = await nats.connect(
            self.url, name=self.source, connect_timeout=timeout,
            max_reconnect_attempts=-1, reconnect_time_wait=0.5, drain_timeout=2,
        )
        js = self.nc.jetstream(timeout=timeout)
        config = StreamConfig(name=events.STREAM, subjects=events.STREAM_SUBJECTS)
        try:
            await js.add_stream(config)
        except Exception:  # noqa: BLE001 - exists with other settings: keep it
            await js.update_stream(config)

    async def publish(self, subject: str, payload: dict, timeout: float = 5.0) -> events.Envelope:
        if self.nc is None:
            raise RuntimeError("event bus is not connected")
        headers = telemetry.inject()
        envelope = events.Envelope(type=subject, source=self.source, payload=payload, trace=headers)
        await self.nc.jetstream(timeout=timeout).publish(
            subject, events.encode(envelope), headers=headers
        )
        return envelope

    async def subscribe(self, subject: str, handler: Handler) -> None:
        """Core-NATS subscription (live events) decoding envelopes and joining their trace."""
        if self.nc is None:
            raise RuntimeError("event bus is not connected")

        async def on_message(msg) -> None:
            try:
                envelope = events.decode(msg.data)
            except ValueError as exc:
                log.warning("dropping malformed event on %s: %s", msg.subject, exc)
                return
            token = telemetry.attach(telemetry.extract(msg.headers))
            try:
                await handler(envelope)
            finally:
                telemetry.detach(token)

        self._subs.append(await self.nc.subscribe(subject, cb=on_message))

    async def close(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        if not self.nc.is_connected:
            await self.nc.close()
            return
        try:
            await self.nc.drain()
        except Exception:  # noqa: BLE001 - closing anyway
            await self.nc.close()
