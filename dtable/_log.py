"""
The seed's debug levels on twisted.logger.

Level 1 logs links, level 2 peer selection and the clean loop, level 3 every
frame, each in its own namespace (dtable.links, dtable.overlay, dtable.wire)
at the debug log level. Below its level a channel drops its events before
they are formatted, since twistd prints every level it is given.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger


class DebugChannel(Protocol):
    def debug(self, format: str | None = None, **kwargs: Any) -> None: ...


class _Off:
    """
    A channel below its level: nothing is built, let alone formatted (a
    Logger with an observer that drops its events still builds each event,
    which cost a few microseconds for every frame of a busy link).
    """

    def debug(self, format: str | None = None, **kwargs: Any) -> None:
        pass


_OFF = _Off()


def debug_channel(namespace: str, level: int, debug: int) -> DebugChannel:
    """
    A Logger for C{namespace} that emits only when the node's C{debug}
    setting is at least C{level}.
    """
    if debug >= level:
        return Logger(namespace=namespace)
    return _OFF
