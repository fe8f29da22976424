"""
The seams of dtable, as zope interfaces: the observer contract, the store and
a peer link. Each docstring is the contract an implementation must keep.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface, implementer


class ITableObserver(Interface):
    """
    Receives a node's events. Each method is called from the reactor thread
    with the table in a consistent state: an observer that reads the table
    sees every change of the batch that caused the event, never half of one.
    An exception raised by an observer is logged and does not affect the node
    or other observers.
    """

    def started() -> None:
        """
        The node has loaded its table and is listening. One object_added for
        every object already in the table follows at once.
        """

    def object_added(obj: dict) -> None:
        """
        C{obj} became part of the table.
        """

    def object_removed(obj: dict) -> None:
        """
        C{obj} left the table.
        """

    def message_received(msg: object) -> None:
        """
        A message sent with send_message by another node arrived; C{msg} is
        the body that node sent.
        """

    def error(error_string: str, origin: str, obj: object) -> None:
        """
        Something went wrong. C{origin} names where (the API call, or the
        peer's node id), C{obj} is what it was about, or None.
        """


@implementer(ITableObserver)
class TableObserver:
    """
    An ITableObserver that does nothing: subclass it and override the events
    you want.
    """

    def started(self) -> None:
        pass

    def object_added(self, obj: dict) -> None:
        pass

    def object_removed(self, obj: dict) -> None:
        pass

    def message_received(self, msg: object) -> None:
        pass

    def error(self, error_string: str, origin: str, obj: object) -> None:
        pass


class IStore(Interface):
    """
    Durable storage of a node's table and its head.

    A store holds one state: a head (a L{dtable.wire.Head}) and the canonical
    bytes of every object, by hash. Every change moves it from one state to
    the next atomically: after a crash it holds either the state before a
    call or the state after it, never a mix. Nothing is written before
    open() or after close().
    """

    def open() -> None:
        """
        Make the stored state readable. Called once, before anything else.
        """

    def head():
        """
        The stored head; revision 0 with the empty root for a new store.
        """

    def items():
        """
        An iterable of (hash, canonical bytes) for every stored object.
        """

    def commit(head, adds, removes) -> None:
        """
        Move to C{head}: store C{adds}, a list of (hash, canonical bytes),
        and delete C{removes}, a list of hashes, in one atomic step.
        """

    def close() -> None:
        """
        Release the storage. Idempotent.
        """


class IPeerLink(Interface):
    """
    One live connection to another node, after both hellos were accepted.
    """

    node_id = Attribute("The peer's node id, proven by its certificate.")
    hello = Attribute("The peer's accepted hello (a dtable.wire.Hello).")
    outbound = Attribute("True if this node dialled the link.")

    def send_frame(frame: bytes) -> None:
        """
        Queue C{frame} (a payload without its length prefix) for the peer.
        """

    def request(frame_builder):
        """
        Send C{frame_builder(request_id)} and return a Deferred that fires
        with the peer's response, or fails with L{dtable.protocol.RequestFailed}
        on timeout or when the link is lost.
        """

    def close(reason: str) -> None:
        """
        Close the link, logging C{reason}.
        """
