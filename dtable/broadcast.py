"""
Message flooding: the duplicate filter that delivers each message at most once
per node and stops the flood.

It owns the memory of recently seen message ids, bounded in count and in time.
It knows nothing of sockets or links; the service asks it whether a message
is new and forwards it if so.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


def new_message_id() -> str:
    """
    A fresh, unguessable message id.
    """
    return os.urandom(16).hex()


class DuplicateFilter:
    """
    Remembers message ids for C{ttl} seconds, at most C{size} of them.

    When full, the oldest ids are forgotten first; a message older than the
    filter's memory may be delivered again, which is why the flood also
    carries a bounded lifetime in the overlay's size.
    """

    def __init__(self, clock: "IReactorTime", ttl: float, size: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def first_sight(self, message_id: str) -> bool:
        """
        Record C{message_id}; True if it was not seen within the ttl.
        """
        now = self._clock.seconds()
        self._expire(now)
        if message_id in self._expiry:
            return False
        self._expiry[message_id] = now + self._ttl
        while len(self._expiry) > self._size:
            self._expiry.popitem(last=False)
        return True

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry:
            oldest = next(iter(expiry))
            if expiry[oldest] > now:
                break
            del expiry[oldest]
