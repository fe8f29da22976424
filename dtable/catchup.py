"""
Catch-up between two nodes, in proportion to what changed.

The node behind first asks the peer for the batches it missed, from the
peer's bounded log (bytes proportional to the change). If the log does not
reach back far enough it reconciles: it walks both Merkle trees from the
root, asking only for the nodes whose digests differ, compares the hashes of
differing leaves by their short forms, fetches only the objects it lacks and
drops what the peer's state no longer has (bytes proportional to the
difference times the tree depth, never to the table size). Either way the
result must equal a master-signed root, or nothing changes.

Both sides are here: L{catch_up} for the node behind, given a C{request}
callable that sends a frame and returns a Deferred of the answer (a link's
L{dtable.protocol.PeerProtocol.request}), and the C{serve_*} functions that
build the answers. It knows nothing of sockets.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from dtable import wire
from dtable.canonical import InvalidObjectError, canonical_bytes, hash_bytes
from dtable.replication import BadHead, BatchRejected, Change, Replica
from dtable.table import LEAF_MAX
from dtable.wire import Head, ProtocolViolation

log = Logger(namespace="dtable.replication")

Request = Callable[[Callable[[int], bytes]], Deferred]

_HEX = "0123456789abcdef"
#: Requests a reconciliation keeps in flight at once.
_PARALLEL = 32
#: Walks restarted because the peer moved on, before giving up.
_WALK_ATTEMPTS = 3
#: The largest subtree whose hashes a diff answer lists. A walk asks only
#: for leaves (at most LEAF_MAX hashes); the margin covers a peer that
#: moved on since, and the cap stops anyone from asking for a whole table.
MAX_DIFF_HASHES = 16 * LEAF_MAX
#: The most bytes of objects or batches one answer carries, by default: a
#: peer with the default max_frame reads them. Fetch answers past it carry
#: what fits, and the asker asks again for the rest.
DEFAULT_ANSWER_BYTES = 32 * 1024 * 1024


class PeerMoved(Exception):
    """
    The peer's state changed during a reconciliation walk.
    """


def _short(h: str) -> bytes:
    return bytes.fromhex(h[: 2 * wire.SHORT_HASH])


def _truncated(digest_hex: str) -> bytes:
    return bytes.fromhex(digest_hex)[: wire.DIGEST_BYTES]


# The node behind ---------------------------------------------------------------


async def catch_up(replica: Replica, request: Request, fetch_chunk: int) -> tuple[str, list[Change]]:
    """
    Bring C{replica} up to the peer's state.

    @return: how (C{"log"} or C{"merkle"}) and the changes made, in order.
    @raise dtable.protocol.RequestFailed: if the peer does not answer.
    @raise ProtocolViolation: if the peer's answers break the contract.
    @raise dtable.replication.BatchRejected: if the result would not be a
        master-signed state (nothing changed).
    """
    from dtable.protocol import RequestRefused

    since = replica.head.rev
    try:
        answer = await request(lambda rid: wire.log_request(rid, since))
    except RequestRefused:
        answer = None
    if answer is not None:
        if not isinstance(answer, wire.LogEntries):
            raise ProtocolViolation("answered a log request with something else")
        changes = []
        frames = answer.frames or [None] * len(answer.batches)
        for batch, frame in zip(answer.batches, frames):
            if batch.head.rev <= replica.head.rev:
                continue
            if batch.head.base != replica.head.rev:
                break
            try:
                changes.append(replica.apply_batch(batch, frame))
            except (BadHead, BatchRejected):
                if not changes:
                    raise
                # Report what did apply; the next catch-up starts at the
                # bad batch and fails on it first.
                break
        return "log", changes
    for attempt in range(_WALK_ATTEMPTS):
        try:
            change = await reconcile(replica, request, fetch_chunk)
        except PeerMoved:
            log.debug("peer moved on during reconciliation; walking again")
            continue
        return "merkle", [] if change is None else [change]
    raise PeerMoved("the peer's table kept changing during reconciliation")


async def _bounded(calls: list[Callable[[], Deferred]]) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(calls), _PARALLEL):
        chunk = [call() for call in calls[start:start + _PARALLEL]]
        results.extend(await gatherResults(chunk, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure))
    return results


async def reconcile(replica: Replica, request: Request, fetch_chunk: int) -> Change | None:
    """
    One Merkle walk against the peer's current state, then the install.

    @return: the change, or None if the peer is not ahead after all.
    @raise PeerMoved: if the peer's state changed during the walk.
    """
    table = replica.table
    head: Head | None = None

    def pin(rev: int) -> None:
        if head is not None and rev != head.rev:
            raise PeerMoved(f"peer moved from {head.rev} to {rev}")

    to_add: set[str] = set()
    to_remove: set[str] = set()
    leaves: list[str] = []
    frontier = [""]
    while frontier:
        asked, frontier = frontier[: wire.MAX_PREFIXES], frontier[wire.MAX_PREFIXES:]
        answer = await request(lambda rid, p=asked: wire.tree_request(rid, p))
        if not isinstance(answer, wire.TreeNodes):
            raise ProtocolViolation("answered a tree request with something else")
        if head is None:
            replica.verify(answer.head)
            head = answer.head
            if head.rev <= replica.head.rev:
                return None
        pin(answer.head.rev)
        if [n.prefix for n in answer.nodes] != asked:
            raise ProtocolViolation("tree answer does not match the prefixes asked")
        for node in answer.nodes:
            if _truncated(table.node(node.prefix).digest) == node.digest:
                continue
            if node.children is None:
                leaves.append(node.prefix)
                continue
            if len(node.prefix) >= 63:
                raise ProtocolViolation("tree node below the last hex digit")
            ours = table.children(node.prefix)
            for digit, (digest, count), mine in zip(_HEX, node.children, ours):
                if _truncated(mine.digest) == digest:
                    continue
                child = node.prefix + digit
                if count == 0:
                    to_remove.update(table.leaf_hashes(child))
                elif count <= LEAF_MAX:
                    leaves.append(child)
                else:
                    frontier.append(child)

    def ask_diff(prefix: str) -> Deferred:
        short = sorted(_short(h) for h in table.leaf_hashes(prefix))
        return request(lambda rid: wire.diff_request(rid, prefix, short))

    answers = await _bounded([lambda p=p: ask_diff(p) for p in leaves])
    for prefix, answer in zip(leaves, answers):
        if not isinstance(answer, wire.Diff):
            raise ProtocolViolation("answered a diff request with something else")
        pin(answer.rev)
        by_short = {_short(h): h for h in table.leaf_hashes(prefix)}
        for h in answer.missing:
            if not h.startswith(prefix):
                raise ProtocolViolation("diff names a hash outside its prefix")
            if h not in table:
                to_add.add(h)
        for short in answer.extra:
            if short in by_short:
                to_remove.add(by_short[short])

    fetched = await _fetch(request, sorted(to_add), fetch_chunk)
    if replica.head.rev >= head.rev:
        return None
    return replica.install(head, fetched, to_remove)


async def _fetch(request: Request, wanted: list[str],
                 fetch_chunk: int) -> dict[str, tuple[dict, bytes]]:
    """
    Fetch the objects C{wanted}, in chunks; a peer may answer a chunk with
    part of it (its answers are bounded in bytes), and the rest is asked for
    again until everything arrived.

    @raise PeerMoved: if an answer brought none of what it was asked for
        (the peer dropped those objects since it listed them).
    """
    fetched: dict[str, tuple[dict, bytes]] = {}
    while wanted:
        chunks = [wanted[i:i + fetch_chunk] for i in range(0, len(wanted), fetch_chunk)]
        answers = await _bounded([
            lambda c=c: request(lambda rid: wire.fetch(rid, c)) for c in chunks])
        for chunk, answer in zip(chunks, answers):
            if not isinstance(answer, wire.Objects):
                raise ProtocolViolation("answered a fetch with something else")
            if not answer.objects:
                raise PeerMoved("objects vanished while they were fetched")
            asked = set(chunk)
            for obj, data in zip(answer.objects, _object_data(answer)):
                # An object is known by the hash of the bytes it came as;
                # only what was asked for is kept, and the install checks
                # the result against the signed root.
                h = hash_bytes(data)
                if h not in asked:
                    raise ProtocolViolation("sent an object that was not asked for")
                fetched[h] = (obj, data)
        wanted = [h for h in wanted if h not in fetched]
    return fetched


def _object_data(answer: wire.Objects) -> Iterable[bytes]:
    if answer.data is not None:
        return answer.data
    try:
        return [canonical_bytes(obj) for obj in answer.objects]
    except InvalidObjectError as e:
        raise ProtocolViolation(f"sent an invalid object: {e}")


# The node ahead --------------------------------------------------------------


def serve_log(replica: Replica, request: wire.LogRequest,
              max_bytes: int = DEFAULT_ANSWER_BYTES) -> bytes:
    """
    The batches after C{request.since}, or a refusal if the log does not
    reach back that far or they are more than C{max_bytes}.
    """
    frames = replica.log.since(request.since)
    if frames is None:
        return wire.refusal(request.id, f"revision {request.since} is not in the log")
    if sum(len(frame) for frame in frames) > max_bytes:
        return wire.refusal(request.id, f"the batches since {request.since} are more "
                            f"than {max_bytes} bytes")
    return wire.log_entries(request.id, frames)


def serve_tree(replica: Replica, request: wire.TreeRequest) -> bytes:
    table = replica.table
    nodes = []
    for prefix in request.prefixes:
        node = table.node(prefix)
        children = None
        if node.count > LEAF_MAX and len(prefix) < 63:
            children = [(bytes.fromhex(c.digest), c.count) for c in table.children(prefix)]
        nodes.append(wire.tree_node(prefix, node.count, bytes.fromhex(node.digest), children))
    return wire.tree_nodes(request.id, replica.head, nodes)


def serve_diff(replica: Replica, request: wire.DiffRequest) -> bytes:
    """
    Compare the asker's short hashes under a prefix with ours; refused for
    a prefix that holds more than L{MAX_DIFF_HASHES} of ours.
    """
    count = replica.table.node(request.prefix).count
    if count > MAX_DIFF_HASHES:
        return wire.refusal(request.id, f"prefix {request.prefix!r} holds {count} "
                            f"objects; ask for its subtrees")
    ours = replica.table.leaf_hashes(request.prefix)
    theirs = set(request.have)
    missing = [h for h in ours if _short(h) not in theirs]
    ours_short = {_short(h) for h in ours}
    extra = [s for s in request.have if s not in ours_short]
    return wire.diff(request.id, replica.head.rev, missing, extra)


def serve_fetch(replica: Replica, request: wire.Fetch,
                max_bytes: int = DEFAULT_ANSWER_BYTES) -> bytes:
    """
    The objects asked for that this node holds, in the order asked, as many
    as fit in C{max_bytes} (always at least one).
    """
    data = replica.data(request.hashes)
    answer: list[bytes] = []
    size = 0
    for h in request.hashes:
        item = data.get(h)
        if item is None:
            continue
        if answer and size + len(item) > max_bytes:
            break
        answer.append(item)
        size += len(item)
    return wire.objects(request.id, answer)
