"""One instance of something per asyncio event loop (a server process's hubs live in its loop)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """Called in a running loop: that loop's instance, made by `factory` on first use.

    Keyed weakly by the loop, so a loop that ends (a test's) takes its instance with it.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self.instances: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        instance = self.instances.get(loop)
        if instance is None:
            instance = self.instances[loop] = self.factory()
        return instance
