"""
The seed's debug levels on twisted.logger.

Level 1 logs links, level 2 peer selection and the clean loop, level 3 every
frame, each in its own namespace (dtable.links, dtable.overlay, dtable.wire)
at the debug log level. Below its level a channel drops its events before
they are formatted, since twistd prints every level it is given.
"""

from __future__ import annotations

from twisted.logger import Logger


def _drop(event: dict) -> None:
    pass


def debug_channel(namespace: str, level: int, debug: int) -> Logger:
    """
    A Logger for C{namespace} that emits only when the node's C{debug}
    setting is at least C{level}.
    """
    if debug >= level:
        return Logger(namespace=namespace)
    return Logger(namespace=namespace, observer=_drop)
