"""Triton's per-request queue parameters (`priority`, `timeout_us` / `timeout`) as the batcher
reads them: what is not a finite number, or a negative timeout, is the client's error."""
from __future__ import annotations

import re
import time

import pytest

from services.common.batcher import DEFAULT_PRIORITY_LEVEL, priority_level, request_deadline
from services.common.errors import ErrorCode, InvalidArgument


def test_numbers_are_read_and_absent_ones_take_the_defaults():
    assert priority_level({"priority": 2}) == 2
    assert priority_level({}) == DEFAULT_PRIORITY_LEVEL
    now = time.monotonic()
    assert now + 0.4 < request_deadline({"timeout_us": 500_000}, None, 60.0) <= time.monotonic() + 0.5
    assert now + 59 < request_deadline({}, None, 60.0) <= time.monotonic() + 60


@pytest.mark.parametrize(
    "priority", [-1, 1.7, -0.5, True, 2 ** 64, float(2 ** 64)],
    ids=["negative", "fraction", "negative-fraction", "boolean", "past-uint64", "past-uint64-float"])
def test_a_priority_that_is_not_an_unsigned_64_bit_integer_is_invalid_argument_naming_it(priority):
    with pytest.raises(InvalidArgument, match=rf"parameter 'priority' must be an integer from 0 to {2 ** 64 - 1}, "
                                              rf"got {re.escape(repr(priority))}$") as refused:
        priority_level({"priority": priority})
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("priority", "level"), [(0, DEFAULT_PRIORITY_LEVEL), (None, DEFAULT_PRIORITY_LEVEL),
                                                 (3, 3), (3.0, 3), (2 ** 64 - 1, 2 ** 64 - 1)],
                         ids=["zero", "null", "integer", "whole-float", "largest"])
def test_every_unsigned_64_bit_integer_is_a_priority_level_and_zero_the_default_one(priority, level):
    assert priority_level({"priority": priority}) == level


@pytest.mark.parametrize(
    ("read", "params", "message"),
    [
        (priority_level, {"priority": float("inf")}, "parameter 'priority' must be a finite number, got inf"),
        (priority_level, {"priority": "high"}, "parameter 'priority' must be a number, got 'high'"),
        (lambda p: request_deadline(p, None, 60.0), {"timeout_us": float("nan")},
         "parameter 'timeout_us' must be a finite number, got nan"),
        (lambda p: request_deadline(p, None, 60.0), {"timeout_us": -5},
         "parameter 'timeout_us' must not be negative, got -5"),
        (lambda p: request_deadline(p, None, 60.0), {"timeout": -1.5},
         "parameter 'timeout' must not be negative, got -1.5"),
    ],
    ids=["infinite-priority", "word-priority", "nan-timeout", "negative-timeout-us", "negative-timeout"],
)
def test_what_is_not_a_finite_number_or_a_negative_timeout_is_invalid_argument(read, params, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        read(params)
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
