"""Stored records read back into dataclasses: the fields a newer writer added are left out."""
from __future__ import annotations

from typing import Any


def known_fields(cls: type, obj: dict[str, Any]) -> dict[str, Any]:
    """The items of `obj` that are fields of dataclass `cls` (those a newer writer added are left)."""
    return {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
