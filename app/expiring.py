"""A map whose entries expire, refreshed ahead of expiry by whoever keeps reading them.

The invoke path reads keys and function configurations from such maps, so that it does not read
the database. A plain expiry would make one request in every TTL wait for a database read
(milliseconds, many times a warm invocation); here a hit in the second half of an entry's life
starts one background reload instead, and an entry read steadily never expires. An entry read
by nobody still expires on time, so the TTL keeps bounding how stale another API process's
change can be seen.

A reload that started before a local change (``pop``, ``put``) must not overwrite it with what it
read before the change: a reload stores its result only if the entry it set out to refresh is
still the one in the map.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from app.logging import get_logger

log = get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_ENTRIES = 100_000


class ExpiringMap(Generic[K, V]):
    def __init__(
        self,
        ttl_s: float,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[K, tuple[V, float]] = {}  # value, monotonic time it was stored
        self._reloading: set[K] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: K) -> V | None:
        """The value if it has not expired; ``wants_reload`` says whether to refresh it."""
        aged = self._aged(key)
        return None if aged is None else aged[0]

    def wants_reload(self, key: K) -> bool:
        aged = self._aged(key)
        return aged is not None and self._due(key, aged[1])

    def fresh(self, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """``get``, and ``reload`` with ``load`` when ``wants_reload``: in one lookup, for the
        readers on the invoke path."""
        aged = self._aged(key)
        if aged is None:
            return None
        if self._due(key, aged[1]):
            self.reload(key, load)
        return aged[0]

    def _aged(self, key: K) -> tuple[V, float] | None:
        """The value and its age in seconds, if it has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self.clock() - entry[1]
        return None if age > self.ttl_s else (entry[0], age)

    def _due(self, key: K, age: float) -> bool:
        """Whether an entry this old is in the second half of its life and not being reloaded."""
        return age > self.ttl_s / 2 and key not in self._reloading

    def put(self, key: K, value: V) -> None:
        self._store(key, value)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def pop_where(self, predicate: Callable[[K, V], bool]) -> None:
        for key in [k for k, (v, _) in self._entries.items() if predicate(k, v)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def reload(self, key: K, load: Callable[[], Awaitable[V | None]]) -> None:
        """Reload ``key`` in the background with ``load`` (None: it is gone), once at a time."""
        if key in self._reloading:
            return
        self._reloading.add(key)
        task = asyncio.create_task(self._reload(key, load, self._entries.get(key)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(
        self, key: K, load: Callable[[], Awaitable[V | None]], entry: tuple[V, float] | None
    ) -> None:
        try:
            value = await load()
        except Exception:  # noqa: BLE001 - the entry simply expires; the next miss reads again
            log.warning("reloading a cached entry failed", exc_info=True)
            return
        finally:
            self._reloading.discard(key)
        if entry is None or self._entries.get(key) is not entry:
            return  # changed meanwhile: what was read may predate the change
        if value is None:
            self._entries.pop(key, None)
        else:
            self._store(key, value)

    def _store(self, key: K, value: V) -> None:
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._entries.clear()
        self._entries[key] = (value, self.clock())
