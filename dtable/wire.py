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

import json
import re
from typing import Any, Callable, Union

import attrs

PROTOCOL_VERSION = 1

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


_loads = json.JSONDecoder(parse_constant=_reject_constant).decode


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


@attrs.frozen
class HeadAnnouncement:
    head: Head


@attrs.frozen
class Message:
    id: str
    origin: str
    body: Any


@attrs.frozen
class StateRequest:
    id: int


@attrs.frozen
class State:
    id: int
    head: Head
    hashes: tuple[str, ...]


@attrs.frozen
class Fetch:
    id: int
    hashes: tuple[str, ...]


@attrs.frozen
class Objects:
    id: int
    objects: tuple[dict, ...]


@attrs.frozen
class Refusal:
    id: int
    reason: str


Response = Union[Pong, State, Objects, Refusal]
WireMessage = Union[
    Hello, Ping, Pong, Batch, HeadAnnouncement, Message, StateRequest, State,
    Fetch, Objects, Refusal,
]


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
    if type(value) is not list or len(value) > _MAX_LIST:
        raise ProtocolViolation(f"{name} must be a list of at most {_MAX_LIST}")
    return value


def _hashes(value: Any, name: str) -> tuple[str, ...]:
    return tuple(_match(h, _HEX64, name) for h in _list(value, name))


def _objects(value: Any, name: str) -> tuple[dict, ...]:
    items = _list(value, name)
    for item in items:
        if type(item) is not dict:
            raise ProtocolViolation(f"{name} must hold JSON objects")
    return tuple(items)


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


def _state_request(p: dict[str, Any]) -> StateRequest:
    _fields(p, "state?", {"id"})
    return StateRequest(id=_int(p["id"], "id"))


def _state(p: dict[str, Any]) -> State:
    _fields(p, "state", {"id", "head", "hashes"})
    return State(
        id=_int(p["id"], "id"),
        head=parse_head(p["head"]),
        hashes=_hashes(p["hashes"], "hashes"),
    )


def _fetch(p: dict[str, Any]) -> Fetch:
    _fields(p, "fetch", {"id", "hashes"})
    return Fetch(id=_int(p["id"], "id"), hashes=_hashes(p["hashes"], "hashes"))


def _objects_message(p: dict[str, Any]) -> Objects:
    _fields(p, "objects", {"id", "objects"})
    return Objects(id=_int(p["id"], "id"), objects=_objects(p["objects"], "objects"))


def _refusal(p: dict[str, Any]) -> Refusal:
    _fields(p, "refused", {"id", "reason"})
    reason = p["reason"]
    if type(reason) is not str or len(reason) > 1000:
        raise ProtocolViolation("reason must be a short string")
    return Refusal(id=_int(p["id"], "id"), reason=reason)


_PARSERS: dict[str, Callable[[dict[str, Any]], WireMessage]] = {
    "hello": _hello,
    "ping": _ping,
    "pong": _pong,
    "batch": _batch,
    "head": _head,
    "msg": _message,
    "state?": _state_request,
    "state": _state,
    "fetch": _fetch,
    "objects": _objects_message,
    "refused": _refusal,
}


def decode(frame: bytes) -> WireMessage:
    """
    Parse and validate one frame's payload.

    @raise ProtocolViolation: if it is not UTF-8 JSON, not an object, of an
        unknown type, or breaks its type's schema.
    """
    try:
        payload = _loads(frame.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolViolation(f"frame is not UTF-8 JSON: {e}") from None
    if type(payload) is not dict:
        raise ProtocolViolation("frame is not a JSON object")
    kind = payload.get("type")
    parser = _PARSERS.get(kind) if type(kind) is str else None
    if parser is None:
        raise ProtocolViolation(f"unknown frame type {str(kind)[:40]!r}")
    return parser(payload)


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
    return _encode("msg", id=message_id, origin=origin, body=body)


def state_request(request_id: int) -> bytes:
    return _encode("state?", id=request_id)


def state(request_id: int, head: Head, hashes: list[str]) -> bytes:
    return _encode("state", id=request_id, head=head.to_json(), hashes=hashes)


def fetch(request_id: int, hashes: list[str]) -> bytes:
    return _encode("fetch", id=request_id, hashes=hashes)


def objects(request_id: int, object_data: list[bytes]) -> bytes:
    prefix = _dumps({"type": "objects", "id": request_id})
    return b"".join(
        [prefix[:-1].encode("utf-8"), b',"objects":[', b",".join(object_data), b"]}"]
    )


def refusal(request_id: int, reason: str) -> bytes:
    return _encode("refused", id=request_id, reason=reason)


def response_id(message: WireMessage) -> int | None:
    """
    The request id a response answers, or None if C{message} is no response.
    """
    if isinstance(message, (Pong, State, Objects, Refusal)):
        return message.id
    return None
