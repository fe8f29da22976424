"""
Storage of a node's table and head behind L{IStore}.

This module owns how a state is kept. L{MemoryStore} keeps it in memory,
for tests and for nodes that rebuild from the network at every start; it can
be handed to a new node in the same process to model a node that restarts
with what it had. It knows nothing of sockets or of the network.
"""

from __future__ import annotations

from typing import Iterable

from zope.interface import implementer

from dtable.interfaces import IStore
from dtable.table import root_of
from dtable.wire import Head


def empty_head() -> Head:
    """
    The head of a table the master never published to.
    """
    return Head(rev=0, base=0, root=root_of([]))


class StoreClosed(Exception):
    """
    The store was used before open() or after close().
    """


@implementer(IStore)
class MemoryStore:
    """
    An IStore in memory. Commits are atomic because they cannot be
    interrupted halfway.
    """

    def __init__(self) -> None:
        self._head = empty_head()
        self._data: dict[str, bytes] = {}
        self._open = False

    def open(self) -> None:
        self._open = True

    def head(self) -> Head:
        self._check()
        return self._head

    def items(self) -> Iterable[tuple[str, bytes]]:
        self._check()
        return list(self._data.items())

    def commit(
        self, head: Head, adds: list[tuple[str, bytes]], removes: list[str]
    ) -> None:
        self._check()
        for h in removes:
            self._data.pop(h, None)
        self._data.update(adds)
        self._head = head

    def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise StoreClosed("the store is not open")
