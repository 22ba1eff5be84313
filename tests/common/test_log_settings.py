"""Triton's log settings: checks, what each switch does to this process's logging, and settings
shared in real Redis by the processes of one coordinator."""
from __future__ import annotations

import logging

import pytest

from services.common import log_settings
from services.common.errors import InvalidArgument
from services.common.log_settings import LogConfig, LogSettings, parse_update


@pytest.fixture
def records():
    """What the root logger's handler lets through while a test changes the settings; the
    logging set-up is restored afterwards."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, root.handlers[:]
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.name == "tests.log_settings":  # not, say, asyncio's report of a task an earlier test left
                seen.append(record.levelname)

    root.handlers[:] = [Keep()]
    yield seen
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    # no severity left switched off, on any handler (pytest's capturing handlers live for the
    # whole session: a filter left on them hid later tests' INFO records from caplog)
    log_settings._severities.off = frozenset()
    for handler in root.handlers:
        handler.removeFilter(log_settings._severities)
    log_settings._applied = None


def _log_each(logger: logging.Logger) -> None:
    logger.debug("d"), logger.info("i"), logger.warning("w"), logger.error("e"), logger.critical("c")


@pytest.mark.parametrize("changes, message", [
    ({"log_infos": True}, "unknown log setting 'log_infos'"),
    ({"log_info": "yes"}, "'log_info' is a boolean"),
    ({"log_verbose_level": -1}, "'log_verbose_level' is an unsigned integer"),
    ({"log_verbose_level": True}, "'log_verbose_level' is an unsigned integer"),
    ({"log_verbose_level": 2**32}, "'log_verbose_level' is an unsigned integer up to 4294967295, not 4294967296"),
    ({"log_verbose_level": 10**30}, "'log_verbose_level' is an unsigned integer up to 4294967295"),
    ({"log_file": "/tmp/server.log"}, "log_file cannot be set"),
    ({"log_format": "ISO8601"}, "log_format is 'default'"),
])
def test_bad_log_settings_are_refused_with_what_is_wrong(changes, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_update(changes)


def test_the_largest_verbose_level_a_uint32_holds_is_taken():
    assert parse_update({"log_verbose_level": 2**32 - 1}) == {"log_verbose_level": 2**32 - 1}


async def test_each_switch_decides_what_this_process_logs(records):
    logger = logging.getLogger("tests.log_settings")
    settings = LogSettings()
    await settings.reset(LogConfig())
    _log_each(logger)
    assert records == ["INFO", "WARNING", "ERROR", "CRITICAL"]
    records.clear()
    assert (await settings.update({"log_info": False, "log_warning": False}))["log_info"] is False
    _log_each(logger)
    assert records == ["ERROR", "CRITICAL"]
    records.clear()
    await settings.update({"log_verbose_level": 1, "log_info": True})
    records.clear()  # the update's own line
    _log_each(logger)
    assert records == ["DEBUG", "INFO", "ERROR", "CRITICAL"]  # warnings are still off
    assert await settings.get() == {"log_info": True, "log_warning": False, "log_error": True,
                                    "log_verbose_level": 1, "log_file": "", "log_format": "default"}


async def test_settings_in_redis_are_those_of_every_process_sharing_the_key(own_redis, records):
    first, second = LogSettings(own_redis, "cnei:log:settings:1"), LogSettings(own_redis, "cnei:log:settings:1")
    other = LogSettings(own_redis, "cnei:log:settings:2")  # another coordinator's
    await first.reset(LogConfig())
    await other.reset(LogConfig())
    await first.update({"log_verbose_level": 2})
    assert (await second.get())["log_verbose_level"] == 2
    assert (await other.get())["log_verbose_level"] == 0
    await first.update({"log_verbose_level": 2})  # and this process logs what its settings say
    records.clear()  # the updates' own lines
    logging.getLogger("tests.log_settings").debug("d")
    assert records == ["DEBUG"]
