"""
The wire: frame payloads and their schemas.

A frame is a 4-byte big-endian length (the framing is
twisted.protocols.basic.Int32StringReceiver's) followed by a UTF-8 JSON object
with a "type". This module turns payload bytes into validated message values
and back. Every message is checked against its schema before anyone acts on
it: unknown types, unknown or missing fields and values of the wrong type or
size raise L{ProtocolViolation}, which the connection turns into one logged
close. It knows nothing of sockets or of what a message means to the node.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from typing import Any, Callable, Iterable, Union

import attrs

from dtable.canonical import MAX_DEPTH

#: What the hello says; peers must speak the same. Version 2 added the
#: msgs frame (messages sent together), which a version 1 node would take
#: for a violation.
PROTOCOL_VERSION = 2

ROLES = ("link", "probe", "defrag")

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")
_NODE_ID = re.compile(r"\A[0-9a-f]{32}\Z")
_MESSAGE_ID = re.compile(r"\A[0-9A-Za-z_.:-]{1,64}\Z")
_MAX_INT = 2**63 - 1
_MAX_LIST = 1_000_000

_dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_loads = _DECODER.decode
_scan_once = _DECODER.scan_once
_scan_string = json.decoder.scanstring
_skip_space = re.compile(r"[ \t\n\r]*").match
#: What _skip_space skips, one character at a time ("" at the end of the
#: text is not in it).
_SPACE = frozenset(" \t\n\r")


class ProtocolViolation(Exception):
    """
    A peer broke the wire contract. C{reason} says how, for the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class Head:
    """
    A node's position in the master's history: the signed state it holds.

    Revision 0 is the empty table before the master published anything; it
    carries no signature.
    """

    rev: int
    base: int
    root: str
    sig: str = ""
    master: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "rev": self.rev,
            "base": self.base,
            "root": self.root,
            "sig": self.sig,
            "master": self.master,
        }


@attrs.frozen
class Hello:
    version: int
    node_id: str
    port: int
    role: str
    master: bool
    head: Head


@attrs.frozen
class Ping:
    id: int


@attrs.frozen
class Pong:
    id: int


@attrs.frozen
class Batch:
    """
    One signed step of the master's history: removes, then adds, turn the
    state at revision C{head.base} into the state at C{head.rev}.
    """

    head: Head
    adds: tuple[dict, ...]
    removes: tuple[str, ...]
    #: The adds as the bytes they arrived in (None for a batch built in
    #: this process); a batch is hashed over these, and not encoded again.
    add_data: tuple[bytes, ...] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class HeadAnnouncement:
    head: Head


@attrs.frozen
class Message:
    id: str
    origin: str
    body: Any


@attrs.frozen
class Messages:
    """
    Messages one node sent together, flooded as one frame under one id:
    each body is delivered as its own message, in order.
    """

    id: str
    origin: str
    bodies: tuple[Any, ...]


@attrs.frozen
class Fetch:
    id: int
    hashes: tuple[str, ...]


@attrs.frozen
class Objects:
    id: int
    objects: tuple[dict, ...]
    #: The objects as the bytes they arrived in (see L{Batch.add_data}).
    data: tuple[bytes, ...] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Refusal:
    id: int
    reason: str


@attrs.frozen
class NodeAddress:
    node_id: str
    host: str
    port: int


@attrs.frozen
class Nodes:
    """
    Nodes the sender knows of, for discovery: id, IP address, listening port.
    """

    nodes: tuple[NodeAddress, ...]


@attrs.frozen
class Beacon:
    """
    Flooded by every node now and then, so that each node knows which nodes
    share its component of the overlay, and what the overlay looks like:
    the origin's role, revision and links (peer node id and mean RTT in
    milliseconds, None before the first measurement).
    """

    id: str
    origin: str
    master: bool = False
    rev: int = 0
    links: tuple[tuple[str, float | None], ...] = ()


@attrs.frozen
class LogRequest:
    """
    Ask for the batches after revision C{since}, from the peer's log.
    """

    id: int
    since: int


@attrs.frozen
class LogEntries:
    id: int
    batches: tuple[Batch, ...]
    #: Each batch's frame, as it arrived.
    frames: tuple[bytes, ...] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class TreeRequest:
    """
    Ask for the Merkle nodes at C{prefixes}.
    """

    id: int
    prefixes: tuple[str, ...]


@attrs.frozen
class TreeNode:
    """
    One node of a peer's tree: its hash count, its digest and, for a node
    above the leaves, its 16 children's digests and counts.
    """

    prefix: str
    count: int
    digest: bytes
    children: tuple[tuple[bytes, int], ...] | None


@attrs.frozen
class TreeNodes:
    id: int
    head: Head
    nodes: tuple[TreeNode, ...]


@attrs.frozen
class DiffRequest:
    """
    Compare the hashes under C{prefix}: C{have} are the short forms
    (L{SHORT_HASH} bytes) of the asker's hashes there.
    """

    id: int
    prefix: str
    have: tuple[bytes, ...]


@attrs.frozen
class Diff:
    """
    The answer to a L{DiffRequest}: the full hashes the asker lacks, and the
    short forms the asker has that the peer does not.
    """

    id: int
    rev: int
    missing: tuple[str, ...]
    extra: tuple[bytes, ...]


Response = Union[Pong, Objects, Refusal, LogEntries, TreeNodes, Diff]
WireMessage = Union[
    Hello, Ping, Pong, Batch, HeadAnnouncement, Message, Messages, Nodes, Beacon, Fetch, Objects, Refusal, LogRequest, LogEntries, TreeRequest, TreeNodes,
    DiffRequest, Diff,
]

#: Bytes of a hash's short form in a diff; tree digests are truncated to
#: DIGEST_BYTES. Both only steer the walk: the result is checked against the
#: master-signed root.
SHORT_HASH = 8
DIGEST_BYTES = 16
MAX_PREFIXES = 4096
MAX_NODES = 256
#: The deepest nesting of arrays and objects in a frame: a table object's
#: limit plus a log answer's own levels (frame, batches, batch, adds). The
#: JSON decoder's own limit depends on how deep the caller's stack is, so a
#: frame one node accepts and relays could get the relay dropped by the next.
MAX_NESTING = MAX_DEPTH + 4
#: Objects one fetch may ask for.
MAX_FETCH = 10_000
#: Bodies one C{msgs} frame may carry, and the bytes of bodies a sender puts
#: in one: small enough that a receiver delivers a frame's messages in a
#: few milliseconds of one turn.
MAX_BUNDLE = 1024
BUNDLE_BYTES = 64 * 1024
_PREFIX = re.compile(r"\A[0-9a-f]{0,63}\Z")


# Field checks --------------------------------------------------------------


def _fields(payload: dict[str, Any], kind: str, names: set[str]) -> None:
    keys = set(payload)
    keys.discard("type")
    if keys != names:
        missing = sorted(names - keys)
        extra = sorted(keys - names)
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unknown " + ", ".join(extra))
        raise ProtocolViolation(f"{kind}: " + "; ".join(parts))


def _int(value: Any, name: str, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolViolation(f"{name} must be an integer in [{low}, {high}]")
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise ProtocolViolation(f"{name} must be true or false")
    return value


def _match(value: Any, pattern: re.Pattern[str], name: str) -> str:
    if type(value) is not str or not pattern.match(value):
        raise ProtocolViolation(f"{name} is malformed")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if (type(value) is not list and type(value) is not _Spanned) or len(value) > _MAX_LIST:
        raise ProtocolViolation(f"{name} must be a list of at most {_MAX_LIST}")
    return value


def _hashes(value: Any, name: str) -> tuple[str, ...]:
    return tuple(_match(h, _HEX64, name) for h in _list(value, name))


def _objects(value: Any, name: str) -> tuple[dict, ...]:
    items = _list(value, name)
    for item in items:
        if type(item) is not dict:
            raise ProtocolViolation(f"{name} must hold JSON objects")
    raw = _raw(items) or ()
    brace, bracket = (b"{", b"[") if raw and type(raw[0]) is bytes else ("{", "[")
    for item, text in zip(items, raw):
        # openers_over, with its common case inline: a call per object made
        # a batch of 1,000 small objects decode 13% slower.
        if len(text) < _FIND_FROM:
            deep = text.count(brace) + text.count(bracket) > MAX_DEPTH  # type: ignore[arg-type]
        else:
            deep = openers_over(text, 0, len(text), MAX_DEPTH)
        if deep and nested_deeper_than(item, MAX_DEPTH):
            raise ProtocolViolation(f"{name} holds an object nested deeper than "
                                    f"{MAX_DEPTH} levels")
    return tuple(items)


def _raw(items: list[Any]) -> list[str | bytes] | None:
    """
    The texts the items of a list arrived as, if it was parsed from a frame:
    the frame's own bytes when it is ASCII, else its decoded text.
    """
    return items.raw if type(items) is _Spanned else None


def _raw_bytes(items: list[Any]) -> tuple[bytes, ...] | None:
    raw = _raw(items)
    if raw is None:
        return None
    if not raw or type(raw[0]) is bytes:
        return tuple(raw)  # type: ignore[arg-type]
    return tuple(text.encode("utf-8") for text in raw)  # type: ignore[union-attr]


def parse_head(value: Any) -> Head:
    if type(value) is not dict:
        raise ProtocolViolation("head must be an object")
    _fields(value, "head", {"rev", "base", "root", "sig", "master"})
    rev = _int(value["rev"], "head.rev")
    base = _int(value["base"], "head.base")
    root = _match(value["root"], _HEX64, "head.root")
    if rev == 0:
        if base != 0 or value["sig"] != "" or value["master"] != "":
            raise ProtocolViolation("head at revision 0 carries no signature")
        return Head(rev=0, base=0, root=root)
    if base >= rev:
        raise ProtocolViolation("head.base must be below head.rev")
    sig = _match(value["sig"], _HEX128, "head.sig")
    master = _match(value["master"], _HEX64, "head.master")
    return Head(rev=rev, base=base, root=root, sig=sig, master=master)


def _hello(p: dict[str, Any]) -> Hello:
    _fields(p, "hello", {"version", "node_id", "port", "role", "master", "head"})
    version = _int(p["version"], "version", 1, 1_000_000)
    if version != PROTOCOL_VERSION:
        raise ProtocolViolation(
            f"protocol version {version} is not supported (this node speaks "
            f"{PROTOCOL_VERSION})"
        )
    role = p["role"]
    if role not in ROLES:
        raise ProtocolViolation(f"role must be one of {', '.join(ROLES)}")
    return Hello(
        version=version,
        node_id=_match(p["node_id"], _NODE_ID, "node_id"),
        port=_int(p["port"], "port", 0, 65535),
        role=role,
        master=_bool(p["master"], "master"),
        head=parse_head(p["head"]),
    )


def _ping(p: dict[str, Any]) -> Ping:
    _fields(p, "ping", {"id"})
    return Ping(id=_int(p["id"], "id"))


def _pong(p: dict[str, Any]) -> Pong:
    _fields(p, "pong", {"id"})
    return Pong(id=_int(p["id"], "id"))


def _batch(p: dict[str, Any]) -> Batch:
    _fields(p, "batch", {"head", "add", "remove"})
    head = parse_head(p["head"])
    if head.rev == 0:
        raise ProtocolViolation("a batch cannot be at revision 0")
    return Batch(
        head=head,
        adds=_objects(p["add"], "add"),
        removes=_hashes(p["remove"], "remove"),
        add_data=_raw_bytes(p["add"]),
    )


def _head(p: dict[str, Any]) -> HeadAnnouncement:
    _fields(p, "head", {"head"})
    return HeadAnnouncement(head=parse_head(p["head"]))


def _message(p: dict[str, Any]) -> Message:
    _fields(p, "msg", {"id", "origin", "body"})
    return Message(
        id=_match(p["id"], _MESSAGE_ID, "id"),
        origin=_match(p["origin"], _NODE_ID, "origin"),
        body=p["body"],
    )


def _messages(p: dict[str, Any]) -> Messages:
    _fields(p, "msgs", {"id", "origin", "bodies"})
    bodies = p["bodies"]
    if type(bodies) is not list or not 2 <= len(bodies) <= MAX_BUNDLE:
        raise ProtocolViolation(f"bodies must be a list of 2 to {MAX_BUNDLE} messages")
    return Messages(
        id=_match(p["id"], _MESSAGE_ID, "id"),
        origin=_match(p["origin"], _NODE_ID, "origin"),
        bodies=tuple(bodies),
    )


def _fetch(p: dict[str, Any]) -> Fetch:
    _fields(p, "fetch", {"id", "hashes"})
    hashes = _hashes(p["hashes"], "hashes")
    if len(hashes) > MAX_FETCH:
        raise ProtocolViolation(f"at most {MAX_FETCH} hashes per fetch")
    return Fetch(id=_int(p["id"], "id"), hashes=hashes)


def _objects_message(p: dict[str, Any]) -> Objects:
    _fields(p, "objects", {"id", "objects"})
    return Objects(id=_int(p["id"], "id"), objects=_objects(p["objects"], "objects"),
                   data=_raw_bytes(p["objects"]))


def _refusal(p: dict[str, Any]) -> Refusal:
    _fields(p, "refused", {"id", "reason"})
    reason = p["reason"]
    if type(reason) is not str or len(reason) > 1000:
        raise ProtocolViolation("reason must be a short string")
    return Refusal(id=_int(p["id"], "id"), reason=reason)


def _packed(value: Any, name: str, width: int) -> tuple[bytes, ...]:
    if type(value) is not str or len(value) > 4 * _MAX_LIST:
        raise ProtocolViolation(f"{name} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ProtocolViolation(f"{name} is not base64") from None
    if len(raw) % width:
        raise ProtocolViolation(f"{name} is not a whole number of {width}-byte items")
    return tuple(raw[i:i + width] for i in range(0, len(raw), width))


def pack(items: Iterable[bytes]) -> str:
    return base64.b64encode(b"".join(items)).decode("ascii")


def _prefix(value: Any, name: str) -> str:
    return _match(value, _PREFIX, name)


def parse_batch(value: Any) -> Batch:
    """
    Validate a batch given as a parsed JSON object (inside a log answer).
    """
    if type(value) is not dict or value.get("type") != "batch":
        raise ProtocolViolation("log entries must be batches")
    return _batch(value)


def _node_address(value: Any) -> NodeAddress:
    if type(value) is not list or len(value) != 3:
        raise ProtocolViolation("a node is [node_id, host, port]")
    node_id, host, port = value
    if type(host) is not str or len(host) > 45 or "%" in host:
        raise ProtocolViolation("node host must be an IP address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolViolation("node host must be an IP address") from None
    return NodeAddress(node_id=_match(node_id, _NODE_ID, "node_id"), host=host,
                       port=_int(port, "port", 1, 65535))


def _nodes(p: dict[str, Any]) -> Nodes:
    _fields(p, "nodes", {"nodes"})
    items = _list(p["nodes"], "nodes")
    if len(items) > MAX_NODES:
        raise ProtocolViolation(f"at most {MAX_NODES} nodes per announcement")
    return Nodes(nodes=tuple(_node_address(n) for n in items))


def _beacon_link(value: Any) -> tuple[str, float | None]:
    if type(value) is not list or len(value) != 2:
        raise ProtocolViolation("a beacon link is [node_id, rtt_ms]")
    node_id, rtt = value
    if rtt is not None and (type(rtt) not in (int, float) or not 0 <= rtt < 1e9):
        raise ProtocolViolation("a beacon link's rtt_ms is a number of milliseconds or null")
    return _match(node_id, _NODE_ID, "link node_id"), rtt


def _beacon(p: dict[str, Any]) -> Beacon:
    _fields(p, "beacon", {"id", "origin", "master", "rev", "links"})
    links = _list(p["links"], "links")
    if len(links) > MAX_NODES:
        raise ProtocolViolation(f"at most {MAX_NODES} links per beacon")
    return Beacon(id=_match(p["id"], _MESSAGE_ID, "id"),
                  origin=_match(p["origin"], _NODE_ID, "origin"),
                  master=_bool(p["master"], "master"), rev=_int(p["rev"], "rev"),
                  links=tuple(_beacon_link(link) for link in links))


def _log_request(p: dict[str, Any]) -> LogRequest:
    _fields(p, "log?", {"id", "since"})
    return LogRequest(id=_int(p["id"], "id"), since=_int(p["since"], "since"))


def _log_entries(p: dict[str, Any]) -> LogEntries:
    _fields(p, "log", {"id", "batches"})
    entries = _list(p["batches"], "batches")
    batches = tuple(parse_batch(b) for b in entries)
    for previous, batch in zip(batches, batches[1:]):
        if batch.head.base != previous.head.rev:
            raise ProtocolViolation("log batches are not consecutive")
    return LogEntries(id=_int(p["id"], "id"), batches=batches,
                      frames=_raw_bytes(entries))


def _tree_request(p: dict[str, Any]) -> TreeRequest:
    _fields(p, "tree?", {"id", "prefixes"})
    prefixes = _list(p["prefixes"], "prefixes")
    if len(prefixes) > MAX_PREFIXES:
        raise ProtocolViolation(f"at most {MAX_PREFIXES} prefixes per request")
    return TreeRequest(id=_int(p["id"], "id"),
                       prefixes=tuple(_prefix(x, "prefix") for x in prefixes))


def _tree_node(value: Any) -> TreeNode:
    if type(value) is not dict:
        raise ProtocolViolation("tree nodes must be objects")
    _fields(value, "tree node", {"p", "n", "d", "c"})
    digest = _packed(value["d"], "d", DIGEST_BYTES)
    if len(digest) != 1:
        raise ProtocolViolation("d must hold one digest")
    children = None
    if value["c"] is not None:
        entry = value["c"]
        if type(entry) is not dict:
            raise ProtocolViolation("c must be an object or null")
        _fields(entry, "tree children", {"d", "n"})
        digests = _packed(entry["d"], "c.d", DIGEST_BYTES)
        counts = _list(entry["n"], "c.n")
        if len(digests) != 16 or len(counts) != 16:
            raise ProtocolViolation("a node has 16 children")
        children = tuple(zip(digests, (_int(n, "c.n") for n in counts)))
    return TreeNode(prefix=_prefix(value["p"], "p"), count=_int(value["n"], "n"),
                    digest=digest[0], children=children)


def _tree_nodes(p: dict[str, Any]) -> TreeNodes:
    _fields(p, "tree", {"id", "head", "nodes"})
    return TreeNodes(id=_int(p["id"], "id"), head=parse_head(p["head"]),
                     nodes=tuple(_tree_node(n) for n in _list(p["nodes"], "nodes")))


def _diff_request(p: dict[str, Any]) -> DiffRequest:
    _fields(p, "diff?", {"id", "prefix", "have"})
    return DiffRequest(id=_int(p["id"], "id"), prefix=_prefix(p["prefix"], "prefix"),
                       have=_packed(p["have"], "have", SHORT_HASH))


def _diff(p: dict[str, Any]) -> Diff:
    _fields(p, "diff", {"id", "rev", "missing", "extra"})
    missing = tuple(h.hex() for h in _packed(p["missing"], "missing", 32))
    return Diff(id=_int(p["id"], "id"), rev=_int(p["rev"], "rev"), missing=missing,
                extra=_packed(p["extra"], "extra", SHORT_HASH))


_PARSERS: dict[str, Callable[[dict[str, Any]], WireMessage]] = {
    "nodes": _nodes,
    "beacon": _beacon,
    "log?": _log_request,
    "log": _log_entries,
    "tree?": _tree_request,
    "tree": _tree_nodes,
    "diff?": _diff_request,
    "diff": _diff,
    "hello": _hello,
    "ping": _ping,
    "pong": _pong,
    "batch": _batch,
    "head": _head,
    "msg": _message,
    "msgs": _messages,
    "fetch": _fetch,
    "objects": _objects_message,
    "refused": _refusal,
}


#: Below this many characters a text's brackets are counted; above it they
#: are found, which is memchr and an order of magnitude faster per byte
#: but a call per bracket.
_FIND_FROM = 4096


def openers_over(text: str | bytes, start: int, end: int, levels: int) -> bool:
    """
    Whether C{text[start:end]} holds more than C{levels} "{" and "["
    together: if not, nothing in it can be nested deeper than C{levels}.
    Brackets inside strings count too, so True only means the parsed value
    must be looked at (L{nested_deeper_than}).
    """
    if type(text) is str:
        brace, bracket = "{", "["
    else:
        brace, bracket = b"{", b"["
    if end - start < _FIND_FROM:
        return text.count(brace, start, end) + text.count(bracket, start, end) > levels  # type: ignore[arg-type]
    found = 0
    for opener in (brace, bracket):
        at = text.find(opener, start, end)  # type: ignore[arg-type]
        while at >= 0:
            found += 1
            if found > levels:
                return True
            at = text.find(opener, at + 1, end)  # type: ignore[arg-type]
    return False


def nested_deeper_than(value: Any, levels: int) -> bool:
    """
    Whether C{value} (decoded JSON) holds arrays or objects nested more than
    C{levels} deep; the outermost container is level 1.
    """
    if type(value) is not dict and type(value) is not list:
        return False
    if levels == 0:
        return True
    items = value.values() if type(value) is dict else value
    return any(nested_deeper_than(item, levels - 1) for item in items)


def decode(frame: bytes) -> WireMessage:
    """
    Parse and validate one frame's payload.

    @raise ProtocolViolation: if it is not UTF-8 JSON, not an object, of an
        unknown type, nested deeper than L{MAX_NESTING}, or breaks its
        type's schema.
    """
    try:
        payload = _parse_frame(frame.decode("utf-8"), frame)
    except _TooDeep:
        raise ProtocolViolation(f"frame is nested deeper than {MAX_NESTING} levels") from None
    except (ValueError, RecursionError) as e:
        raise ProtocolViolation(f"frame is not UTF-8 JSON: {e}") from None
    if type(payload) is not dict:
        raise ProtocolViolation("frame is not a JSON object")
    kind = payload.get("type")
    parser = _PARSERS.get(kind) if type(kind) is str else None
    if parser is None:
        raise ProtocolViolation(f"unknown frame type {str(kind)[:40]!r}")
    return parser(payload)


# Parsing with spans ------------------------------------------------------------
#
# A batch carries each added object as the master's canonical bytes, and its
# hash is taken over exactly those bytes. The frame is parsed once, by the
# JSON decoder's own scanner, value by value; for the lists named below the
# text of every item is kept as well, so that the objects are hashed and
# stored as they arrived, and a log answer's batches are kept as their
# frames, without encoding anything again. Nothing is trusted for it: the
# hashes must still give the root the master signed, and a table object's
# text that is not what the master hashed cannot give it.


class _Spanned(list):  # type: ignore[type-arg]
    """
    A parsed list that knows the text each of its items arrived as.
    """

    __slots__ = ("raw",)

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[str | bytes] = []


class _TooDeep(Exception):
    pass


#: The lists whose items' texts are kept, by field name: C{None} for items
#: parsed whole, or the same kind of table for items that are objects.
_SPANNED: dict[str, dict | None] = {
    "add": None,
    "objects": None,
    "batches": {"add": None},
}


_SPANNED_NAMES = tuple(f'"{name}"' for name in _SPANNED)


def _parse_frame(text: str, frame: bytes | None = None) -> Any:
    """
    The frame's payload, from its decoded C{text}; C{frame}, its bytes, if
    the kept item texts may be sliced from them (when the text is ASCII,
    its positions are the bytes' positions).
    """
    pos = _skip_space(text, 0).end()
    if not text.startswith("{", pos) or not any(name in text for name in _SPANNED_NAMES):
        # No list to keep the texts of (most frames: pings, messages):
        # parsed whole, then its nesting bounded as for any value.
        payload = _loads(text)
        if (openers_over(text, 0, len(text), MAX_NESTING)
                and nested_deeper_than(payload, MAX_NESTING)):
            raise _TooDeep()
        return payload
    source: str | bytes = frame if type(frame) is bytes and text.isascii() else text
    payload, pos = _scan_object(text, source, pos, _SPANNED, 1)
    if _skip_space(text, pos).end() != len(text):
        raise ValueError(f"extra data after the frame's object at {pos}")
    return payload


def _scan_value(text: str, pos: int, depth: int) -> tuple[Any, int]:
    """
    One value at C{pos}, C{depth} containers deep, and where it ends.
    Brackets are counted first: the tree is walked only if there are
    enough of them (inside strings they count too) to break the limit.
    """
    try:
        value, end = _scan_once(text, pos)
    except StopIteration:
        raise ValueError(f"expecting a value at {pos}") from None
    levels = MAX_NESTING - depth
    if openers_over(text, pos, end, levels) and nested_deeper_than(value, levels):
        raise _TooDeep()
    return value, end


def _scan_object(text: str, source: str | bytes, pos: int,
                 spanned: dict[str, dict | None] | None,
                 depth: int) -> tuple[dict[str, Any], int]:
    """
    The object at C{pos} (its "{"), and where it ends. Repeated keys keep
    the last value, as the JSON decoder does. Kept item texts are sliced
    from C{source}: C{text}, or the frame's bytes when they are the same.
    """
    obj: dict[str, Any] = {}
    pos = _skip_space(text, pos + 1).end()
    if text.startswith("}", pos):
        return obj, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise ValueError(f"expecting a property name at {pos}")
        key, pos = _scan_string(text, pos + 1)
        pos = _skip_space(text, pos).end()
        if not text.startswith(":", pos):
            raise ValueError(f"expecting ':' at {pos}")
        pos = _skip_space(text, pos + 1).end()
        if spanned is not None and key in spanned and text.startswith("[", pos):
            obj[key], pos = _scan_list(text, source, pos, spanned[key], depth + 1)
        else:
            obj[key], pos = _scan_value(text, pos, depth)
        pos = _skip_space(text, pos).end()
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1).end()
        elif text.startswith("}", pos):
            return obj, pos + 1
        else:
            raise ValueError(f"expecting ',' or '}}' at {pos}")


def _scan_list(text: str, source: str | bytes, pos: int,
               items_spanned: dict[str, dict | None] | None,
               depth: int) -> tuple[_Spanned, int]:
    """
    The list at C{pos} (its "["), keeping each item's text. This is the
    loop a batch's objects go through, so the common case (no spaces,
    each item one scan) is spelled out.
    """
    items = _Spanned()
    append, keep = items.append, items.raw.append
    levels = MAX_NESTING - depth
    count, find_from = text.count, _FIND_FROM
    pos = _skip_space(text, pos + 1).end()
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        start = pos
        if items_spanned is not None and text.startswith("{", pos):
            item, pos = _scan_object(text, source, pos, items_spanned, depth + 1)
        else:
            try:
                item, pos = _scan_once(text, pos)
            except StopIteration:
                raise ValueError(f"expecting a value at {pos}") from None
            # openers_over, inline for small items (as in _objects).
            if pos - start < find_from:
                deep = count("{", start, pos) + count("[", start, pos) > levels
            else:
                deep = openers_over(text, start, pos, levels)
            if deep and nested_deeper_than(item, levels):
                raise _TooDeep()
        append(item)
        keep(source[start:pos])
        delimiter = text[pos:pos + 1]
        if delimiter in _SPACE:
            pos = _skip_space(text, pos).end()
            delimiter = text[pos:pos + 1]
        if delimiter == ",":
            pos += 1
            if text[pos:pos + 1] in _SPACE:
                pos = _skip_space(text, pos).end()
        elif delimiter == "]":
            if len(items) > _MAX_LIST:
                raise ValueError(f"a list longer than {_MAX_LIST} at {start}")
            return items, pos + 1
        else:
            raise ValueError(f"expecting ',' or ']' at {pos}")


# Building frames -------------------------------------------------------------


def _encode(kind: str, **fields: Any) -> bytes:
    fields["type"] = kind
    return _dumps(fields).encode("utf-8")


def hello(node_id: str, port: int, role: str, master: bool, head: Head) -> bytes:
    return _encode(
        "hello",
        version=PROTOCOL_VERSION,
        node_id=node_id,
        port=port,
        role=role,
        master=master,
        head=head.to_json(),
    )


def ping(request_id: int) -> bytes:
    return _encode("ping", id=request_id)


def pong(request_id: int) -> bytes:
    return _encode("pong", id=request_id)


def batch(head: Head, add_data: list[bytes], removes: list[str]) -> bytes:
    """
    A batch frame, with each added object given as its canonical bytes so
    that nothing is encoded twice.
    """
    prefix = _dumps({"type": "batch", "head": head.to_json(), "remove": removes})
    return b"".join(
        [prefix[:-1].encode("utf-8"), b',"add":[', b",".join(add_data), b"]}"]
    )


def head_announcement(head: Head) -> bytes:
    return _encode("head", head=head.to_json())


def message(message_id: str, origin: str, body: Any) -> bytes:
    """
    @raise ValueError: if C{body} is not JSON.
    """
    return message_frame(message_id, origin, [body_bytes(body)])


def body_bytes(body: Any) -> bytes:
    """
    C{body} as a message frame carries it.

    @raise ValueError: if C{body} is not JSON.
    """
    return _dumps(body).encode("utf-8")


def message_frame(message_id: str, origin: str, bodies: list[bytes]) -> bytes:
    """
    A C{msg} frame for one body, or a C{msgs} frame for 2 to L{MAX_BUNDLE},
    from the bodies' L{body_bytes}.
    """
    if len(bodies) == 1:
        prefix, field = _dumps({"type": "msg", "id": message_id, "origin": origin}), b',"body":'
        return b"".join([prefix[:-1].encode("utf-8"), field, bodies[0], b"}"])
    prefix = _dumps({"type": "msgs", "id": message_id, "origin": origin})
    return b"".join([prefix[:-1].encode("utf-8"), b',"bodies":[', b",".join(bodies), b"]}"])


def fetch(request_id: int, hashes: list[str]) -> bytes:
    return _encode("fetch", id=request_id, hashes=hashes)


def objects(request_id: int, object_data: list[bytes]) -> bytes:
    prefix = _dumps({"type": "objects", "id": request_id})
    return b"".join(
        [prefix[:-1].encode("utf-8"), b',"objects":[', b",".join(object_data), b"]}"]
    )


def refusal(request_id: int, reason: str) -> bytes:
    return _encode("refused", id=request_id, reason=reason)


def nodes(entries: Iterable[tuple[str, str, int]]) -> bytes:
    return _encode("nodes", nodes=[list(e) for e in entries][:MAX_NODES])


def beacon(beacon_id: str, origin: str, master: bool = False, rev: int = 0,
           links: Iterable[tuple[str, float | None]] = ()) -> bytes:
    """
    A beacon; C{links} beyond L{MAX_NODES} are left out, and RTTs are
    rounded to microseconds.
    """
    entries = [[node_id, None if rtt is None else round(rtt, 3)]
               for node_id, rtt in list(links)[:MAX_NODES]]
    return _encode("beacon", id=beacon_id, origin=origin, master=master, rev=rev,
                   links=entries)


def log_request(request_id: int, since: int) -> bytes:
    return _encode("log?", id=request_id, since=since)


def log_entries(request_id: int, batch_frames: list[bytes]) -> bytes:
    """
    A log answer, with each batch given as its frame bytes.
    """
    prefix = _dumps({"type": "log", "id": request_id})
    return b"".join(
        [prefix[:-1].encode("utf-8"), b',"batches":[', b",".join(batch_frames), b"]}"]
    )


def tree_request(request_id: int, prefixes: list[str]) -> bytes:
    return _encode("tree?", id=request_id, prefixes=prefixes)


def tree_node(prefix: str, count: int, digest: bytes,
              children: list[tuple[bytes, int]] | None) -> dict[str, Any]:
    """
    One entry of a tree answer; digests are truncated to DIGEST_BYTES.
    """
    return {
        "p": prefix,
        "n": count,
        "d": pack([digest[:DIGEST_BYTES]]),
        "c": None if children is None else {
            "d": pack(d[:DIGEST_BYTES] for d, _ in children),
            "n": [n for _, n in children],
        },
    }


def tree_nodes(request_id: int, head: Head, nodes: list[dict[str, Any]]) -> bytes:
    return _encode("tree", id=request_id, head=head.to_json(), nodes=nodes)


def diff_request(request_id: int, prefix: str, have: Iterable[bytes]) -> bytes:
    return _encode("diff?", id=request_id, prefix=prefix, have=pack(have))


def diff(request_id: int, rev: int, missing: Iterable[str], extra: Iterable[bytes]) -> bytes:
    return _encode("diff", id=request_id, rev=rev,
                   missing=pack(bytes.fromhex(h) for h in missing), extra=pack(extra))


def response_id(message: WireMessage) -> int | None:
    """
    The request id a response answers, or None if C{message} is no response.
    """
    if isinstance(message, (Pong, Objects, Refusal, LogEntries, TreeNodes, Diff)):
        return message.id
    return None
