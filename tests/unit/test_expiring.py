"""The expiring map behind the key and function caches of the invoke path."""

from __future__ import annotations

import asyncio

import pytest

from app.expiring import ExpiringMap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_entry_expires_after_its_ttl(clock: Clock) -> None:
    cache: ExpiringMap[str, int] = ExpiringMap(2.0, clock=clock)
    cache.put("k", 1)
    clock.now += 1.9
    assert cache.get("k") == 1
    clock.now += 0.2
    assert cache.get("k") is None


def test_a_read_in_the_second_half_of_its_life_reloads_it_once(clock: Clock) -> None:
    async def scenario() -> None:
        cache: ExpiringMap[str, int] = ExpiringMap(2.0, clock=clock)
        cache.put("k", 1)
        clock.now += 0.5
        assert not cache.wants_reload("k")
        clock.now += 1.0
        assert cache.wants_reload("k")
        loads = 0
        release = asyncio.Event()

        async def load() -> int:
            nonlocal loads
            loads += 1
            await release.wait()
            return 2

        cache.reload("k", load)
        cache.reload("k", load)  # already under way: not a second load
        assert not cache.wants_reload("k")
        await asyncio.sleep(0)
        release.set()
        await asyncio.sleep(0.01)
        assert loads == 1
        assert cache.get("k") == 2
        # Reloaded: a full life again from now, so steady readers never see it expire.
        clock.now += 1.9
        assert cache.get("k") == 2

    asyncio.run(scenario())


def test_fresh_reads_and_reloads_in_one_lookup(clock: Clock) -> None:
    async def scenario() -> None:
        cache: ExpiringMap[str, int] = ExpiringMap(2.0, clock=clock)
        loads = 0

        async def load() -> int:
            nonlocal loads
            loads += 1
            return 10 + loads

        assert cache.fresh("k", load) is None  # nothing stored: the caller loads it
        cache.put("k", 1)
        clock.now += 0.5
        assert cache.fresh("k", load) == 1
        await asyncio.sleep(0.01)
        assert loads == 0, "reloaded in the first half of its life"
        clock.now += 1.0
        assert cache.fresh("k", load) == 1  # the old value now, the reload meanwhile
        assert cache.fresh("k", load) == 1
        await asyncio.sleep(0.01)
        assert loads == 1
        assert cache.fresh("k", load) == 11
        clock.now += 2.1
        assert cache.fresh("k", load) is None  # expired: not served, left to the caller

    asyncio.run(scenario())


def test_a_reload_does_not_undo_a_change_made_meanwhile(clock: Clock) -> None:
    async def scenario() -> None:
        cache: ExpiringMap[str, int] = ExpiringMap(2.0, clock=clock)
        cache.put("k", 1)
        clock.now += 1.5
        release = asyncio.Event()

        async def stale_read() -> int:
            await release.wait()
            return 1  # what the database held before the change below

        cache.reload("k", stale_read)
        await asyncio.sleep(0)
        cache.put("k", 3)  # a change made through this process meanwhile
        release.set()
        await asyncio.sleep(0.01)
        assert cache.get("k") == 3

        clock.now += 1.5
        cache.reload("k", stale_read)
        await asyncio.sleep(0)
        cache.pop("k")
        release.set()
        await asyncio.sleep(0.01)
        assert cache.get("k") is None

    asyncio.run(scenario())


def test_a_reload_that_finds_nothing_drops_the_entry_and_a_failed_one_keeps_it(
    clock: Clock,
) -> None:
    async def scenario() -> None:
        cache: ExpiringMap[str, int] = ExpiringMap(2.0, clock=clock)
        cache.put("gone", 1)
        cache.put("flaky", 1)
        clock.now += 1.5

        async def nothing() -> None:
            return None

        async def failing() -> int:
            raise OSError("database unreachable")

        cache.reload("gone", nothing)
        cache.reload("flaky", failing)
        await asyncio.sleep(0.01)
        assert cache.get("gone") is None
        assert cache.get("flaky") == 1  # it still expires on time
        clock.now += 0.6
        assert cache.get("flaky") is None

    asyncio.run(scenario())


def test_the_map_stays_bounded(clock: Clock) -> None:
    cache: ExpiringMap[int, int] = ExpiringMap(2.0, max_entries=10, clock=clock)
    for i in range(25):
        cache.put(i, i)
    assert len(cache._entries) <= 10
    assert cache.get(24) == 24
