"""
Property-based fuzzing of what a peer can send: the frame decoder
(L{dtable.wire.decode}) and the dispatcher of a running node.

The decoder must turn any bytes into a message value or a
L{ProtocolViolation}, nothing else. A running node is a real
L{DistributedTable} on a MemoryReactorClock (its start completes at once);
peers speak to it through L{PeerProtocol}s over StringTransports, TLS done.
Whatever a peer sends, no exception escapes C{dataReceived}, the table keeps
its master-signed state, nothing is logged as a failure, and the node still
answers an honest peer. Every example gets a fresh node, so a failure shrinks
and replays on its own.

Every test runs with C{derandomize=True}: the examples are a function of the
test's source, so CI runs the same examples every time and a failure there
replays locally with the same command. (That setting implies database=None:
no .hypothesis directory, and no examples remembered from another run.)
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import struct
import sys
from typing import Any, Callable, get_args

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto, wire
from dtable.canonical import canonical_bytes, hash_bytes
from dtable.protocol import PeerProtocol
from dtable.service import DistributedTable
from dtable.store import empty_head
from dtable.table import LEAF_MAX
from dtable.testing import FAST, Recorder
from dtable.wire import Head, ProtocolViolation

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: For tests of known bugs, which fail on every example: a few, unshrunk.
SHORT = settings(FUZZ, max_examples=25)

#: A fixed network key, so that signatures (and so every example) are the
#: same from run to run.
KEY = crypto.KEY_PREFIX + base64.urlsafe_b64encode(
    hashlib.sha256(b"dtable test_fuzz").digest()).rstrip(b"=").decode("ascii")

MAX_FRAME = 1024 * 1024

#: Settings for the nodes under test: FAST's, a master that publishes at
#: once, a small max_frame, and no clean loop (it would dial learned
#: addresses, which a memory reactor never connects).
OPTIONS = {**FAST, "master_sync_timeout": 0.0, "max_frame": MAX_FRAME,
           "clean_interval": 3600.0}

FUZZER_ID = "f0" * 16
HONEST_ID = "c0" * 16
NEIGHBOUR_ID = "b0" * 16
FEEDER_ID = "d0" * 16
#: Stands for the node's own id in generated frames (the node's id is
#: random); replaced before the frame is fed.
SELF_ID = "5e" * 16

#: The objects of the history every node under test starts from.
OBJECT_A = {"name": "a", "n": 1}
OBJECT_B = {"name": "b", "tags": ["x", "ü"]}
OBJECT_C = {"name": "c", "big": 10**40, "f": -0.5}
OBJECT_D = {"name": "d", "nested": {"deeper": [None, True, {}]}}
#: Published at revision 3, which no fuzzer is shown: without it no
#: sequence of frames can honestly move a node past revision 2.
OBJECT_E = {"name": "e", "secret": "revision 3 only"}
STEPS = [([OBJECT_A, OBJECT_B, OBJECT_C], []), ([OBJECT_D], [OBJECT_A]), ([OBJECT_E], [])]


def length_prefixed(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def frames_in(data: bytes) -> list[bytes]:
    """
    Split length-prefixed bytes into payloads.
    """
    frames = []
    while len(data) >= 4:
        (length,) = struct.unpack("!I", data[:4])
        frames.append(data[4:4 + length])
        data = data[4 + length:]
    return frames


# Test doubles ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def certificate(node_id: str) -> Any:
    network = crypto.derive_network(crypto.parse_network_key(KEY))
    return crypto.issue_node_certificate(network, node_id).cert


class TLSStringTransport(StringTransport):
    """
    A StringTransport that presents a peer certificate, as a TLS transport
    does, and records an abort.
    """

    def __init__(self, node_id: str, host: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self._certificate = certificate(node_id)
        self.aborted = False

    def getPeerCertificate(self) -> Any:
        return self._certificate

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Peer:
    """
    A peer that connected to C{node}: the node's PeerProtocol for it over a
    StringTransport, TLS done, so the node has sent its hello.
    """

    def __init__(self, node: DistributedTable, node_id: str, host: str) -> None:
        self.node = node
        self.node_id = node_id
        self.transport = TLSStringTransport(node_id, host)
        self.protocol = PeerProtocol(node, node.reactor, node.config, outbound=False)
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()

    def hello(self) -> None:
        self.send(wire.hello(self.node_id, 0, "link", False, empty_head()))

    def send(self, *frames: bytes) -> None:
        self.feed(b"".join(length_prefixed(f) for f in frames))

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data.replace(SELF_ID.encode(), self.node.node_id.encode()))

    def received(self) -> list[bytes]:
        """
        The frames the node sent this peer so far; clears the transport.
        """
        data = self.transport.value()
        self.transport.clear()
        return frames_in(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


# The history every node under test starts from ---------------------------------


@attrs.frozen
class History:
    """
    Three batches a master published: C{frames[i]} at C{heads[i]}
    (revision i + 1).
    """

    frames: tuple[bytes, ...]
    heads: tuple[Head, ...]

    @property
    def master_key(self) -> str:
        return self.heads[0].master


def publish(master: DistributedTable, steps: list[tuple[list[dict], list[dict]]]) -> None:
    for adds, removes in steps:
        for obj in adds:
            master.add_object(obj)
        for obj in removes:
            master.remove_object(obj)
        master.flush()


@functools.lru_cache(maxsize=None)
def history() -> History:
    master = DistributedTable(port=0, key=KEY, master=True, reactor=MemoryReactorClock(),
                              **OPTIONS)
    master.startService()
    recorder = Peer(master, FEEDER_ID, "192.0.2.1")
    recorder.hello()
    recorder.received()
    publish(master, STEPS)
    frames = tuple(f for f in recorder.received() if json.loads(f)["type"] == "batch")
    recorder.lose()
    master.stopService()
    return History(frames=frames,
                   heads=tuple(wire.decode(f).head for f in frames))  # type: ignore[union-attr]


#: Objects and hashes a fuzzer may know: those of revisions 1 and 2.
KNOWN_OBJECTS = [OBJECT_A, OBJECT_B, OBJECT_C, OBJECT_D]
KNOWN_HASHES = [hash_bytes(canonical_bytes(obj)) for obj in KNOWN_OBJECTS]


# Sample frames: one or more per builder -----------------------------------------

_HEAD = Head(rev=2, base=1, root="ab" * 32, sig="cd" * 64, master="ef" * 32)
_BATCH_1 = wire.batch(Head(rev=1, base=0, root="01" * 32, sig="23" * 64, master="ef" * 32),
                      [b'{"a":1}'], [])
_BATCH_2 = wire.batch(_HEAD, [b'{"b":[1,2]}', b"{}"], ["aa" * 32])
SAMPLE_FRAMES = [
    wire.hello("ab" * 16, 9999, "link", True, _HEAD),
    wire.hello("ab" * 16, 0, "probe", False, empty_head()),
    wire.ping(7),
    wire.pong(7),
    _BATCH_1,
    _BATCH_2,
    wire.head_announcement(_HEAD),
    wire.message("m-1", "ab" * 16, {"text": "hi", "list": [1, 2.5, None]}),
    wire.message_frame("m-2", "ab" * 16, [b'{"n":1}', b'"two"', b"[3]"]),
    wire.fetch(3, ["aa" * 32, "bb" * 32]),
    wire.objects(4, [b'{"a":1}', b'{"b":{"c":[]}}']),
    wire.refusal(5, "too busy"),
    wire.nodes([("ab" * 16, "192.0.2.7", 9999), ("cd" * 16, "2001:db8::1", 1)]),
    wire.beacon("beacon.1", "ab" * 16),
    wire.log_request(6, 1),
    wire.log_entries(6, [_BATCH_1, _BATCH_2]),
    wire.tree_request(8, ["", "a", "0f"]),
    wire.tree_nodes(8, _HEAD, [
        wire.tree_node("", 40, bytes(32), [(bytes([i]) * 32, i) for i in range(16)]),
        wire.tree_node("a", 2, b"\x01" * 32, None),
    ]),
    wire.diff_request(9, "ab", [b"12345678", b"abcdefgh"]),
    wire.diff(9, 2, ["ab" * 32], [b"12345678"]),
]
SAMPLE_PAYLOADS = [json.loads(f) for f in SAMPLE_FRAMES]

#: Every frame type and its fields, as the builders write them.
FIELDS = {p["type"]: sorted(set(p) - {"type"}) for p in SAMPLE_PAYLOADS}
#: Field names inside frames: heads, tree nodes and their children.
INNER_FIELDS = sorted(set(attrs.fields_dict(Head)) | {"p", "n", "d", "c"})
MESSAGE_TYPES = get_args(wire.WireMessage)


# Strategies ----------------------------------------------------------------------------

hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
hex128 = st.binary(min_size=64, max_size=64).map(bytes.hex)
node_ids = st.sampled_from([FUZZER_ID, SELF_ID, HONEST_ID]) | st.binary(
    min_size=16, max_size=16).map(bytes.hex)
request_ids = st.integers(1, 3) | st.integers(0, 2**63 - 1)
message_ids = st.sampled_from(["m", "m-1", "x.y:z_"]) | st.from_regex(
    r"\A[0-9A-Za-z_.:-]{1,64}\Z")

json_scalars = (
    st.none() | st.booleans() | st.integers()
    | st.sampled_from([10**400, -10**400, 2**63, 2**63 - 1, -1, 0])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                            max_size=4)


#: Any JSON value Python can write as JSON.
json_values = st.recursive(json_scalars, _containers, max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)

#: JSON text no json.dumps of a Python value gives: not JSON at all
#: (NaN, Infinity), numbers out of range, lone surrogates, broken tokens.
RAW_TEXTS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 5000, "-0", "0e0",
    '"\\ud800"', '"\\udc00\\ud800"', "tru", "01", "1.", '"\\x41"', "[1,]", '{"a" 1}', "",
]
value_texts = json_values.map(lambda v: json.dumps(v, ensure_ascii=False)) | st.sampled_from(
    RAW_TEXTS) | st.floats().map(json.dumps)


def object_text(pairs: list[tuple[str, str]]) -> str:
    """
    A JSON object written from (key, value text) pairs, duplicates kept.
    """
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


@st.composite
def envelopes(draw: Callable) -> bytes:
    """
    A frame of a known type whose fields are random JSON or raw text, some
    missing, some unknown, some repeated, in any order.
    """
    kind = draw(st.sampled_from(sorted(FIELDS)))
    names = FIELDS[kind]
    missing = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    extra = draw(st.lists(st.sampled_from(INNER_FIELDS) | st.text(max_size=5), max_size=2))
    pairs = [("type", json.dumps(kind))] + [
        (name, draw(value_texts)) for name in names + extra if name not in missing]
    return object_text(draw(st.permutations(pairs))).encode("utf-8")


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """
    The path of every value inside C{value}, itself included.
    """
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths.extend(_paths(item, path + (key,)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths.extend(_paths(item, path + (index,)))
    return paths


#: Values one step off a valid one: the wrong type, out of range, malformed.
near_misses = st.sampled_from([
    True, 1.0, -1, 2**63, 10**400, "", "A" * 64, "ab" * 31, "AB" * 32, [], {}, None,
    "192.0.2.1%eth0", "::1", "999.1.1.1", 65536, 0, "=", "AAAA", "AAAAAAAAAAA=",
]) | json_values


@st.composite
def mutated_frames(draw: Callable) -> bytes:
    """
    A real frame with one to three values replaced, removed or added, at
    any depth.
    """
    payload = copy.deepcopy(draw(st.sampled_from(SAMPLE_PAYLOADS)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(payload)[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = payload
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(near_misses)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(INNER_FIELDS) | st.text(max_size=5))] = draw(near_misses)
        else:
            parent.append(draw(near_misses))
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


@st.composite
def truncated_frames(draw: Callable) -> bytes:
    frame = draw(st.sampled_from(SAMPLE_FRAMES))
    return frame[:draw(st.integers(0, len(frame) - 1))]


@st.composite
def deep_frames(draw: Callable) -> bytes:
    """
    A frame holding arrays or objects nested up to a few thousand deep, in a
    message body or in any field of a known type.
    """
    depth = draw(st.integers(1, 3000))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"k":', "}]")]))
    deep = opening * depth + draw(st.sampled_from(["1", "[]"])) + closing * depth
    payload = copy.deepcopy(draw(st.sampled_from(SAMPLE_PAYLOADS)))
    field = draw(st.sampled_from(sorted(set(payload) - {"type"})))
    payload[field] = "@"
    return json.dumps(payload).replace('"@"', deep).encode("utf-8")


INVALID_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                b"\xe2\x82", b"\xf0\x9f\x98"]


@st.composite
def invalid_utf8_frames(draw: Callable) -> bytes:
    frame = draw(st.sampled_from(SAMPLE_FRAMES))
    at = draw(st.integers(0, len(frame)))
    return frame[:at] + draw(st.sampled_from(INVALID_UTF8)) + frame[at:]


@st.composite
def duplicate_key_frames(draw: Callable) -> bytes:
    """
    A real frame with some of its keys (the type too) written twice, the
    second time with another value.
    """
    payload = draw(st.sampled_from(SAMPLE_PAYLOADS))
    pairs = [(k, json.dumps(v)) for k, v in payload.items()]
    for key in draw(st.lists(st.sampled_from(sorted(payload)), min_size=1, max_size=3)):
        other = draw(st.sampled_from(sorted(FIELDS)).map(json.dumps) | value_texts)
        pairs.insert(draw(st.integers(0, len(pairs))), (key, other))
    return object_text(pairs).encode("utf-8")


#: Any payload a decoder might be handed.
junk_payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode("utf-8")),
    envelopes(),
    mutated_frames(),
    truncated_frames(),
    deep_frames(),
    invalid_utf8_frames(),
    duplicate_key_frames(),
)


# Schema-valid frames: past the decoder, to the dispatcher ---------------------------------


def _genuine_head(index: int) -> Head:
    return history().heads[index]


def _master_key() -> str:
    return history().master_key


genuine_heads = st.builds(_genuine_head, st.integers(0, 2))
#: The genuine head of revision 3: a node at revision 2 that hears it asks
#: the sender for what it lacks.
head_ahead = st.builds(_genuine_head, st.just(2))


@st.composite
def forged_heads(draw: Callable) -> Head:
    """
    A well-formed signed head that the master did not sign: made up, or a
    genuine one with its root or signature changed.
    """
    if draw(st.booleans()):
        head = draw(genuine_heads)
        field = draw(st.sampled_from(["root", "sig"]))
        return attrs.evolve(head, **{field: draw(hex64 if field == "root" else hex128)})
    rev = draw(st.integers(1, 6) | st.integers(1, 2**63 - 1))
    return Head(rev=rev, base=draw(st.integers(0, rev - 1)), root=draw(hex64),
                sig=draw(hex128),
                master=draw(st.builds(_master_key) | hex64))


signed_heads = genuine_heads | forged_heads()
heads = signed_heads | hex64.map(lambda root: Head(rev=0, base=0, root=root))

known_objects = st.sampled_from(KNOWN_OBJECTS)
#: Object text for a batch or an objects answer: canonical or not.
object_data = (known_objects | json_objects).map(
    lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
) | json_objects.map(lambda obj: json.dumps(obj, indent=1))
hashes = st.sampled_from(KNOWN_HASHES) | hex64
prefixes = st.sampled_from(["", "0", "a", "ff"]) | st.from_regex(r"\A[0-9a-f]{0,63}\Z")


@st.composite
def batch_frames(draw: Callable, head: st.SearchStrategy = signed_heads) -> bytes:
    adds = draw(st.lists(object_data, max_size=3))
    return wire.batch(draw(head), [data.encode("utf-8") for data in adds],
                      draw(st.lists(hashes, max_size=3)))


@st.composite
def log_answers(draw: Callable, ids: st.SearchStrategy = request_ids,
                reach: bool = False) -> bytes:
    """
    A log answer with consecutive batches: some genuine, then made-up ones
    (which the decoder accepts and the verifier or the root check must not).
    With C{reach}, the genuine ones end at revision 2 and at least one
    made-up one follows: one a node at revision 2 tries to apply.
    """
    start = draw(st.integers(0, 2))
    stop = 2 if reach else draw(st.integers(start, 2))
    batches = list(history().frames[start:stop])
    for rev in range(stop + 1, stop + 1 + draw(st.integers(int(reach), 2))):
        head = draw(forged_heads() | genuine_heads)
        if (head.rev, head.base) != (rev, rev - 1):
            head = attrs.evolve(head, rev=rev, base=rev - 1)
        batches.append(draw(batch_frames(st.just(head))))
    return wire.log_entries(draw(ids), batches)


counts = st.integers(0, 3) | st.integers(0, 2 * LEAF_MAX)
digests = st.binary(min_size=wire.DIGEST_BYTES, max_size=wire.DIGEST_BYTES)
children = st.lists(st.tuples(digests, counts), min_size=16, max_size=16)


def tree_entries(prefix: st.SearchStrategy = st.just("") | prefixes) -> st.SearchStrategy:
    return st.builds(wire.tree_node, prefix, counts, digests, st.none() | children)


short_hashes = st.binary(min_size=8, max_size=8) | st.sampled_from(
    [bytes.fromhex(h[:2 * wire.SHORT_HASH]) for h in KNOWN_HASHES])


def answers(request_id: int) -> st.SearchStrategy:
    """
    Any answer to request C{request_id}.
    """
    ids = st.just(request_id)
    return st.one_of(
        log_answers(ids),
        st.builds(wire.refusal, ids, st.text(max_size=20)),
        st.builds(wire.tree_nodes, ids, genuine_heads | heads,
                  st.lists(tree_entries(), max_size=3)),
        st.builds(wire.diff, ids, st.integers(2, 4), st.lists(hashes, max_size=3),
                  st.lists(short_hashes, max_size=3)),
        st.builds(wire.objects, ids, st.lists(object_data.map(str.encode), max_size=3)),
        st.builds(wire.pong, ids),
    )


def answer_to(request: Any) -> st.SearchStrategy:
    """
    A plausible answer to one of a node's requests (its prefixes, its
    hashes), or any answer with its id.
    """
    ids = st.just(request.id)
    if isinstance(request, wire.LogRequest):
        plausible = log_answers(ids, reach=True) | st.builds(wire.refusal, ids, st.just("no"))
    elif isinstance(request, wire.TreeRequest):
        plausible = st.builds(
            wire.tree_nodes, ids, head_ahead | heads,
            st.tuples(*[tree_entries(st.just(p)) for p in request.prefixes]).map(list))
    elif isinstance(request, wire.DiffRequest):
        prefix = request.prefix
        plausible = st.builds(
            wire.diff, ids, st.just(3) | st.integers(2, 4),
            st.lists(hex64.map(lambda h: prefix + h[len(prefix):]), max_size=3),
            st.lists(st.sampled_from(request.have) if request.have else short_hashes,
                     max_size=3))
    else:
        plausible = answers(request.id)
    # Mostly plausible answers, to get deep into the walk.
    return st.sampled_from([plausible] * 3 + [answers(request.id)]).flatmap(lambda s: s)


#: Frames that pass the decoder, of every type, with random values.
valid_frames = st.one_of(
    st.builds(wire.hello, st.just(FUZZER_ID), st.integers(0, 65535),
              st.sampled_from(wire.ROLES), st.booleans(), heads),
    st.builds(wire.ping, request_ids),
    st.builds(wire.pong, request_ids),
    batch_frames(),
    st.integers(0, 1).map(lambda i: history().frames[i]),
    st.builds(wire.head_announcement, heads),
    st.builds(wire.message, message_ids, node_ids, json_values),
    st.builds(wire.fetch, request_ids, st.lists(hashes, max_size=3)),
    st.builds(wire.objects, request_ids,
              st.lists(object_data.map(str.encode), max_size=3)),
    st.builds(wire.refusal, request_ids, st.text(max_size=20)),
    st.builds(wire.nodes, st.lists(st.tuples(node_ids, st.ip_addresses().map(str),
                                             st.integers(1, 65535)), max_size=3)),
    st.builds(wire.beacon, message_ids, node_ids),
    st.builds(wire.log_request, request_ids, st.integers(0, 5) | st.integers(0, 2**63 - 1)),
    log_answers(),
    st.builds(wire.tree_request, request_ids, st.lists(prefixes, max_size=4)),
    st.builds(wire.tree_nodes, request_ids, heads, st.lists(tree_entries(), max_size=3)),
    st.builds(wire.diff_request, request_ids, prefixes, st.lists(short_hashes, max_size=3)),
    st.builds(wire.diff, request_ids, st.integers(0, 5), st.lists(hashes, max_size=3),
              st.lists(short_hashes, max_size=3)),
)


@st.composite
def chunked(draw: Callable, data: bytes) -> list[bytes]:
    """
    C{data} cut into pieces at random points, as TCP may deliver it.
    """
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


#: Pieces of a byte stream from a hostile peer: frames of any payload, bytes
#: with no framing, and length prefixes above max_frame.
stream_pieces = st.one_of(
    junk_payloads.map(length_prefixed),
    valid_frames.map(length_prefixed),
    st.binary(min_size=1, max_size=40),
    st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda length: struct.pack("!I", length)),
)


@st.composite
def hostile_streams(draw: Callable) -> list[bytes]:
    return draw(chunked(b"".join(draw(st.lists(stream_pieces, max_size=6)))))


@st.composite
def valid_streams(draw: Callable) -> list[bytes]:
    """
    Valid frames, often with the genuine head of revision 3 among them,
    which makes a node at revision 2 ask the fuzzer (request ids 1, 2, ...).
    """
    frames = draw(st.lists(valid_frames, max_size=8))
    if draw(st.booleans()):
        frames.insert(draw(st.integers(0, len(frames))),
                      wire.head_announcement(history().heads[2]))
    return draw(chunked(b"".join(length_prefixed(f) for f in frames)))


# The decoder ------------------------------------------------------------------------------


class DecoderFuzzTests(SynchronousTestCase):
    """
    L{wire.decode} returns a message value or raises L{ProtocolViolation};
    any other exception is a bug a peer can trigger.
    """

    def decode(self, data: bytes) -> Any:
        """
        The message C{data} decodes to, or None for a ProtocolViolation.
        """
        try:
            message = wire.decode(data)
        except ProtocolViolation:
            return None
        self.assertIsInstance(message, MESSAGE_TYPES)
        return message

    def test_samples_cover_every_message_type(self) -> None:
        """
        The sample frames the strategies mutate hold one of each message
        type; fails when a type is added without a sample here.
        """
        self.assertEqual({type(wire.decode(f)) for f in SAMPLE_FRAMES}, set(MESSAGE_TYPES))

    @FUZZ
    @given(valid_frames)
    def test_valid_frames_decode(self, frame: bytes) -> None:
        """
        What the dispatcher tests feed as valid is valid: the builders and
        the decoder agree.
        """
        self.assertIsNotNone(self.decode(frame))

    @FUZZ
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        """
        Fails on bytes that make the decoder raise anything else.
        """
        self.decode(data)

    @FUZZ
    @given(json_values
           | st.lists(value_texts, max_size=4).map(lambda texts: "[" + ",".join(texts) + "]"))
    def test_random_json(self, value: Any) -> None:
        """
        Any JSON value, or JSON-like text (NaN, 1e400, a 5000-digit number,
        lone surrogates). Only an object can be a frame.
        """
        text = value if isinstance(value, str) else json.dumps(value)
        message = self.decode(text.encode("utf-8"))
        if not text.startswith("{"):
            self.assertIsNone(message)

    @FUZZ
    @given(envelopes())
    def test_every_type_with_random_fields(self, data: bytes) -> None:
        """
        Fails on a field check that trusts a value's type or presence.
        """
        self.decode(data)

    @FUZZ
    @given(mutated_frames())
    def test_mutated_frames(self, data: bytes) -> None:
        """
        Fails on a check deep inside a frame (heads, tree nodes, node
        addresses, packed hashes) that trusts what it is given.
        """
        self.decode(data)

    @FUZZ
    @given(truncated_frames())
    def test_truncated_frames(self, data: bytes) -> None:
        """
        No proper prefix of a frame is a frame.
        """
        self.assertIsNone(self.decode(data))

    @FUZZ
    @given(deep_frames())
    def test_deep_nesting(self, data: bytes) -> None:
        """
        Nesting past the interpreter's recursion limit is a violation, not a
        RecursionError.
        """
        self.decode(data)

    @FUZZ
    @given(invalid_utf8_frames())
    def test_invalid_utf8(self, data: bytes) -> None:
        """
        Any invalid UTF-8 sequence anywhere makes a frame a violation.
        """
        self.assertIsNone(self.decode(data))

    @FUZZ
    @given(duplicate_key_frames())
    def test_duplicate_keys(self, data: bytes) -> None:
        """
        Fails if a repeated key (the last one wins) gets past a check.
        """
        self.decode(data)

    @FUZZ
    @given(st.integers(1, 2 * sys.getrecursionlimit()))
    def test_verdict_does_not_depend_on_the_stack(self, depth: int) -> None:
        """
        A frame is accepted or refused whatever the caller's stack depth.
        """
        frame = wire.message("m", FUZZER_ID, "@").replace(
            b'"@"', b"[" * depth + b"]" * depth)

        def nested(levels: int) -> Any:
            if levels:
                return nested(levels - 1)
            return self.decode(frame) is None

        self.assertEqual(nested(0), nested(sys.getrecursionlimit() // 3))


# A running node -------------------------------------------------------------------------------


class NodeHarness:
    """
    A fresh node per example at revision 2 of L{history}, fuzzed through a
    peer, then checked: the same table, no failure logged, an honest peer
    still served, the fuzzer's link live or dropped, and a clean stop.
    """

    def setUp(self) -> None:
        history()

    def start_node(self, master: bool, rev: int = 2) -> DistributedTable:
        """
        A started node at revision C{rev} of L{history}: the master
        publishes it, any other node is fed its batches by a peer.
        """
        node = DistributedTable(port=0, key=KEY, master=master, reactor=MemoryReactorClock(),
                                **OPTIONS)
        node.startService()
        self.assertIs(self.successResultOf(node.when_started()), node)
        if master:
            publish(node, STEPS[:rev])
        else:
            feeder = Peer(node, FEEDER_ID, "192.0.2.2")
            feeder.hello()
            feeder.send(*history().frames[:rev])
            feeder.lose()
        self.assertEqual(node.head, history().heads[rev - 1])
        return node

    def assert_no_failure_logged(self) -> None:
        """
        Nothing was logged as a failure (an exception the node did not
        expect).
        """
        self.assertEqual([f.getTraceback() for f in self.flushLoggedErrors()], [])

    def fuzz(self, master: bool, talk: Callable[[Peer], None]) -> None:
        """
        Let C{talk} speak to a fresh node at revision 2 through a peer that
        sent its hello, then check the node came through.
        """
        node = self.start_node(master)
        fuzzer = Peer(node, FUZZER_ID, "203.0.113.9")
        fuzzer.hello()
        self.assertTrue(fuzzer.protocol.is_live)
        talk(fuzzer)
        # The fuzzer's link is live, or the node dropped it (an abort).
        self.assertLessEqual(set(node.links), {fuzzer.protocol})
        if not fuzzer.protocol.is_live:
            self.assertTrue(fuzzer.transport.aborted)
        fuzzer.lose()
        node.reactor.advance(node.config.catch_up_retry)
        self.assertEqual(node.links, [])
        self.assertEqual((node.head, len(node)), (history().heads[1], 3))
        self.assert_serves(node)
        self.assert_no_failure_logged()
        self.assertIsNone(self.successResultOf(node.stopService()))
        self.assertEqual(node.reactor.getDelayedCalls(), [])

    def assert_serves(self, node: DistributedTable) -> None:
        """
        An honest peer gets the node's hello at its head, and a pong.
        """
        honest = Peer(node, HONEST_ID, "198.51.100.7")
        hello = wire.decode(honest.received()[0])
        self.assertEqual(hello.head, node.head)  # type: ignore[union-attr]
        honest.hello()
        honest.send(wire.ping(42))
        self.assertIn(wire.pong(42), honest.received())
        self.assertEqual(node.links, [honest.protocol])
        honest.lose()


def feeding(chunks: list[bytes]) -> Callable[[Peer], None]:
    def talk(peer: Peer) -> None:
        for chunk in chunks:
            peer.feed(chunk)

    return talk


REQUESTS = (wire.LogRequest, wire.TreeRequest, wire.DiffRequest, wire.Fetch)


class DispatcherFuzzTests(NodeHarness, SynchronousTestCase):
    """
    A node at revision 2, the master or not: a fuzzer that knows every
    signed head but not the objects of revision 3 cannot move it.
    """

    @FUZZ
    @given(st.booleans(), hostile_streams())
    def test_hostile_stream(self, master: bool, chunks: list[bytes]) -> None:
        """
        Random bytes, frames of any payload, oversized length prefixes, cut
        anywhere.
        """
        self.fuzz(master, feeding(chunks))

    @FUZZ
    @given(st.booleans(), valid_streams())
    def test_valid_frames(self, master: bool, chunks: list[bytes]) -> None:
        """
        Frames that pass the decoder: forged and replayed batches, heads
        ahead of the node, answers, messages, beacons, node lists, requests
        for its data.
        """
        self.fuzz(master, feeding(chunks))

    @FUZZ
    @given(st.data())
    def test_catch_up_answers(self, data: st.DataObject) -> None:
        """
        A fuzzer announces the genuine head of revision 3, then answers each
        request the node sends it (log, tree walk, diffs, fetches) with
        anything plausible or not.
        """
        def talk(fuzzer: Peer) -> None:
            fuzzer.send(wire.head_announcement(history().heads[2]))
            for _ in range(10):
                requests = [m for m in map(wire.decode, fuzzer.received())
                            if isinstance(m, REQUESTS)]
                for request in requests:
                    fuzzer.send(data.draw(answer_to(request)))
                if not requests:
                    return

        self.fuzz(False, talk)


@st.composite
def message_frames(draw: Callable) -> bytes:
    """
    A valid msg frame, or a msgs frame of 2 to 4 bodies: ids that repeat,
    origins that are the peers or the node itself, bodies of any JSON,
    unicode, huge ints, or arrays nested up to 100 deep (as deep as a table
    object may be).
    """
    bodies = draw(st.lists(json_values | st.text(st.characters(codec="utf-8"))
                           | st.sampled_from(["@"]), min_size=1, max_size=4))
    frame = wire.message_frame(
        draw(st.sampled_from(["m1", "m2", "m3"]) | message_ids),
        draw(st.sampled_from([FUZZER_ID, NEIGHBOUR_ID, SELF_ID]) | node_ids),
        [wire.body_bytes(body) for body in bodies])
    depth = draw(st.integers(1, 100))
    return frame.replace(b'"@"', b"[" * depth + b"]" * depth)


class MessageFloodTests(NodeHarness, SynchronousTestCase):
    """
    Valid msg and msgs frames from two peers: each message id reaches the
    node's observers at most once (never the node's own), is forwarded once
    to the other peer and never back, and nobody is dropped.
    """

    @FUZZ
    @given(st.lists(st.tuples(st.booleans(), message_frames()), max_size=12))
    def test_each_message_once(self, messages: list[tuple[bool, bytes]]) -> None:
        node = DistributedTable(port=0, key=KEY, reactor=MemoryReactorClock(), **OPTIONS)
        node.startService()
        recorder = Recorder()
        node.subscribe(recorder)
        peers = [Peer(node, FUZZER_ID, "203.0.113.9"), Peer(node, NEIGHBOUR_ID, "198.51.100.8")]
        for peer in peers:
            peer.hello()
            peer.received()
        expected_bodies: list[Any] = []
        expected_frames: list[list[bytes]] = [[], []]
        seen = set()
        for from_neighbour, frame in messages:
            peers[from_neighbour].send(frame)
            frame = frame.replace(SELF_ID.encode(), node.node_id.encode())
            message = wire.decode(frame)
            if message.id not in seen:  # type: ignore[union-attr]
                seen.add(message.id)  # type: ignore[union-attr]
                expected_frames[not from_neighbour].append(frame)
                if message.origin != node.node_id:  # type: ignore[union-attr]
                    expected_bodies.extend(message.bodies  # type: ignore[union-attr]
                                           if isinstance(message, wire.Messages)
                                           else [message.body])  # type: ignore[union-attr]
        self.assertEqual([args[0] for args in recorder.named("message_received")],
                         expected_bodies)
        self.assertEqual([peer.received() for peer in peers], expected_frames)
        self.assertEqual(set(node.links), {peer.protocol for peer in peers})
        for peer in peers:
            peer.lose()
        self.assert_no_failure_logged()
        self.assertIsNone(self.successResultOf(node.stopService()))


@st.composite
def made_up_batches(draw: Callable) -> bytes:
    """
    A batch at revision 3 on base 2 that the master did not publish: a
    forged head, or the genuine head with other objects.
    """
    head = attrs.evolve(draw(forged_heads()), rev=3, base=2)
    return draw(batch_frames(st.just(head) | head_ahead))


class CatchUpAnswerTests(NodeHarness, SynchronousTestCase):
    """
    Forged answers to a catch-up, as L{DispatcherFuzzTests.test_catch_up_answers}
    first found them.
    """

    @given(forged_heads(), st.booleans())
    def test_forged_answer_drops_the_peer(self, head: Head, in_tree: bool) -> None:
        """
        A peer that answers the catch-up with a head the master did not sign
        is dropped, and nothing is logged as a failure.
        """
        node = self.start_node(False)
        fuzzer = Peer(node, FUZZER_ID, "203.0.113.9")
        fuzzer.hello()
        fuzzer.send(wire.head_announcement(history().heads[2]))
        head = attrs.evolve(head, rev=3, base=2)
        if in_tree:
            fuzzer.send(wire.refusal(1, "not in the log"),
                        wire.tree_nodes(2, head, [wire.tree_node("", 4, bytes(16), None)]))
        else:
            fuzzer.send(wire.log_entries(1, [wire.batch(head, [], [])]))
        aborted = fuzzer.transport.aborted
        fuzzer.lose()
        self.assertEqual([f.getTraceback() for f in self.flushLoggedErrors()], [])
        self.assertTrue(aborted)
        self.assertIsNone(self.successResultOf(node.stopService()))

    @SHORT
    @given(made_up_batches())
    def test_partial_log_answer_reaches_observers(self, made_up: bytes) -> None:
        """
        A node at revision 1 gets a log answer with the genuine batch 2 and
        a made-up batch 3: whatever of it the table took, observers heard.
        """
        node = self.start_node(False, rev=1)
        recorder = Recorder()
        node.subscribe(recorder)
        seen = node.objects()
        fuzzer = Peer(node, FUZZER_ID, "203.0.113.9")
        fuzzer.hello()
        fuzzer.send(wire.head_announcement(history().heads[2]),
                    wire.log_entries(1, [history().frames[1], made_up]))
        for event, args in recorder.events:
            if event == "object_added":
                seen.append(args[0])
            elif event == "object_removed":
                seen.remove(args[0])
        self.assertEqual([f.getTraceback() for f in self.flushLoggedErrors()], [])
        self.assertEqual(sorted(map(canonical_bytes, seen)),
                         sorted(map(canonical_bytes, node.objects())))
        fuzzer.lose()
        self.assertIsNone(self.successResultOf(node.stopService()))
