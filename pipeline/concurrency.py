"""A bounded, ordered map over a thread pool (used by the listing and by the replica's stages)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    executor: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], depth: int
) -> Iterator[R]:
    """``map(fn, items)`` on ``executor`` with at most ``depth`` calls in flight, results in order."""
    pending: collections.deque[Future] = collections.deque()
    for item in items:
        if len(pending) >= depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()
