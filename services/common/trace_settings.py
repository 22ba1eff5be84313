"""Triton's trace extension in OpenTelemetry mode: which inference requests start a trace.

A request whose caller sent a W3C `traceparent` is traced as its caller decided. For the others
the server decides, per model, with Triton's settings (the TraceSetting RPC and
`/v2[/models/M]/trace/setting`): `trace_level` OFF traces none, TIMESTAMPS traces one request
in `trace_rate`, and `trace_count` (-1: no limit) is how many traces are left to start, counted
down as they start. Model settings override the global ones setting by setting; a model
setting that is cleared follows the global one again, a global one that is cleared is the
configured one again. Traces are OpenTelemetry spans exported
over OTLP (`trace_mode` opentelemetry), so Triton's file settings (`trace_file`,
`log_frequency`) do not apply and TENSORS is not a level offered.

The settings live in a store: one process's memory (a runtime), or Redis, shared by the
coordinator processes that serve one OIP port (`RedisTraceStore`)."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from services.common.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
MODE = "opentelemetry"
LEVELS = ("OFF", "TIMESTAMPS")
GLOBAL = ""  # the scope of the global settings; a model's scope is its name
SETTINGS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")
MAX_COUNTED = 10_000  # models whose requests are counted for trace_rate
PICKED_HEADER = "cnei-trace-picked"  # the front door sampled this request: trace it (rate applied)


@dataclass(frozen=True)
class TraceConfig:
    level: tuple[str, ...] = ("TIMESTAMPS",)
    rate: int = 1
    count: int = -1
    count_scope: str = GLOBAL  # whose trace_count these requests count down

    @property
    def on(self) -> bool:
        """Requests start traces (while any are left to start)."""
        return "TIMESTAMPS" in self.level and self.count != 0


def _one(name: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise InvalidArgument(f"trace setting '{name}' takes one value, got {list(values)}")
    return values[0]


def _integer(name: str, values: Sequence[str], least: int) -> int:
    text = _one(name, values)
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise InvalidArgument(f"trace setting '{name}' must be an integer of at least {least}, not '{text}'")
    return value


def parse_update(changes: Mapping[str, Sequence[str] | None]) -> dict[str, object]:
    """Triton's {setting: values} -> {field: value} to set; None as a value clears the setting (a
    model's follows the global one again; a global one is reset, see TraceSettings.update).
    Raises INVALID_ARGUMENT naming what is wrong."""
    update: dict[str, object] = {}
    for name, values in changes.items():
        if name not in SETTINGS:
            raise InvalidArgument(f"unknown trace setting '{name}'; known: {', '.join(SETTINGS)}")
        if values is None or (not isinstance(values, str) and len(values) == 0):
            if name in ("trace_level", "trace_rate", "trace_count"):
                update[name.removeprefix("trace_")] = None
            continue
        if isinstance(values, str):
            values = [values]
        if name == "trace_level":
            levels = tuple(dict.fromkeys(v.upper() for v in values))
            unknown = [v for v in levels if v not in LEVELS]
            if unknown:
                raise InvalidArgument(f"trace level {', '.join(unknown)} is not offered: traces are OpenTelemetry "
                                      f"spans; levels are {' and '.join(LEVELS)}")
            if "OFF" in levels and len(levels) > 1:
                raise InvalidArgument(f"trace level OFF cannot be combined with {', '.join(levels)}")
            update["level"] = levels
        elif name == "trace_rate":
            update["rate"] = _integer(name, values, 1)
        elif name == "trace_count":
            update["count"] = _integer(name, values, -1)
        elif name == "trace_mode":
            if _one(name, values) != MODE:
                raise InvalidArgument(f"trace_mode is {MODE} (spans exported over OTLP) and cannot be changed")
        else:  # trace_file, log_frequency: Triton's file mode
            raise InvalidArgument(f"trace setting '{name}' belongs to Triton's file trace mode; here traces are "
                                  f"OpenTelemetry spans exported over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)")
    return update


def config_from(level: str, rate: int, count: int) -> TraceConfig:
    """Global settings from a service's configuration, checked as TraceSetting checks them."""
    try:
        update = parse_update({"trace_level": [level], "trace_rate": [str(rate)], "trace_count": [str(count)]})
    except InvalidArgument as exc:
        raise ValueError(f"trace settings: {exc.message}") from None
    return TraceConfig(level=update["level"], rate=update["rate"], count=update["count"])


def to_triton(config: TraceConfig) -> dict[str, list[str]]:
    return {"trace_level": list(config.level), "trace_rate": [str(config.rate)],
            "trace_count": [str(config.count)], "log_frequency": ["0"], "trace_file": [""], "trace_mode": [MODE]}


def effective(scopes: Mapping[str, Mapping[str, object]], model: str,
              configured: TraceConfig = TraceConfig()) -> TraceConfig:
    """The settings that apply to `model` (GLOBAL: the global ones): the global settings (where
    the store has none: the `configured` ones) with the model's own on top."""
    base = scopes.get(GLOBAL, {})
    own = scopes.get(model, {}) if model else {}
    config = TraceConfig(level=tuple(own.get("level", base.get("level", configured.level))),
                         rate=int(own.get("rate", base.get("rate", configured.rate))),
                         count=int(own.get("count", base.get("count", configured.count))),
                         count_scope=model if "count" in own else GLOBAL)
    return config


class TraceStore(Protocol):
    async def read(self) -> dict[str, dict[str, object]]: ...
    async def write(self, scope: str, update: Mapping[str, object]) -> None: ...
    async def reset(self, config: TraceConfig) -> None: ...
    async def seed(self, config: TraceConfig) -> None: ...
    async def take(self, scope: str) -> bool: ...


def _global_fields(config: TraceConfig) -> dict[str, object]:
    return {"level": config.level, "rate": config.rate, "count": config.count}


class MemoryTraceStore:
    """One process's settings."""

    def __init__(self, config: TraceConfig | None = None):
        self.scopes: dict[str, dict[str, object]] = {}
        if config is not None:
            self.scopes[GLOBAL] = _global_fields(config)

    async def read(self) -> dict[str, dict[str, object]]:
        return {scope: dict(fields) for scope, fields in self.scopes.items()}

    async def write(self, scope: str, update: Mapping[str, object]) -> None:
        fields = self.scopes.setdefault(scope, {})
        for name, value in update.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value

    async def reset(self, config: TraceConfig) -> None:
        self.scopes = {GLOBAL: _global_fields(config)}

    async def seed(self, config: TraceConfig) -> None:
        fields = self.scopes.setdefault(GLOBAL, {})
        for name, value in _global_fields(config).items():
            fields.setdefault(name, value)

    async def take(self, scope: str) -> bool:
        fields = self.scopes.get(scope, {})
        count = int(fields.get("count", -1))
        if count > 0:
            fields["count"] = count - 1
        return count != 0


# One trace taken from a scope's count: 1 when the count allows it (-1: no limit), and the count
# goes down by one when it is positive.
_TAKE = """
local c = redis.call('HGET', KEYS[1], ARGV[1])
if not c then return 1 end
c = tonumber(c)
if c == 0 then return 0 end
if c > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
return 1
"""


class RedisTraceStore:
    """The settings of every coordinator process sharing one Redis: hash `key`, a field
    `cfg:<scope>` (JSON of level and rate) and a field `count:<scope>` per scope."""

    def __init__(self, redis: Redis, key: str = "cnei:trace:settings"):
        self.redis = redis
        self.key = key
        self._take = redis.register_script(_TAKE)

    async def read(self) -> dict[str, dict[str, object]]:
        scopes: dict[str, dict[str, object]] = defaultdict(dict)
        for raw_name, raw_value in (await self.redis.hgetall(self.key)).items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            kind, _, scope = name.partition(":")
            if kind == "cfg":
                scopes[scope].update(json.loads(raw_value))
            elif kind == "count":
                scopes[scope]["count"] = int(raw_value)
        return dict(scopes)

    async def write(self, scope: str, update: Mapping[str, object]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.key)
                    raw = await pipe.hget(self.key, f"cfg:{scope}")
                    fields = json.loads(raw) if raw else {}
                    for name, value in update.items():
                        if name == "count":
                            continue
                        if value is None:
                            fields.pop(name, None)
                        else:
                            fields[name] = list(value) if isinstance(value, tuple) else value
                    pipe.multi()
                    pipe.hset(self.key, f"cfg:{scope}", json.dumps(fields))
                    if "count" in update:
                        if update["count"] is None:
                            pipe.hdel(self.key, f"count:{scope}")
                        else:
                            pipe.hset(self.key, f"count:{scope}", int(update["count"]))
                    await pipe.execute()
                    return
                except WatchError:  # another writer came first: read again
                    continue

    @staticmethod
    def _global_hash_fields(config: TraceConfig) -> dict[str, object]:
        return {f"cfg:{GLOBAL}": json.dumps({"level": list(config.level), "rate": config.rate}),
                f"count:{GLOBAL}": config.count}

    async def reset(self, config: TraceConfig) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key)
            pipe.hset(self.key, mapping=self._global_hash_fields(config))
            await pipe.execute()

    async def seed(self, config: TraceConfig) -> None:
        """Write the global settings where the hash has none (each field only if absent)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in self._global_hash_fields(config).items():
                pipe.hsetnx(self.key, name, value)
            await pipe.execute()

    async def take(self, scope: str) -> bool:
        return bool(await self._take(keys=[self.key], args=[f"count:{scope}"]))


class TraceSettings:
    """The settings as this process sees them (re-read from the store every `ttl_s`, at once
    after its own changes), and the sampling of requests that arrive without trace context."""

    def __init__(self, store: TraceStore, ttl_s: float = 1.0, configured: TraceConfig = TraceConfig()):
        """`configured`: the global settings while the store holds none (or cannot be read)."""
        self.store = store
        self.ttl_s = ttl_s
        self.configured = configured
        self._scopes: dict[str, dict[str, object]] = {}
        self._expires = 0.0
        self._seen: dict[str, int] = defaultdict(int)

    async def _read(self) -> dict[str, dict[str, object]]:
        if time.monotonic() >= self._expires:
            try:
                scopes = await self.store.read()
                if "count" not in scopes.get(GLOBAL, {}):
                    # Redis was away when this process started (or came back empty): the
                    # configured settings become the store's, so trace_count is counted down there
                    await self.store.seed(self.configured)
                    scopes = await self.store.read()
                self._scopes = scopes
            except Exception:  # noqa: BLE001 - the store away (Redis down): keep the last settings read
                log.warning("trace settings not read; using the last read again for %.1f s", self.ttl_s, exc_info=True)
            self._expires = time.monotonic() + self.ttl_s
        return self._scopes

    async def config(self, model: str = GLOBAL) -> TraceConfig:
        return effective(await self._read(), model, self.configured)

    async def reset(self) -> None:
        """Make the configured settings the store's (a coordinator starting); with the store away
        they apply here all the same, and are written to it once it answers (`seed`, on a read
        that finds no global settings)."""
        try:
            await self.store.reset(self.configured)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis down at start: serve on, log it
            log.warning("trace settings not written to their store (%s); the configured ones apply", exc)
        self._expires = 0.0

    async def get(self, model: str = GLOBAL) -> dict[str, list[str]]:
        return to_triton(await self.config(model))

    async def update(self, model: str, changes: Mapping[str, Sequence[str] | None]) -> dict[str, list[str]]:
        """Apply Triton's changes to the model's settings (GLOBAL: the global ones; no changes:
        read them); the settings that apply afterwards."""
        update = parse_update(changes)
        if model == GLOBAL:  # as Triton: a cleared global setting is the server's start value again
            configured = _global_fields(self.configured)
            update = {name: configured[name] if value is None else value for name, value in update.items()}
        if update:
            try:
                await self.store.write(model, update)
            except RedisError as exc:
                raise Unavailable(f"trace settings are kept in Redis, which does not answer: {exc}") from None
        self._expires = 0.0
        return await self.get(model)

    async def pick(self, model: str, picked: bool = False) -> bool:
        """Whether a request for `model` that came without trace context starts a trace: one in
        `trace_rate` (`picked`: sampled already, by the front door), while the count lasts."""
        config = await self.config(model)
        if not config.on:
            return False
        if not picked:
            if len(self._seen) > MAX_COUNTED and model not in self._seen:
                self._seen.clear()  # names clients made up must not grow it without end
            self._seen[model] += 1
            if self._seen[model] % config.rate:
                return False
        if config.count < 0:
            return True
        if await self.store.take(config.count_scope):
            self._expires = 0.0  # the count moved: read it again next time
            return True
        return False
