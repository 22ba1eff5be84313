"""Triton's logging extension (the LogSettings RPC, `/v2/logging`): which severities a service
logs, changed at run time.

`log_info`, `log_warning` and `log_error` switch those severities on or off; `log_verbose_level`
above 0 adds DEBUG records. Logs are JSON lines on standard error (`cnei up` writes them to
`.cnei/logs/`), so `log_file` stays "" and `log_format` "default". On the coordinator the
settings are kept in Redis, shared by the processes that serve one OIP port: each applies what
the store says every `interval_s` (`follow`), and at once the changes it made itself."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)
SWITCHES = {"log_info": logging.INFO, "log_warning": logging.WARNING, "log_error": logging.ERROR}
SETTINGS = (*SWITCHES, "log_verbose_level", "log_file", "log_format")
VERBOSE_LEVELS = range(1 << 32)  # log_verbose_level travels as a uint32 over gRPC


@dataclass(frozen=True)
class LogConfig:
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0

    @classmethod
    def from_level(cls, level: int) -> "LogConfig":
        """The switches a plain logging level stands for (CNEI_LOG_LEVEL)."""
        return cls(log_info=level <= logging.INFO, log_warning=level <= logging.WARNING,
                   log_error=level <= logging.ERROR, log_verbose_level=int(level <= logging.DEBUG))


def parse_update(changes: Mapping[str, object]) -> dict[str, object]:
    """Triton's {setting: value} (bool, unsigned integer or string, as the setting's type is) ->
    fields to set. Raises INVALID_ARGUMENT naming what is wrong."""
    update: dict[str, object] = {}
    for name, value in changes.items():
        if name in SWITCHES:
            if not isinstance(value, bool):
                raise InvalidArgument(f"log setting '{name}' is a boolean, not {json.dumps(value)}")
            update[name] = value
        elif name == "log_verbose_level":  # Triton's uint32_param: a larger one could not be read back
            if isinstance(value, bool) or not isinstance(value, int) or value not in VERBOSE_LEVELS:
                raise InvalidArgument(f"log setting 'log_verbose_level' is an unsigned integer up to "
                                      f"{VERBOSE_LEVELS[-1]}, not {json.dumps(value)}")
            update[name] = value
        elif name == "log_file":
            if value != "":
                raise InvalidArgument("log_file cannot be set: logs are JSON lines on standard error (cnei up writes "
                                      "them to .cnei/logs/)")
        elif name == "log_format":
            if value != "default":
                raise InvalidArgument(f"log_format is 'default' (JSON lines with trace ids), not {json.dumps(value)}")
        else:
            raise InvalidArgument(f"unknown log setting '{name}'; known: {', '.join(SETTINGS)}")
    return update


def to_triton(config: LogConfig) -> dict[str, object]:
    return {**asdict(config), "log_file": "", "log_format": "default"}


class _Severities(logging.Filter):
    """Drops records of the severities switched off (those between two that are on)."""

    def __init__(self):
        super().__init__("cnei-log-settings")
        self.off: frozenset[int] = frozenset()

    def filter(self, record: logging.LogRecord) -> bool:
        return min(record.levelno, logging.ERROR) not in self.off


_severities = _Severities()
_applied: LogConfig | None = None


def apply(config: LogConfig) -> None:
    """Make this process's logging follow `config`."""
    global _applied
    _applied = config
    levels = {logging.DEBUG: config.log_verbose_level > 0, logging.INFO: config.log_info,
              logging.WARNING: config.log_warning, logging.ERROR: config.log_error}
    on = [level for level, enabled in levels.items() if enabled]
    root = logging.getLogger()
    root.setLevel(min(on) if on else logging.CRITICAL + 1)
    _severities.off = frozenset(level for level, enabled in levels.items() if not enabled)
    for handler in root.handlers:
        if _severities not in handler.filters:
            handler.addFilter(_severities)


def current() -> LogConfig:
    """What this process logs now."""
    return _applied or LogConfig.from_level(logging.getLogger().getEffectiveLevel())


class LogSettings:
    """This process's log settings; with Redis, those of every process sharing `key`."""

    def __init__(self, redis: Redis | None = None, key: str = "cnei:log:settings", interval_s: float = 1.0):
        self.redis = redis
        self.key = key
        self.interval_s = interval_s

    async def reset(self, config: LogConfig) -> None:
        """Start from `config` (a coordinator starting: its own configuration); with Redis away it
        applies here all the same."""
        apply(config)
        if self.redis is not None:
            try:
                await self.redis.set(self.key, json.dumps(asdict(config)))
            except Exception as exc:  # noqa: BLE001 - e.g. Redis down at start: serve on, log it
                log.warning("log settings not written to Redis (%s); the configured ones apply", exc)

    async def _stored(self) -> LogConfig:
        if self.redis is None:
            return current()
        try:
            raw = await self.redis.get(self.key)
        except RedisError:
            return current()  # Redis away: what this process applies (changes wait for it)
        return LogConfig(**json.loads(raw)) if raw else current()

    async def get(self) -> dict[str, object]:
        config = await self._stored()
        apply(config)
        return to_triton(config)

    async def update(self, changes: Mapping[str, object]) -> dict[str, object]:
        """Apply Triton's changes (none: read the settings); the settings that apply afterwards."""
        if not changes:
            return await self.get()
        update = parse_update(changes)
        config = replace(await self._stored(), **update)
        if self.redis is not None:
            try:
                await self.redis.set(self.key, json.dumps(asdict(config)))
            except RedisError as exc:
                raise Unavailable(f"log settings are kept in Redis, which does not answer: {exc}") from None
        apply(config)
        log.info("log settings now %s", to_triton(config))
        return to_triton(config)

    async def follow(self) -> None:
        """Apply the shared settings every `interval_s` (until cancelled)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                apply(await self._stored())
            except Exception:  # noqa: BLE001 - Redis away: keep the settings applied last
                log.debug("log settings not read", exc_info=True)
