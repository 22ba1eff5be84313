"""A stored record read back into its dataclass keeps the fields it knows and leaves a newer writer's."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.records import known_fields


@dataclass
class Record:
    name: str
    size: int = 0


@pytest.mark.parametrize(
    ("stored", "expected"),
    [({"name": "a", "size": 2}, {"name": "a", "size": 2}),
     ({"name": "a", "size": 2, "added_later": [1]}, {"name": "a", "size": 2}),
     ({"name": "a"}, {"name": "a"}),
     ({}, {})],
    ids=["every-field", "a-newer-writers-field-left-out", "a-field-missing-stays-missing", "empty"],
)
def test_known_fields_are_the_items_of_a_stored_record_its_dataclass_has(stored, expected):
    assert known_fields(Record, stored) == expected
