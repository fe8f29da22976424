"""
The table: the set of object hashes a node holds, and the Merkle root of
that set.

This layer owns which objects (by hash) a node holds, and the digest that
proves two nodes hold the same set: a Merkle root that depends on the set of
hashes alone, kept up to date incrementally, with the per-node
view (L{Table.node}, L{Table.children}, L{Table.leaf_hashes}) that lets two
nodes find where their sets differ by walking both trees from the root.

It knows nothing of sockets, time, revisions, signatures, storage or events;
the objects' bytes live in the node's store (L{dtable.interfaces.IStore}).

The tree
========

The tree is a trie over the hex digits of the hashes. The node for a hex
prefix C{p} stands for every hash that starts with C{p}:

  - if it holds at most L{LEAF_MAX} hashes it is a I{leaf}, with digest
    C{sha256(b"L" + the raw 32-byte hashes, sorted, concatenated)};
  - otherwise it is I{internal}, with 16 children C{p + "0"} ... C{p + "f"}
    and digest C{sha256(b"N" + the 16 children's digests, in order)}.

An empty child is an empty leaf, digest C{sha256(b"L")}, which is also the
root of the empty table. The one-byte prefixes keep a leaf's hash list and
an internal node's child list from ever being read as each other.

Because whether a node is a leaf depends only on how many hashes share its
prefix, the shape of the tree, and so the root, is a function of the set:
insertion order and history do not matter. The table keeps that true as it
changes: a leaf that grows past L{LEAF_MAX} splits, and an internal node
whose count falls back to L{LEAF_MAX} collapses into a leaf.

Adding or removing a hash walks one path from the root, updates counts and
marks the digests on the path stale; L{Table.root} recomputes only stale
digests. L{root_of} computes the same root from a list of hashes.

Hashes are hex text everywhere outside this module; inside, a leaf keeps
its hashes' 32 raw bytes each, sorted and concatenated in one bytes object:
32 bytes of memory per hash (a bytes object each, in a list and a set, took
about 100), a leaf's digest is taken over it as it is, and the cyclic
garbage collector, which walks every list and set it tracks, has nothing
per hash to walk. A hash is found by walking its path and searching its
leaf.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple


__all__ = [
    "EMPTY_ROOT",
    "LEAF_MAX",
    "ChildSummary",
    "NodeKind",
    "NodeSummary",
    "Table",
    "root_of",
]

LEAF_MAX = 64
"""The most hashes a leaf holds; a node with more is internal."""

_LEAF_MAX_BYTES = LEAF_MAX * 32

_HEX_DIGITS = "0123456789abcdef"
_NIBBLE = {digit: value for value, digit in enumerate(_HEX_DIGITS)}
_MAX_PREFIX = 64
_PREFIX_RE = re.compile(r"[0-9a-f]{0,64}")


_unhexlify = binascii.unhexlify

_EMPTY_DIGEST = hashlib.sha256(b"L").digest()

EMPTY_ROOT = _EMPTY_DIGEST.hex()
"""The root of the empty table (the digest of an empty leaf)."""

NodeKind = Literal["leaf", "internal", "empty"]


class NodeSummary(NamedTuple):
    """
    What L{Table.node} says about one prefix.

    @ivar kind: C{"internal"}, C{"leaf"} (one to L{LEAF_MAX} hashes) or
        C{"empty"} (no hashes; the digest is L{EMPTY_ROOT}).
    @ivar digest: the node's digest, in hex.
    @ivar count: how many hashes start with the prefix.
    """

    kind: NodeKind
    digest: str
    count: int


class ChildSummary(NamedTuple):
    """
    One of the 16 entries L{Table.children} returns.

    @ivar prefix: the child's prefix (the parent's plus one hex digit).
    @ivar digest: the child's digest, in hex.
    @ivar count: how many hashes start with the child's prefix.
    """

    prefix: str
    digest: str
    count: int


class _Node:
    """
    One node of the trie, changed in place between leaf and internal.

    @ivar hashes: a leaf's hashes (raw), sorted and concatenated; C{None}
        for an internal node.
    @ivar children: an internal node's 16 children in digit order; C{None}
        for a leaf.
    @ivar count: an internal node's number of hashes (a leaf's is
        C{len(hashes) // 32}).
    @ivar digest: the raw digest, or C{None} while it is stale.
    """

    __slots__ = ("hashes", "children", "count", "digest")

    def __init__(self, hashes: bytes) -> None:
        self.hashes: bytes | None = hashes
        self.children: list[_Node] | None = None
        self.count = 0
        self.digest: bytes | None = None


def _leaf_digest(hashes: list[bytes]) -> bytes:
    """
    The digest of a leaf holding C{hashes} (sorted, raw).
    """
    if not hashes:
        return _EMPTY_DIGEST
    return hashlib.sha256(b"L" + b"".join(hashes)).digest()


def _records(blob: bytes) -> list[bytes]:
    """
    The raw hashes of a leaf's C{blob}, in order.
    """
    return [blob[i:i + 32] for i in range(0, len(blob), 32)]


def _position(blob: bytes, h: bytes) -> int:
    """
    Where the raw hash C{h} is, or would go, in a leaf's C{blob}: the index
    of the first hash there that is not less than C{h}.
    """
    lo, hi = 0, len(blob) >> 5
    while lo < hi:
        mid = (lo + hi) >> 1
        if blob[mid << 5:(mid << 5) + 32] < h:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _held(leaf: _Node, h: bytes) -> tuple[int, bool]:
    """
    Where the raw hash C{h} is, or would go, in C{leaf}'s bytes (an
    offset), and whether it is there.
    """
    blob = leaf.hashes
    assert blob is not None
    at = _position(blob, h) << 5
    return at, blob[at:at + 32] == h


def _nibble(h: bytes, depth: int) -> int:
    """
    The hex digit of raw hash C{h} at C{depth}, as a number.
    """
    byte = h[depth >> 1]
    return byte & 15 if depth & 1 else byte >> 4


def _raw(h: object) -> bytes | None:
    """
    The raw form of C{h} if it is a hash as dtable writes it (64 lowercase
    hex digits), else None.
    """
    if type(h) is not str or len(h) != 64:
        return None
    try:
        raw = _unhexlify(h)
    except ValueError:
        return None
    # unhexlify also takes upper case; a hash is written one way.
    return raw if raw.hex() == h else None


def _raws(hashes: Iterable[str]) -> list[bytes]:
    """
    The raw forms of C{hashes}.

    @raise ValueError: naming the first that is not a hash as L{_raw} takes.
    """
    raw = []
    for h in hashes:
        r = _raw(h)
        if r is None:
            raise ValueError(f"not a hash: {h!r}")
        raw.append(r)
    return raw


def _lowest(prefix: str) -> bytes:
    """
    The smallest raw hash that starts with the hex C{prefix}.
    """
    return bytes.fromhex(prefix.ljust(64, "0"))


def _highest(prefix: str) -> bytes:
    """
    The largest raw hash that starts with the hex C{prefix}.
    """
    return bytes.fromhex(prefix.ljust(64, "f"))


def _digest(node: _Node) -> bytes:
    """
    The digest of C{node}, recomputing whatever is stale beneath it.
    """
    digest = node.digest
    if digest is None:
        children = node.children
        if children is None:
            blob = node.hashes
            assert blob is not None
            digest = hashlib.sha256(b"L" + blob).digest() if blob else _EMPTY_DIGEST
        else:
            # Most children of a stale node are not stale themselves: their
            # digest is read without a call.
            digest = hashlib.sha256(
                b"N" + b"".join([child.digest or _digest(child) for child in children])
            ).digest()
        node.digest = digest
    return digest


def _count(node: _Node) -> int:
    hashes = node.hashes
    return node.count if hashes is None else len(hashes) >> 5


def _collect(node: _Node, into: list[bytes]) -> None:
    """
    Append every hash under C{node} to C{into}, in sorted order.
    """
    if node.hashes is not None:
        into.extend(_records(node.hashes))
        return
    assert node.children is not None
    for child in node.children:
        _collect(child, into)


def _collect_after(node: _Node, depth: int, start: str, first_after: bytes, limit: int,
                   into: list[bytes]) -> None:
    """
    Append to C{into}, in sorted order, the hashes under C{node} (at
    C{depth} hex digits, on the path of C{start}) that sort after C{start},
    that is from C{first_after} on, until C{into} holds C{limit}.
    """
    if node.hashes is not None:
        begin = _position(node.hashes, first_after[:32])
        if first_after[32:] and node.hashes[begin << 5:(begin << 5) + 32] == first_after[:32]:
            begin += 1
        into.extend(_records(node.hashes[begin << 5:(begin + limit - len(into)) << 5]))
        return
    assert node.children is not None
    # Children before start's digit hold nothing after start; its own child
    # is searched further; every later child is after start as a whole.
    first = _NIBBLE[start[depth]] if depth < len(start) else -1
    for digit, child in enumerate(node.children):
        if len(into) >= limit:
            return
        if digit < first:
            continue
        if digit == first:
            _collect_after(child, depth + 1, start, first_after, limit, into)
        else:
            _collect_after(child, depth + 1, "", b"", limit, into)


def _split(node: _Node, depth: int) -> None:
    """
    Turn the overfull leaf C{node}, at C{depth} hex digits, into an internal
    node, splitting any child that is itself overfull.
    """
    blob = node.hashes
    assert blob is not None
    buckets: list[list[bytes]] = [[] for _ in _HEX_DIGITS]
    for h in _records(blob):  # sorted, so each bucket comes out sorted
        buckets[_nibble(h, depth)].append(h)
    children = [_Node(b"".join(bucket)) for bucket in buckets]
    node.hashes = None
    node.children = children
    node.count = len(blob) >> 5
    node.digest = None
    for child in children:
        assert child.hashes is not None
        if len(child.hashes) > _LEAF_MAX_BYTES:
            _split(child, depth + 1)


def _build(hashes: list[bytes], lo: int, hi: int, prefix: str) -> _Node:
    """
    The node for hex C{prefix} over the raw hashes C{hashes[lo:hi]}, which
    are sorted, distinct and all start with C{prefix}.
    """
    if hi - lo <= LEAF_MAX:
        return _Node(b"".join(hashes[lo:hi]))
    children = []
    start = lo
    for digit in _HEX_DIGITS:
        end = hi if digit == "f" else bisect_left(
            hashes, _lowest(prefix + _HEX_DIGITS[_NIBBLE[digit] + 1]), start, hi)
        children.append(_build(hashes, start, end, prefix + digit))
        start = end
    node = _Node(b"")
    node.hashes = None
    node.children = children
    node.count = hi - lo
    return node


def _check_prefix(prefix: str) -> None:
    if not (isinstance(prefix, str) and _PREFIX_RE.fullmatch(prefix)):
        raise ValueError(
            f"a prefix is at most {_MAX_PREFIX} lowercase hex digits, not {prefix!r}"
        )


def _subtree_digest(hashes: list[bytes], lo: int, hi: int, depth: int) -> bytes:
    """
    The digest of the node for the raw hashes C{hashes[lo:hi]}, which are
    sorted, distinct and share their first C{depth} hex digits.
    """
    if hi - lo <= LEAF_MAX:
        return _leaf_digest(hashes[lo:hi])
    parts = [b"N"]
    start = lo
    for digit in range(16):
        end = start
        while end < hi and _nibble(hashes[end], depth) == digit:
            end += 1
        parts.append(_subtree_digest(hashes, start, end, depth + 1))
        start = end
    return hashlib.sha256(b"".join(parts)).digest()


def root_of(hashes: Iterable[str]) -> str:
    """
    The Merkle root of a set of hashes, computed from scratch.

    This is the root a L{Table} holding exactly those hashes reports.

    @param hashes: hashes in any order; repeats count once.
    @return: the root, in hex.
    @raise ValueError: if one of them is not 64 lowercase hex digits.
    """
    raw = sorted(set(_raws(hashes)))
    return _subtree_digest(raw, 0, len(raw), 0).hex()


class Table:
    """
    A set of object hashes with an incrementally maintained Merkle root.

    The table holds hashes only: the objects' bytes live in the node's store
    (L{dtable.interfaces.IStore}), so memory per object is a hash and its
    place in the trie. It does not re-derive hashes: the caller passes hashes
    made by L{dtable.canonical}. Iteration order is unspecified; L{hashes}
    returns hash order.
    """

    def __init__(self) -> None:
        self._root = _Node(b"")

    # -- the set --------------------------------------------------------

    def __len__(self) -> int:
        return _count(self._root)

    def __contains__(self, h: object) -> bool:
        raw = _raw(h)
        return raw is not None and _held(self._leaf_of(raw)[0], raw)[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.hashes())

    def hashes(self) -> list[str]:
        """
        Every hash in the table, sorted.
        """
        into: list[bytes] = []
        _collect(self._root, into)
        return [h.hex() for h in into]

    def page(self, after: str = "", limit: int = 1000) -> list[str]:
        """
        Hashes in sorted order, a page at a time.

        @param after: the last hash of the previous page; C{""} for the
            first page. Any string of hex digits works: the page starts at
            the first hash that sorts after it.
        @param limit: the most hashes to return.

        @return: up to C{limit} sorted hashes that sort after C{after}.
        @raise ValueError: if C{after} is not at most 64 lowercase hex digits.
        """
        _check_prefix(after)
        into: list[bytes] = []
        if limit > 0:
            # A hash sorts after a shorter string when it starts with
            # anything from that string on; after a whole hash, only after.
            # (A 32-byte hash equal to the bound's first 32 bytes sorts
            # before the 33-byte bound.)
            first_after = _lowest(after) + (b"\x00" if len(after) == 64 else b"")
            _collect_after(self._root, 0, after, first_after, limit, into)
        return [h.hex() for h in into]

    def add(self, h: str) -> bool:
        """
        Add a hash.

        @return: C{True} if it was added, C{False} if the table already held
            C{h} (nothing changes).
        @raise ValueError: if C{h} is not 64 lowercase hex digits.
        """
        raw = _raw(h)
        if raw is None:
            raise ValueError(f"not a hash: {h!r}")
        return self._insert(raw)

    def remove(self, h: str) -> bool:
        """
        Remove a hash.

        @return: C{True} if it was removed, C{False} if the table did not
            hold C{h} (nothing changes).
        """
        raw = _raw(h)
        return raw is not None and self._discard(raw)

    def apply(self, adds: Iterable[str], removes: Iterable[str]) -> tuple[list[str], list[str]]:
        """
        Apply a change: first every remove, then every add.

        All hashes to add are checked before anything changes, so an invalid
        one leaves the table as it was.

        @return: C{(added, removed)}: the hashes actually added and those
            actually removed, in the order given; adds of hashes already
            held and removes of absent ones are left out. A hash both removed
            and added again appears in both.
        @raise ValueError: if a hash to add is not 64 lowercase hex digits.
        """
        to_add = []
        for h in adds:
            raw = _raw(h)
            if raw is None:
                raise ValueError(f"not a hash: {h!r}")
            to_add.append((h, raw))
        removed = [h for h in removes if self.remove(h)]
        insert = self._insert
        added = [h for h, raw in to_add if insert(raw)]
        return added, removed

    def clear(self) -> None:
        """
        Remove every hash.
        """
        self._root = _Node(b"")

    def load(self, hashes: Iterable[str]) -> None:
        """
        Hold exactly C{hashes} (repeats count once) instead of what the
        table held: the tree is built at once from the sorted hashes, which
        is how a node reads its stored hashes at start, several times
        faster than adding them one by one.

        @raise ValueError: if one of them is not 64 lowercase hex digits;
            the table is then unchanged.
        """
        ordered = sorted(set(_raws(hashes)))
        self._root = _build(ordered, 0, len(ordered), "")

    # -- the tree -------------------------------------------------------

    def root(self) -> str:
        """
        The Merkle root of the set of hashes, in hex; L{EMPTY_ROOT} when the
        table is empty.
        """
        return _digest(self._root).hex()

    def node(self, prefix: str) -> NodeSummary:
        """
        Describe the node for C{prefix}.

        For a prefix that is a node of the tree this is that node. For a
        longer prefix, under a leaf, it is the leaf those hashes would form
        (computed on demand), which is the node a table holding the same
        hashes under that prefix in a deeper tree would have; so two tables
        can compare any prefix, whatever their shapes.

        @param prefix: up to 64 lowercase hex digits; C{""} is the root.
        @raise ValueError: if C{prefix} is not that.
        """
        _check_prefix(prefix)
        node, depth = self._find(prefix)
        if depth == len(prefix):
            if node.children is not None:
                return NodeSummary("internal", _digest(node).hex(), node.count)
            assert node.hashes is not None
            hashes = _records(node.hashes)
        else:
            hashes = self._leaf_range(node, prefix)
        assert hashes is not None
        if not hashes:
            return NodeSummary("empty", EMPTY_ROOT, 0)
        digest = _digest(node) if depth == len(prefix) else _leaf_digest(hashes)
        return NodeSummary("leaf", digest.hex(), len(hashes))

    def children(self, prefix: str) -> list[ChildSummary]:
        """
        Describe the 16 children of the node for C{prefix}.

        For an internal node these are its children. For a leaf, an empty
        node or a prefix under a leaf, they are what L{node} says of each
        one-digit-longer prefix, computed on demand.

        @param prefix: up to 63 lowercase hex digits.
        @return: 16 entries, in digit order.
        @raise ValueError: if C{prefix} is not that.
        """
        _check_prefix(prefix)
        if len(prefix) == _MAX_PREFIX:
            raise ValueError("a full hash has no children")
        node, depth = self._find(prefix)
        if depth == len(prefix) and node.children is not None:
            return [
                ChildSummary(prefix + digit, _digest(child).hex(), _count(child))
                for digit, child in zip(_HEX_DIGITS, node.children)
            ]
        hashes = self._leaf_range(node, prefix)
        result: list[ChildSummary] = []
        start = 0
        for digit in _HEX_DIGITS:
            end = bisect_right(hashes, _highest(prefix + digit), start)
            group = hashes[start:end]
            result.append(
                ChildSummary(prefix + digit, _leaf_digest(group).hex(), len(group))
            )
            start = end
        return result

    def leaf_hashes(self, prefix: str) -> list[str]:
        """
        The hashes that start with C{prefix}, sorted.

        @param prefix: up to 64 lowercase hex digits.
        @raise ValueError: if C{prefix} is not that.
        """
        _check_prefix(prefix)
        node, depth = self._find(prefix)
        if depth < len(prefix):
            return [h.hex() for h in self._leaf_range(node, prefix)]
        into: list[bytes] = []
        _collect(node, into)
        return [h.hex() for h in into]

    # -- keeping the tree -----------------------------------------------

    def _find(self, prefix: str) -> tuple[_Node, int]:
        """
        The deepest node on the path to C{prefix}, and its depth: the node
        for C{prefix} itself, or the leaf above it.
        """
        node = self._root
        depth = 0
        while depth < len(prefix):
            children = node.children
            if children is None:
                break
            node = children[_NIBBLE[prefix[depth]]]
            depth += 1
        return node, depth

    @staticmethod
    def _leaf_range(leaf: _Node, prefix: str) -> list[bytes]:
        """
        The hashes of C{leaf} that start with C{prefix}.
        """
        assert leaf.hashes is not None
        hashes = _records(leaf.hashes)
        start = bisect_left(hashes, _lowest(prefix))
        end = bisect_right(hashes, _highest(prefix), start)
        return hashes[start:end]

    def _leaf_of(self, h: bytes) -> tuple[_Node, int, list[_Node]]:
        """
        The leaf on the path of raw hash C{h}, its depth, and the internal
        nodes above it from the root down.
        """
        node = self._root
        depth = 0
        path = []
        children = node.children
        while children is not None:
            path.append(node)
            byte = h[depth >> 1]
            node = children[byte & 15 if depth & 1 else byte >> 4]
            children = node.children
            depth += 1
        return node, depth, path

    def _insert(self, h: bytes) -> bool:
        """
        Put the raw hash C{h} into the tree, unless it is there.

        @return: whether it was added.
        """
        leaf, depth, path = self._leaf_of(h)
        at, held = _held(leaf, h)
        if held:
            return False
        for node in path:
            node.count += 1
            node.digest = None
        blob = leaf.hashes
        assert blob is not None
        blob = blob[:at] + h + blob[at:]
        leaf.hashes = blob
        leaf.digest = None
        if len(blob) > _LEAF_MAX_BYTES:
            _split(leaf, depth)
        return True

    def _discard(self, h: bytes) -> bool:
        """
        Take the raw hash C{h} out of the tree, if it is there.

        @return: whether it was removed.
        """
        leaf, _, path = self._leaf_of(h)
        at, held = _held(leaf, h)
        if not held:
            return False
        blob = leaf.hashes
        assert blob is not None
        leaf.hashes = blob[:at] + blob[at + 32:]
        leaf.digest = None
        collapse = None
        for node in path:
            node.count -= 1
            node.digest = None
            if collapse is None and node.count <= LEAF_MAX:
                collapse = node
        if collapse is not None:
            # The highest node on the path that fell to LEAF_MAX: it and
            # everything under it become one leaf.
            hashes: list[bytes] = []
            _collect(collapse, hashes)
            collapse.children = None
            collapse.hashes = b"".join(hashes)
            collapse.count = 0
        return True
