"""The asyncio twin of the client: the same sessions, awaitable and async-iterable.

It rides on the synchronous client's I/O thread (which already keeps the socket off the
caller's thread) and hands blocking waits to the default executor, so an event loop
never blocks on Giris.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator

from giris.runtime.client import Client, Item, Session


class AsyncSession:
    def __init__(self, session: Session) -> None:
        self.sync = session
        self.token = session.token
        self.spec = session.spec

    async def say(self, text: str, **kw: Any) -> AsyncIterator[Item]:
        loop = asyncio.get_running_loop()
        timeout = kw.pop("timeout", None)
        utt = await loop.run_in_executor(None, functools.partial(self.sync.start_say, text, **kw))
        it = self.sync.stream(utt, timeout=timeout)
        done = object()
        while True:
            item = await loop.run_in_executor(None, next, it, done)
            if item is done:
                return
            yield item

    async def cancel(self, utterance: int | None = None) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(None, self.sync.cancel, utterance)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.sync.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncClient:
    """``async with AsyncClient(endpoint) as c: s = await c.open_session(...)``."""

    def __init__(self, endpoint: str, **kw: Any) -> None:
        self.sync = Client(endpoint, **kw)

    async def open_session(self, avatar: Any = None, **kw: Any) -> AsyncSession:
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(None, functools.partial(self.sync.open_session, avatar, **kw))
        return AsyncSession(s)

    async def status(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.sync.status)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.sync.close)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
