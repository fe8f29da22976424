"""
Tests for L{dtable.wire}: every builder round-trips through decode(), and
every way a frame can break its schema is a L{ProtocolViolation} with a
reason that says what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dtable import wire
from dtable.canonical import canonical_bytes
from dtable.wire import (
    PROTOCOL_VERSION,
    Batch,
    Fetch,
    Head,
    HeadAnnouncement,
    Hello,
    Message,
    Objects,
    Ping,
    Pong,
    ProtocolViolation,
    Refusal,
    State,
    StateRequest,
)

NODE = "0123456789abcdef0123456789abcdef"
ROOT = "ab" * 32
OTHER_ROOT = "cd" * 32
SIG = "ef" * 64
MASTER = "12" * 32
HASH_A = "a" * 64
HASH_B = "b" * 64

SIGNED = Head(rev=5, base=4, root=ROOT, sig=SIG, master=MASTER)
EMPTY = Head(rev=0, base=0, root=ROOT)


def head_json(**changes: Any) -> dict[str, Any]:
    """
    A valid signed head as JSON, with C{changes} applied.
    """
    value = SIGNED.to_json()
    value.update(changes)
    return value


def hello_json(**changes: Any) -> dict[str, Any]:
    value = json.loads(wire.hello(NODE, 9999, "link", True, SIGNED))
    value.update(changes)
    return value


def frame(payload: Any) -> bytes:
    return json.dumps(payload).encode("utf-8")


class RoundTripTests(SynchronousTestCase):
    """
    What a builder makes, decode() reads back as the same value.
    """

    def test_hello(self) -> None:
        for role in wire.ROLES:
            for master in (True, False):
                for head in (SIGNED, EMPTY):
                    message = wire.decode(wire.hello(NODE, 10000, role, master, head))
                    self.assertEqual(
                        message,
                        Hello(version=PROTOCOL_VERSION, node_id=NODE, port=10000,
                              role=role, master=master, head=head),
                    )

    def test_ping_pong(self) -> None:
        self.assertEqual(wire.decode(wire.ping(7)), Ping(id=7))
        self.assertEqual(wire.decode(wire.pong(7)), Pong(id=7))

    def test_batch(self) -> None:
        adds = [{"name": "www", "ip": "192.0.2.1"}, {"n": 1, "t": ["ü", None, True]}]
        message = wire.decode(
            wire.batch(SIGNED, [canonical_bytes(o) for o in adds], [HASH_A, HASH_B])
        )
        self.assertEqual(
            message, Batch(head=SIGNED, adds=tuple(adds), removes=(HASH_A, HASH_B))
        )

    def test_empty_batch(self) -> None:
        message = wire.decode(wire.batch(SIGNED, [], []))
        self.assertEqual(message, Batch(head=SIGNED, adds=(), removes=()))

    def test_head_announcement(self) -> None:
        for head in (SIGNED, EMPTY):
            self.assertEqual(
                wire.decode(wire.head_announcement(head)), HeadAnnouncement(head=head)
            )

    def test_message(self) -> None:
        body = {"load": 0.3, "list": [1, "two", None], "text": "ü"}
        self.assertEqual(
            wire.decode(wire.message("m-1.a:b_c", NODE, body)),
            Message(id="m-1.a:b_c", origin=NODE, body=body),
        )

    def test_message_of_any_json_body(self) -> None:
        for body in (None, 3, "text", [1, 2], True):
            self.assertEqual(wire.decode(wire.message("m", NODE, body)).body, body)

    def test_message_body_not_json(self) -> None:
        """
        The builder refuses a body that is not JSON.
        """
        self.assertRaises(ValueError, wire.message, "m", NODE, float("nan"))

    def test_state_request(self) -> None:
        self.assertEqual(wire.decode(wire.state_request(3)), StateRequest(id=3))

    def test_state(self) -> None:
        self.assertEqual(
            wire.decode(wire.state(3, SIGNED, [HASH_A, HASH_B])),
            State(id=3, head=SIGNED, hashes=(HASH_A, HASH_B)),
        )

    def test_fetch(self) -> None:
        self.assertEqual(
            wire.decode(wire.fetch(4, [HASH_A])), Fetch(id=4, hashes=(HASH_A,))
        )

    def test_objects(self) -> None:
        objects = [{"a": 1}, {"b": {"c": [1.5, "ü"]}}]
        self.assertEqual(
            wire.decode(wire.objects(9, [canonical_bytes(o) for o in objects])),
            Objects(id=9, objects=tuple(objects)),
        )

    def test_empty_objects(self) -> None:
        self.assertEqual(wire.decode(wire.objects(9, [])), Objects(id=9, objects=()))

    def test_refusal(self) -> None:
        self.assertEqual(
            wire.decode(wire.refusal(2, "busy")), Refusal(id=2, reason="busy")
        )

    def test_frames_are_utf8_json_objects(self) -> None:
        """
        Every builder makes a compact UTF-8 JSON object with its type.
        """
        frames = {
            "hello": wire.hello(NODE, 1, "probe", False, EMPTY),
            "ping": wire.ping(1),
            "pong": wire.pong(1),
            "batch": wire.batch(SIGNED, [b'{"a":1}'], []),
            "head": wire.head_announcement(SIGNED),
            "msg": wire.message("m", NODE, {"x": "ü"}),
            "state?": wire.state_request(1),
            "state": wire.state(1, SIGNED, []),
            "fetch": wire.fetch(1, []),
            "objects": wire.objects(1, [b'{"a":1}']),
            "refused": wire.refusal(1, "no"),
        }
        for kind, data in frames.items():
            payload = json.loads(data.decode("utf-8"))
            self.assertEqual(payload["type"], kind)
            self.assertNotIn(b" ", data)


class EmbeddedBytesTests(SynchronousTestCase):
    """
    batch() and objects() embed each object's canonical bytes as given, so
    nothing is encoded twice.
    """

    OBJECTS = [{"name": "www", "ip": "192.0.2.1"}, {"z": [1, {"y": "ü"}], "a": None}]

    def test_batch_embeds_canonical_bytes(self) -> None:
        data = [canonical_bytes(o) for o in self.OBJECTS]
        built = wire.batch(SIGNED, data, [HASH_A])
        for item in data:
            self.assertIn(item, built)
        decoded = wire.decode(built)
        assert isinstance(decoded, Batch)
        self.assertEqual(list(decoded.adds), self.OBJECTS)
        self.assertEqual([canonical_bytes(o) for o in decoded.adds], data)
        self.assertEqual(decoded.removes, (HASH_A,))

    def test_objects_embeds_canonical_bytes(self) -> None:
        data = [canonical_bytes(o) for o in self.OBJECTS]
        built = wire.objects(12, data)
        for item in data:
            self.assertIn(item, built)
        decoded = wire.decode(built)
        assert isinstance(decoded, Objects)
        self.assertEqual(decoded.id, 12)
        self.assertEqual(list(decoded.objects), self.OBJECTS)


class ResponseIdTests(SynchronousTestCase):
    def test_responses(self) -> None:
        self.assertEqual(wire.response_id(Pong(id=1)), 1)
        self.assertEqual(wire.response_id(State(id=2, head=EMPTY, hashes=())), 2)
        self.assertEqual(wire.response_id(Objects(id=3, objects=())), 3)
        self.assertEqual(wire.response_id(Refusal(id=4, reason="")), 4)

    def test_not_responses(self) -> None:
        for message in (Ping(id=1), StateRequest(id=2), Fetch(id=3, hashes=()),
                        HeadAnnouncement(head=EMPTY)):
            self.assertIsNone(wire.response_id(message))


class RejectionTests(SynchronousTestCase):
    """
    decode() raises L{ProtocolViolation} with a useful reason for anything
    that breaks the contract.
    """

    def assertViolation(self, data: bytes, *words: str) -> ProtocolViolation:
        """
        decode(C{data}) raises ProtocolViolation whose reason holds every
        one of C{words}.
        """
        e = self.assertRaises(ProtocolViolation, wire.decode, data)
        self.assertEqual(e.reason, str(e))
        for word in words:
            self.assertIn(word, e.reason)
        return e

    def test_not_json(self) -> None:
        self.assertViolation(b"", "not UTF-8 JSON")
        self.assertViolation(b"{", "not UTF-8 JSON")
        self.assertViolation(b"hello", "not UTF-8 JSON")
        self.assertViolation(b'{"type":"ping","id":1} x', "not UTF-8 JSON")

    def test_not_utf8(self) -> None:
        self.assertViolation(b'{"type":"msg","body":"\xff"}', "not UTF-8 JSON")
        self.assertViolation(b"\xc3\x28", "not UTF-8 JSON")

    def test_utf16_and_utf32_are_not_utf8(self) -> None:
        """
        The wire is UTF-8: the same JSON in another Unicode encoding, or
        with a byte order mark, is a violation, not a message.
        """
        text = '{"type":"ping","id":1}'
        for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"):
            self.assertRaises(ProtocolViolation, wire.decode, text.encode(encoding))

    def test_encoded_surrogate_is_not_utf8(self) -> None:
        """
        A UTF-16 surrogate written out as three bytes (CESU-8) is not UTF-8.
        """
        data = (
            b'{"type":"msg","id":"m","origin":"' + NODE.encode()
            + b'","body":"\xed\xa0\x80"}'
        )
        self.assertRaises(ProtocolViolation, wire.decode, data)

    def test_nan_and_infinity_are_not_json(self) -> None:
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            data = (
                b'{"type":"msg","id":"m","origin":"' + NODE.encode()
                + b'","body":' + constant + b"}"
            )
            self.assertRaises(ProtocolViolation, wire.decode, data)

    def test_not_an_object(self) -> None:
        for payload in ([], "ping", 1, None, True, [{"type": "ping", "id": 1}]):
            self.assertViolation(frame(payload), "not a JSON object")

    def test_unknown_type(self) -> None:
        self.assertViolation(frame({"type": "gossip"}), "unknown frame type", "gossip")
        self.assertViolation(frame({"type": "PING", "id": 1}), "unknown frame type")
        self.assertViolation(frame({"id": 1}), "unknown frame type")
        for kind in (None, 1, True, ["ping"], {"ping": 1}):
            self.assertViolation(frame({"type": kind, "id": 1}), "unknown frame type")

    def test_unknown_type_reason_is_short(self) -> None:
        e = self.assertViolation(frame({"type": "x" * 10000}), "unknown frame type")
        self.assertLess(len(e.reason), 100)

    def test_missing_field(self) -> None:
        self.assertViolation(frame({"type": "ping"}), "ping", "missing id")
        payload = hello_json()
        del payload["head"]
        del payload["port"]
        self.assertViolation(frame(payload), "hello", "missing head, port")

    def test_unknown_field(self) -> None:
        self.assertViolation(frame({"type": "ping", "id": 1, "extra": 2}),
                             "ping", "unknown extra")
        self.assertViolation(frame(hello_json(colour="blue")), "unknown colour")

    def test_missing_and_unknown_field(self) -> None:
        self.assertViolation(frame({"type": "pong", "ident": 1}),
                             "missing id", "unknown ident")

    def test_head_fields(self) -> None:
        head = head_json()
        del head["sig"]
        self.assertViolation(frame({"type": "head", "head": head}), "missing sig")
        self.assertViolation(
            frame({"type": "head", "head": head_json(extra=1)}), "unknown extra"
        )
        self.assertViolation(frame({"type": "head", "head": [1, 2]}),
                             "head must be an object")

    def test_bool_is_not_int(self) -> None:
        self.assertViolation(frame({"type": "ping", "id": True}), "id must be an integer")
        self.assertViolation(frame({"type": "head", "head": head_json(rev=True)}),
                             "head.rev must be an integer")
        self.assertViolation(frame(hello_json(port=False)), "port must be an integer")

    def test_str_or_float_is_not_int(self) -> None:
        self.assertViolation(frame({"type": "ping", "id": "1"}), "id must be an integer")
        self.assertViolation(frame({"type": "ping", "id": 1.0}), "id must be an integer")
        self.assertViolation(frame({"type": "ping", "id": None}), "id must be an integer")

    def test_negative_int(self) -> None:
        self.assertViolation(frame({"type": "pong", "id": -1}), "id must be an integer")
        self.assertViolation(frame({"type": "head", "head": head_json(base=-1)}),
                             "head.base")

    def test_huge_int(self) -> None:
        self.assertViolation(frame({"type": "ping", "id": 2**63}), "id must be an integer")
        self.assertViolation(frame({"type": "ping", "id": 10**100}), "id must be an integer")
        self.assertEqual(wire.decode(frame({"type": "ping", "id": 2**63 - 1})),
                         Ping(id=2**63 - 1))

    def test_int_too_long_to_parse(self) -> None:
        self.assertViolation(b'{"type":"ping","id":' + b"9" * 5000 + b"}",
                             "not UTF-8 JSON")

    def test_port_range(self) -> None:
        self.assertViolation(frame(hello_json(port=65536)), "port must be an integer")
        self.assertEqual(wire.decode(frame(hello_json(port=0))).port, 0)

    def test_bool_field(self) -> None:
        for value in (1, 0, "true", None):
            self.assertViolation(frame(hello_json(master=value)), "master must be true or false")

    def test_bad_hex(self) -> None:
        for bad in ("AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, "ab" * 32 + "\n", 12):
            self.assertViolation(frame({"type": "head", "head": head_json(root=bad)}),
                                 "head.root is malformed")
            self.assertViolation(frame({"type": "fetch", "id": 1, "hashes": [bad]}),
                                 "hashes is malformed")
        self.assertViolation(frame({"type": "head", "head": head_json(sig="ef" * 63)}),
                             "head.sig is malformed")
        self.assertViolation(frame({"type": "head", "head": head_json(master="AB" * 32)}),
                             "head.master is malformed")

    def test_bad_node_id(self) -> None:
        for bad in (NODE.upper(), NODE[:-1], NODE + "0", "node-1", 7):
            self.assertViolation(frame(hello_json(node_id=bad)), "node_id is malformed")
        self.assertViolation(
            frame({"type": "msg", "id": "m", "origin": "x", "body": None}),
            "origin is malformed",
        )

    def test_bad_message_id(self) -> None:
        for bad in ("", "a" * 65, "a b", "ü", 5):
            self.assertViolation(
                frame({"type": "msg", "id": bad, "origin": NODE, "body": None}),
                "id is malformed",
            )

    def test_lists(self) -> None:
        self.assertViolation(frame({"type": "fetch", "id": 1, "hashes": HASH_A}),
                             "hashes must be a list")
        self.assertViolation(frame({"type": "objects", "id": 1, "objects": {"a": 1}}),
                             "objects must be a list")
        self.assertViolation(frame({"type": "objects", "id": 1, "objects": [[1]]}),
                             "objects must hold JSON objects")
        self.assertViolation(
            frame({"type": "batch", "head": head_json(), "add": [1], "remove": []}),
            "add must hold JSON objects",
        )
        self.assertViolation(
            frame({"type": "batch", "head": head_json(), "add": [], "remove": ["x"]}),
            "remove is malformed",
        )

    def test_refusal_reason(self) -> None:
        self.assertViolation(frame({"type": "refused", "id": 1, "reason": 3}),
                             "reason must be a short string")
        self.assertViolation(frame({"type": "refused", "id": 1, "reason": "x" * 1001}),
                             "reason must be a short string")

    def test_signed_head_at_revision_zero(self) -> None:
        unsigned = {"rev": 0, "base": 0, "root": ROOT, "sig": "", "master": ""}
        for changes in ({"sig": SIG}, {"master": MASTER}, {"sig": SIG, "master": MASTER},
                        {"base": 1}):
            self.assertViolation(
                frame({"type": "head", "head": {**unsigned, **changes}}),
                "revision 0 carries no signature",
            )
        self.assertEqual(wire.decode(frame({"type": "head", "head": unsigned})),
                         HeadAnnouncement(head=Head(rev=0, base=0, root=ROOT)))

    def test_unsigned_head_above_revision_zero(self) -> None:
        self.assertViolation(
            frame({"type": "head", "head": head_json(sig="", master="")}),
            "head.sig is malformed",
        )

    def test_base_not_below_rev(self) -> None:
        for rev, base in ((5, 5), (5, 6), (1, 1)):
            self.assertViolation(
                frame({"type": "head", "head": head_json(rev=rev, base=base)}),
                "head.base must be below head.rev",
            )

    def test_batch_at_revision_zero(self) -> None:
        self.assertViolation(
            frame({"type": "batch", "head": EMPTY.to_json(), "add": [], "remove": []}),
            "revision 0",
        )

    def test_protocol_version(self) -> None:
        self.assertViolation(frame(hello_json(version=2)),
                             "protocol version 2 is not supported")
        self.assertViolation(frame(hello_json(version=0)), "version must be an integer")
        self.assertViolation(frame(hello_json(version="1")), "version must be an integer")

    def test_bad_role(self) -> None:
        for role in ("primary", "", None, ["link"], {"link": 1}):
            self.assertViolation(frame(hello_json(role=role)), "role must be one of")

    def test_deep_nesting(self) -> None:
        """
        A frame nested far deeper than the parser can follow is a violation,
        not a RecursionError.
        """
        self.assertViolation(b"[" * 100000 + b"]" * 100000, "not UTF-8 JSON")
        self.assertViolation(b"[" * 100000, "not UTF-8 JSON")
        self.assertViolation(
            b'{"type":"msg","id":"m","origin":"' + NODE.encode() + b'","body":'
            + b"[" * 100000 + b"]" * 100000 + b"}",
            "not UTF-8 JSON",
        )
        self.assertViolation(b'{"type":' + b'{"a":' * 100000 + b"1" + b"}" * 100001,
                             "not UTF-8 JSON")

    def test_nested_type_value(self) -> None:
        """
        A deeply nested (but parseable) type value is reported without
        trouble.
        """
        self.assertViolation(
            b'{"type":' + b"[" * 500 + b"]" * 500 + b"}", "unknown frame type"
        )


# Property tests ----------------------------------------------------------------

_FIELD_NAMES = [
    "type", "version", "node_id", "port", "role", "master", "head", "id",
    "hashes", "objects", "reason", "origin", "body", "add", "remove", "rev",
    "base", "root", "sig",
]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from([NODE, ROOT, SIG, MASTER, "link", "probe", "", 0, 1, PROTOCOL_VERSION])
)

_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=4), children,
                      max_size=6),
    max_leaves=20,
)

_heads = st.fixed_dictionaries(
    {},
    optional={
        "rev": st.integers(min_value=-1, max_value=3) | _scalars,
        "base": st.integers(min_value=-1, max_value=3) | _scalars,
        "root": st.sampled_from([ROOT, "", "x"]) | _scalars,
        "sig": st.sampled_from([SIG, ""]) | _scalars,
        "master": st.sampled_from([MASTER, ""]) | _scalars,
    },
)

_KINDS = ["hello", "ping", "pong", "batch", "head", "msg", "state?", "state", "fetch",
          "objects", "refused"]

_types = st.sampled_from(_KINDS) | _json

_frames = st.builds(
    lambda kind, fields: {**fields, "type": kind},
    _types,
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _json | _heads, max_size=7),
)


class PropertyTests(SynchronousTestCase):
    """
    Whatever arrives, decode() answers with a message or ProtocolViolation,
    never another exception.
    """

    def _decode(self, data: bytes) -> None:
        try:
            message = wire.decode(data)
        except ProtocolViolation as e:
            self.assertIsInstance(e.reason, str)
        else:
            self.assertIn(type(message).__name__, {
                "Hello", "Ping", "Pong", "Batch", "HeadAnnouncement", "Message",
                "StateRequest", "State", "Fetch", "Objects", "Refusal",
            })

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        self._decode(data)

    @settings(max_examples=500, deadline=None)
    @given(_frames)
    def test_arbitrary_objects(self, payload: dict[str, Any]) -> None:
        self._decode(json.dumps(payload).encode("utf-8"))

    @settings(max_examples=100, deadline=None)
    @given(
        st.integers(min_value=1, max_value=2**63 - 1),
        st.integers(min_value=0, max_value=2**63 - 2),
        st.sampled_from(wire.ROLES),
        st.booleans(),
        st.integers(min_value=0, max_value=65535),
    )
    def test_valid_hellos_round_trip(self, rev: int, base: int, role: str,
                                     master: bool, port: int) -> None:
        base = min(base, rev - 1)
        head = Head(rev=rev, base=base, root=ROOT, sig=SIG, master=MASTER)
        message = wire.decode(wire.hello(NODE, port, role, master, head))
        self.assertEqual(message, Hello(version=PROTOCOL_VERSION, node_id=NODE,
                                        port=port, role=role, master=master, head=head))
