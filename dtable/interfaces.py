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
    bytes of every object, by hash. It is the only place the objects' bytes
    live; the in-memory table keeps just their hashes. Every change moves it
    from one state to the next atomically: after a crash at any moment it
    holds either the whole state before a L{commit} or the whole state after
    it, never a mix.

    A hash is the object's sha256 as 64 lowercase hex digits. A method given
    anything else raises C{ValueError} and changes nothing. The store does
    not check that the bytes hash to their hash, nor that the head's root
    matches the stored hashes: that is its caller's job.

    Every method but L{open} and L{close} raises
    L{dtable.store.StoreClosed} before L{open} or after L{close}. An iterable
    returned by L{hashes} or L{items} must be consumed or dropped before the
    next L{commit} or L{close}; what it yields after one is undefined.
    """

    def open() -> None:
        """
        Make the stored state readable, creating whatever is missing (a new
        store holds revision 0 and no objects). Called once, before anything
        else; a closed store may be opened again.

        @raise dtable.store.StoreError: if the storage cannot be read or was
            not written by a compatible version of dtable.
        """

    def head():
        """
        The stored head, a L{dtable.wire.Head}: revision 0 with the empty
        root (L{dtable.table.EMPTY_ROOT}) for a new store.
        """

    def count() -> int:
        """
        How many objects are stored.
        """

    def hashes():
        """
        An iterable of the hash of every stored object, in no particular
        order. It is streamed: memory does not grow with the number of
        objects beyond the hashes the caller keeps.
        """

    def get(h: str) -> bytes | None:
        """
        The canonical bytes of the object with hash C{h}, or None if it is
        not stored.
        """

    def get_many(hs) -> dict[str, bytes]:
        """
        The canonical bytes of the objects among the hashes C{hs} (any
        iterable) that are stored, as a dict hash -> bytes. Absent hashes are
        left out. Suited to thousands of hashes at a time.
        """

    def items():
        """
        An iterable of (hash, canonical bytes) for every stored object, in no
        particular order, streamed as L{hashes} is.
        """

    def commit(head, adds: list[tuple[str, bytes]], removes: list[str]) -> None:
        """
        Move to C{head} in one atomic step: delete C{removes}, a list of
        hashes, then store C{adds}, a list of (hash, canonical bytes).

        Adding a hash that is already stored keeps the stored bytes, and
        removing a hash that is not stored does nothing; neither is an
        error. A hash both removed and added is stored afterwards. If
        C{commit} raises, the store still holds the previous state, whole.

        @raise ValueError: if a hash is not 64 lowercase hex digits.
        @raise TypeError: if canonical bytes are not C{bytes}.
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
