"""Durability checks: write through one registry, stop it cleanly, read through the next one
started on the same data directory."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from services.cli import infra
from services.common.registry_client import RegistryClient

T = TypeVar("T")


async def across_a_restart(launch: Callable[[Path], object], data_dir: Path,
                           write: Callable[[RegistryClient], Awaitable[T]],
                           check: Callable[[RegistryClient, T], Awaitable[None]]) -> None:
    """`write` on a registry over `data_dir`; it must exit 0 on SIGTERM; `check` (given what `write`
    returned) on a second registry over the same directory."""
    first = await asyncio.to_thread(launch, data_dir)
    client = RegistryClient(first.target)
    try:
        written = await write(client)
    finally:
        await client.close()
        await asyncio.to_thread(infra.stop, first.proc)
    assert first.proc.returncode == 0, first.log.read_text()[-3000:]
    second = await asyncio.to_thread(launch, data_dir)
    client = RegistryClient(second.target)
    try:
        await check(client, written)
    finally:
        await client.close()
        await asyncio.to_thread(infra.stop, second.proc)
