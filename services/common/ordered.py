"""Work on the items of an async stream concurrently, answering in the order they came.

Triton's ModelStreamInfer semantics for models that are not decoupled: every request on a
stream is started as it arrives (so concurrent requests of one stream batch together) and the
responses leave in request order. At most `window` items are started and unanswered at once;
beyond that the stream is not read (backpressure to the client) until the oldest is answered.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


async def map_in_order(items: AsyncIterable[T], work: Callable[[T], Awaitable[R]],
                       window: int) -> AsyncIterator[R]:
    """Yield `await work(item)` for each item, in item order, running up to `window` at once.

    An error raised by the stream or by `work` ends the iteration with that error once every
    earlier result has been yielded; whatever is still running is cancelled when the consumer
    stops early (a cancelled RPC) or an error ends it.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    slots = asyncio.Semaphore(window)
    order: asyncio.Queue = asyncio.Queue()  # started work in item order, then _END or an error

    async def read() -> None:
        try:
            async for item in items:
                await slots.acquire()
                order.put_nowait(asyncio.ensure_future(work(item)))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer in order
            order.put_nowait(exc)
            return
        order.put_nowait(_END)

    reader = asyncio.ensure_future(read())
    head: asyncio.Future | None = None
    try:
        while True:
            head = await order.get()
            if head is _END:
                break
            if isinstance(head, Exception):
                raise head
            try:
                result = await head
            finally:
                slots.release()
            head = None
            yield result
    finally:
        reader.cancel()
        pending = [head] if isinstance(head, asyncio.Future) else []
        while not order.empty():
            leftover = order.get_nowait()
            if isinstance(leftover, asyncio.Future):
                pending.append(leftover)
        for future in pending:
            future.cancel()
        await asyncio.gather(reader, *pending, return_exceptions=True)
