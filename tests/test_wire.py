"""
Tests for L{dtable.wire}: every builder round-trips through decode(), and
every way a frame can break its schema is a L{ProtocolViolation} with a
reason that says what is wrong.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dtable import wire
from dtable.canonical import MAX_DEPTH, canonical_bytes
from dtable.wire import (
    DIGEST_BYTES,
    MAX_PREFIXES,
    PROTOCOL_VERSION,
    SHORT_HASH,
    Batch,
    Diff,
    DiffRequest,
    Fetch,
    Head,
    HeadAnnouncement,
    Hello,
    LogEntries,
    LogRequest,
    Message,
    Messages,
    Objects,
    Ping,
    Pong,
    ProtocolViolation,
    Refusal,
    TreeNode,
    TreeNodes,
    TreeRequest,
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

DIGEST = bytes(range(32))
SHORT_A = bytes.fromhex(HASH_A)[:SHORT_HASH]
SHORT_B = bytes.fromhex(HASH_B)[:SHORT_HASH]
CHILDREN = [(bytes([i]) * 32, i * 3) for i in range(16)]


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


def signed(rev: int) -> Head:
    """
    A signed-looking head for the batch from C{rev - 1} to C{rev}.
    """
    return Head(rev=rev, base=rev - 1, root=ROOT, sig=SIG, master=MASTER)


def batch_json(head: Head, **changes: Any) -> dict[str, Any]:
    """
    A valid batch as JSON, as it sits inside a log answer, with C{changes}
    applied.
    """
    value = json.loads(wire.batch(head, [b'{"a":1}'], [HASH_A]))
    value.update(changes)
    return value


def log_json(*batches: Any) -> dict[str, Any]:
    return {"type": "log", "id": 1, "batches": list(batches)}


def node_json(**changes: Any) -> dict[str, Any]:
    """
    A valid internal tree node as JSON, with C{changes} applied.
    """
    value = wire.tree_node("a", 48, DIGEST, CHILDREN)
    value.update(changes)
    return value


def tree_json(*nodes: Any) -> dict[str, Any]:
    return {"type": "tree", "id": 1, "head": head_json(), "nodes": list(nodes)}


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

    def test_batch_keeps_the_bytes_it_came_as(self) -> None:
        """
        A decoded batch carries each added object's bytes exactly as they
        were in the frame (hashes are taken over them), spaces included.
        """
        adds = [{"name": "www", "ip": "192.0.2.1"}, {"n": 1, "t": ["ü", None, True]}]
        data = [canonical_bytes(o) for o in adds]
        message = wire.decode(wire.batch(SIGNED, data, [HASH_A]))
        self.assertEqual(message.add_data, tuple(data))
        spaced = wire.batch(SIGNED, [b'{ "n" : 1 }', b"{}"], [])
        message = wire.decode(spaced.replace(b'"add":[', b'"add" : [ ', 1))
        self.assertEqual(message.adds, ({"n": 1}, {}))
        self.assertEqual(message.add_data, (b'{ "n" : 1 }', b"{}"))

    def test_object_nested_too_deep(self) -> None:
        """
        An added object nested deeper than a table object may be is refused
        with the frame, though the frame itself is within its limit.
        """
        deep = b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
        self.assertRaises(ProtocolViolation, wire.decode, wire.batch(SIGNED, [deep], []))
        fits = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
        [obj] = wire.decode(wire.batch(SIGNED, [fits], [])).adds
        self.assertEqual(canonical_bytes(obj), fits)

    def test_large_objects_nested_too_deep(self) -> None:
        """
        Past a few KiB an object's brackets are found rather than counted:
        the limit holds the same, and brackets in its strings are no levels.
        """
        pad = "p" * 10_000
        deep = (f'{{"pad":"{pad}","a":'.encode() + b"[" * MAX_DEPTH
                + b"]" * MAX_DEPTH + b"}")
        self.assertRaises(ProtocolViolation, wire.decode, wire.batch(SIGNED, [deep], []))
        frame = wire.objects(1, [deep])
        self.assertRaises(ProtocolViolation, wire.decode, frame)
        fits = (b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1)
                + f',"pad":"{pad}"}}'.encode())
        [obj] = wire.decode(wire.batch(SIGNED, [fits], [])).adds
        self.assertEqual(canonical_bytes(obj), fits)
        brackets = canonical_bytes({"s": "[{" * 5000, "t": [[1]]})
        message = wire.decode(wire.batch(SIGNED, [brackets], []))
        self.assertEqual(message.add_data, (brackets,))

    def test_bytes_kept_from_text_that_is_not_ascii(self) -> None:
        """
        An ASCII frame's objects are sliced from its bytes; any other
        frame's from its text, encoded again: the same bytes either way.
        """
        for value in ("ascii", "ü", "\u2603 snow", "\U0001f600"):
            data = [canonical_bytes({"v": value}), canonical_bytes({"w": [value] * 3})]
            message = wire.decode(wire.batch(SIGNED, data, []))
            self.assertEqual(message.add_data, tuple(data))
            self.assertEqual([type(d) for d in message.add_data], [bytes, bytes])

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

    def test_messages(self) -> None:
        """
        Bodies sent together: one C{msgs} frame from the bodies' bytes, each
        body as it was; a lone body makes a C{msg} frame.
        """
        bodies = [{"load": 0.3}, [1, "two", None], "ü", None]
        frame = wire.message_frame("m-2", NODE, [wire.body_bytes(b) for b in bodies])
        self.assertEqual(wire.decode(frame), Messages(id="m-2", origin=NODE, bodies=tuple(bodies)))
        self.assertEqual(wire.message_frame("m-3", NODE, [wire.body_bytes({"a": 1})]),
                         wire.message("m-3", NODE, {"a": 1}))
        self.assertRaises(ValueError, wire.body_bytes, float("inf"))

    def test_message_body_not_json(self) -> None:
        """
        The builder refuses a body that is not JSON.
        """
        self.assertRaises(ValueError, wire.message, "m", NODE, float("nan"))

    def test_log_request(self) -> None:
        self.assertEqual(wire.decode(wire.log_request(3, 0)), LogRequest(id=3, since=0))
        self.assertEqual(wire.decode(wire.log_request(3, 41)), LogRequest(id=3, since=41))

    def test_log_entries(self) -> None:
        adds = [{"name": "www"}, {"n": ["ü"]}]
        frames = [
            wire.batch(signed(5), [canonical_bytes(o) for o in adds], [HASH_A]),
            wire.batch(signed(6), [], [HASH_B]),
            wire.batch(signed(7), [canonical_bytes(adds[0])], []),
        ]
        self.assertEqual(
            wire.decode(wire.log_entries(3, frames)),
            LogEntries(id=3, batches=(
                Batch(head=signed(5), adds=tuple(adds), removes=(HASH_A,)),
                Batch(head=signed(6), adds=(), removes=(HASH_B,)),
                Batch(head=signed(7), adds=(adds[0],), removes=()),
            )),
        )

    def test_log_entries_keep_their_frames(self) -> None:
        frames = [wire.batch(signed(5), [b'{"name":"www"}'], [HASH_A]),
                  wire.batch(signed(6), [], [HASH_B])]
        message = wire.decode(wire.log_entries(3, frames))
        self.assertEqual(message.frames, tuple(frames))
        self.assertEqual(message.batches[0].add_data, (b'{"name":"www"}',))

    def test_objects_keep_their_bytes(self) -> None:
        data = [b'{"a":"\xc3\xbc"}', b'{"b":[1,2.5]}']
        self.assertEqual(wire.decode(wire.objects(9, data)).data, tuple(data))

    def test_empty_log_entries(self) -> None:
        self.assertEqual(wire.decode(wire.log_entries(3, [])),
                         LogEntries(id=3, batches=()))

    def test_log_batches_may_skip_revisions(self) -> None:
        """
        Consecutive means each batch starts where the one before ended, not
        that revisions go up by one.
        """
        first = Head(rev=5, base=2, root=ROOT, sig=SIG, master=MASTER)
        second = Head(rev=9, base=5, root=ROOT, sig=SIG, master=MASTER)
        message = wire.decode(wire.log_entries(
            1, [wire.batch(first, [], []), wire.batch(second, [], [])]))
        assert isinstance(message, LogEntries)
        self.assertEqual([b.head for b in message.batches], [first, second])

    def test_tree_request(self) -> None:
        prefixes = ["", "0", "af", "0123456789abcdef", "f" * 63]
        self.assertEqual(wire.decode(wire.tree_request(8, prefixes)),
                         TreeRequest(id=8, prefixes=tuple(prefixes)))
        self.assertEqual(wire.decode(wire.tree_request(8, [])),
                         TreeRequest(id=8, prefixes=()))
        many = [f"{i:04x}" for i in range(MAX_PREFIXES)]
        message = wire.decode(wire.tree_request(8, many))
        assert isinstance(message, TreeRequest)
        self.assertEqual(message.prefixes, tuple(many))

    def test_tree_nodes(self) -> None:
        """
        Leaves have no children; an internal node has 16. Digests travel
        truncated to DIGEST_BYTES.
        """
        nodes = [
            wire.tree_node("", 0, bytes(32), None),
            wire.tree_node("a", 48, DIGEST, CHILDREN),
            wire.tree_node("f" * 63, 1, DIGEST, None),
        ]
        self.assertEqual(
            wire.decode(wire.tree_nodes(6, SIGNED, nodes)),
            TreeNodes(id=6, head=SIGNED, nodes=(
                TreeNode(prefix="", count=0, digest=bytes(DIGEST_BYTES), children=None),
                TreeNode(prefix="a", count=48, digest=DIGEST[:DIGEST_BYTES],
                         children=tuple((d[:DIGEST_BYTES], n) for d, n in CHILDREN)),
                TreeNode(prefix="f" * 63, count=1, digest=DIGEST[:DIGEST_BYTES],
                         children=None),
            )),
        )

    def test_empty_tree_nodes(self) -> None:
        self.assertEqual(wire.decode(wire.tree_nodes(6, EMPTY, [])),
                         TreeNodes(id=6, head=EMPTY, nodes=()))

    def test_digests_of_exactly_digest_bytes(self) -> None:
        digest = DIGEST[:DIGEST_BYTES]
        message = wire.decode(wire.tree_nodes(
            6, SIGNED, [wire.tree_node("", 2, digest, [(digest, 1)] * 16)]))
        assert isinstance(message, TreeNodes)
        [node] = message.nodes
        self.assertEqual(node.digest, digest)
        self.assertEqual(node.children, ((digest, 1),) * 16)

    def test_diff_request(self) -> None:
        self.assertEqual(
            wire.decode(wire.diff_request(4, "ab", [SHORT_A, SHORT_B])),
            DiffRequest(id=4, prefix="ab", have=(SHORT_A, SHORT_B)),
        )
        self.assertEqual(wire.decode(wire.diff_request(4, "", [])),
                         DiffRequest(id=4, prefix="", have=()))

    def test_diff(self) -> None:
        self.assertEqual(
            wire.decode(wire.diff(4, 12, [HASH_A, HASH_B], [SHORT_B])),
            Diff(id=4, rev=12, missing=(HASH_A, HASH_B), extra=(SHORT_B,)),
        )
        self.assertEqual(wire.decode(wire.diff(4, 0, [], [])),
                         Diff(id=4, rev=0, missing=(), extra=()))

    def test_pack(self) -> None:
        self.assertEqual(wire.pack([]), "")
        self.assertEqual(wire.pack([b"ab", b"c"]), "YWJj")
        self.assertEqual(base64.b64decode(wire.pack(iter([SHORT_A, SHORT_B]))),
                         SHORT_A + SHORT_B)

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
            "log?": wire.log_request(1, 0),
            "log": wire.log_entries(1, [wire.batch(SIGNED, [], [])]),
            "tree?": wire.tree_request(1, ["", "a"]),
            "tree": wire.tree_nodes(1, SIGNED, [wire.tree_node("a", 48, DIGEST, CHILDREN)]),
            "diff?": wire.diff_request(1, "a", [SHORT_A]),
            "diff": wire.diff(1, 5, [HASH_A], [SHORT_B]),
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

    def test_log_entries_embed_batch_frames(self) -> None:
        """
        A log answer carries each batch frame as it was, so a node serves
        its log without encoding anything again.
        """
        data = [canonical_bytes(o) for o in self.OBJECTS]
        frames = [wire.batch(signed(5), data, [HASH_A]),
                  wire.batch(signed(6), [], [HASH_B])]
        built = wire.log_entries(7, frames)
        for item in frames:
            self.assertIn(item, built)
        decoded = wire.decode(built)
        assert isinstance(decoded, LogEntries)
        self.assertEqual(decoded.id, 7)
        self.assertEqual(list(decoded.batches), [wire.decode(f) for f in frames])
        self.assertEqual([canonical_bytes(o) for o in decoded.batches[0].adds], data)


class ResponseIdTests(SynchronousTestCase):
    def test_responses(self) -> None:
        self.assertEqual(wire.response_id(Pong(id=1)), 1)
        self.assertEqual(wire.response_id(Objects(id=3, objects=())), 3)
        self.assertEqual(wire.response_id(Refusal(id=4, reason="")), 4)
        self.assertEqual(wire.response_id(LogEntries(id=5, batches=())), 5)
        self.assertEqual(wire.response_id(TreeNodes(id=6, head=EMPTY, nodes=())), 6)
        self.assertEqual(wire.response_id(Diff(id=7, rev=0, missing=(), extra=())), 7)

    def test_not_responses(self) -> None:
        for message in (Ping(id=1), Fetch(id=3, hashes=()), HeadAnnouncement(head=EMPTY),
                        LogRequest(id=4, since=0), TreeRequest(id=5, prefixes=("",)),
                        DiffRequest(id=6, prefix="", have=()),
                        Batch(head=SIGNED, adds=(), removes=())):
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

    def test_messages_count_bounded(self) -> None:
        """
        A C{msgs} frame carries 2 to MAX_BUNDLE bodies in a list.
        """
        for bodies in ([], [1], list(range(wire.MAX_BUNDLE + 1)), {"a": 1}, "ab"):
            self.assertViolation(frame({"type": "msgs", "id": "m", "origin": NODE,
                                        "bodies": bodies}), "bodies must be a list")
        for bodies in ([1, 2], list(range(wire.MAX_BUNDLE))):
            self.assertEqual(wire.decode(frame({"type": "msgs", "id": "m", "origin": NODE,
                                                "bodies": bodies})).bodies, tuple(bodies))
        self.assertViolation(frame({"type": "msgs", "id": "m", "origin": "x", "bodies": [1, 2]}),
                             "origin is malformed")
        self.assertViolation(frame({"type": "msgs", "id": "", "origin": NODE, "bodies": [1, 2]}),
                             "id is malformed")
        self.assertViolation(frame({"type": "msgs", "id": "m", "origin": NODE, "body": [1, 2]}),
                             "msgs")

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

    # Catch-up messages --------------------------------------------------------

    def test_log_request_since(self) -> None:
        for bad in (-1, "0", None, 1.0, True, 2**63):
            self.assertViolation(frame({"type": "log?", "id": 1, "since": bad}),
                                 "since must be an integer")
        self.assertViolation(frame({"type": "log?", "id": 1}), "log?", "missing since")

    def test_log_entries_not_consecutive(self) -> None:
        for revs in ((5, 7), (5, 5), (6, 5), (5, 6, 8)):
            self.assertViolation(
                frame(log_json(*(batch_json(signed(rev)) for rev in revs))),
                "log batches are not consecutive",
            )
        gap = [wire.batch(signed(5), [], []), wire.batch(signed(7), [], [])]
        self.assertViolation(wire.log_entries(1, gap), "not consecutive")

    def test_log_entry_not_a_batch(self) -> None:
        untyped = batch_json(signed(5))
        del untyped["type"]
        for entry in (
            json.loads(wire.ping(1)),
            json.loads(wire.head_announcement(SIGNED)),
            batch_json(signed(5), type="objects"),
            untyped,
            [batch_json(signed(5))],
            "batch",
            None,
            3,
        ):
            self.assertViolation(frame(log_json(entry)), "log entries must be batches")
        self.assertViolation(
            frame(log_json(batch_json(signed(5)), json.loads(wire.pong(2)))),
            "log entries must be batches",
        )
        self.assertViolation(wire.log_entries(1, [wire.ping(1)]),
                             "log entries must be batches")

    def test_log_entry_breaks_the_batch_schema(self) -> None:
        self.assertViolation(frame(log_json(batch_json(signed(5), extra=1))),
                             "batch", "unknown extra")
        self.assertViolation(frame(log_json(batch_json(signed(5), remove=["x"]))),
                             "remove is malformed")
        self.assertViolation(frame(log_json(batch_json(signed(5), add=[1]))),
                             "add must hold JSON objects")
        unsigned = batch_json(signed(5))
        unsigned["head"]["sig"] = ""
        self.assertViolation(frame(log_json(unsigned)), "head.sig is malformed")
        at_zero = batch_json(signed(5))
        at_zero["head"] = EMPTY.to_json()
        self.assertViolation(frame(log_json(at_zero)), "revision 0")

    def test_log_entries_fields(self) -> None:
        self.assertViolation(frame({"type": "log", "id": 1, "batches": {}}),
                             "batches must be a list")
        self.assertViolation(frame({"type": "log", "id": 1}), "log", "missing batches")
        self.assertViolation(frame({"type": "log", "id": -1, "batches": []}),
                             "id must be an integer")

    def test_tree_prefixes(self) -> None:
        for bad in ("a" * 64, "f" * 100, "g", "0x1", "AB", "ab ", " ", "ü", 12, None,
                    ["a"]):
            self.assertViolation(frame({"type": "tree?", "id": 1, "prefixes": [bad]}),
                                 "prefix is malformed")
            self.assertViolation(
                frame({"type": "tree?", "id": 1, "prefixes": ["", "a", bad]}),
                "prefix is malformed",
            )
        self.assertViolation(frame({"type": "tree?", "id": 1, "prefixes": "ab"}),
                             "prefixes must be a list")

    def test_too_many_prefixes(self) -> None:
        prefixes = [f"{i:04x}" for i in range(MAX_PREFIXES + 1)]
        self.assertViolation(wire.tree_request(1, prefixes),
                             f"at most {MAX_PREFIXES} prefixes")
        self.assertViolation(wire.tree_request(1, [""] * (MAX_PREFIXES + 1)),
                             "prefixes per request")

    def test_tree_node_digest(self) -> None:
        for bad in ("!!!!", "AQ", "AQ=", "AQID\n", "ü", "a" * 22 + "="):
            self.assertViolation(frame(tree_json(node_json(d=bad))), "d is not base64")
        for bad in (None, 16, [wire.pack([DIGEST[:16]])]):
            self.assertViolation(frame(tree_json(node_json(d=bad))),
                                 "d must be a base64 string")
        for size in (1, 15, 17, 31, 33):
            self.assertViolation(frame(tree_json(node_json(d=wire.pack([bytes(size)])))),
                                 f"d is not a whole number of {DIGEST_BYTES}-byte items")
        for size in (0, 32, 48):
            self.assertViolation(frame(tree_json(node_json(d=wire.pack([bytes(size)])))),
                                 "d must hold one digest")

    def test_tree_node_children(self) -> None:
        digests = [d[:DIGEST_BYTES] for d, _ in CHILDREN]
        counts = [n for _, n in CHILDREN]
        for d, n in ((digests[:15], counts[:15]), (digests[:15], counts),
                     (digests, counts[:15]), (digests + digests[:1], counts + [1]),
                     ([], [])):
            self.assertViolation(
                frame(tree_json(node_json(c={"d": wire.pack(d), "n": n}))),
                "a node has 16 children",
            )
        self.assertViolation(
            frame(tree_json(node_json(c={"d": wire.pack(digests)[:-1], "n": counts}))),
            "c.d is not base64",
        )
        self.assertViolation(
            frame(tree_json(node_json(c={"d": wire.pack([bytes(17)] * 15), "n": counts}))),
            "c.d is not a whole number of 16-byte items",
        )
        self.assertViolation(
            frame(tree_json(node_json(c={"d": wire.pack(digests), "n": "0" * 16}))),
            "c.n must be a list",
        )
        for bad in (-1, "1", None, 1.5, True):
            self.assertViolation(
                frame(tree_json(node_json(c={"d": wire.pack(digests),
                                             "n": counts[:15] + [bad]}))),
                "c.n must be an integer",
            )
        for bad in ([], "c", 0, [wire.pack(digests), counts]):
            self.assertViolation(frame(tree_json(node_json(c=bad))),
                                 "c must be an object or null")
        self.assertViolation(
            frame(tree_json(node_json(c={"d": wire.pack(digests), "n": counts, "x": 1}))),
            "tree children", "unknown x",
        )
        self.assertViolation(frame(tree_json(node_json(c={"d": wire.pack(digests)}))),
                             "tree children", "missing n")

    def test_tree_node_fields(self) -> None:
        for bad in ("a" * 64, "G", 5):
            self.assertViolation(frame(tree_json(node_json(p=bad))), "p is malformed")
        for bad in (-1, "48", None, True):
            self.assertViolation(frame(tree_json(node_json(n=bad))), "n must be an integer")
        node = node_json()
        del node["c"]
        self.assertViolation(frame(tree_json(node)), "tree node", "missing c")
        self.assertViolation(frame(tree_json(node_json(children=None))),
                             "tree node", "unknown children")
        for bad in ([], "a", None, 1):
            self.assertViolation(frame(tree_json(node_json(), bad)),
                                 "tree nodes must be objects")
        self.assertViolation(frame({"type": "tree", "id": 1, "head": head_json(),
                                    "nodes": node_json()}), "nodes must be a list")
        self.assertViolation(frame({**tree_json(), "head": head_json(sig="x")}),
                             "head.sig is malformed")

    def test_diff_request_have(self) -> None:
        def request(have: Any, prefix: Any = "ab") -> bytes:
            return frame({"type": "diff?", "id": 1, "prefix": prefix, "have": have})

        for bad in ("!!!!!!!!!!!!", "AQ", "AQIDBAUGBwg", "AQIDBAUGBwg=\n", "ü" * 12,
                    "AQID BAUGBwg="):
            self.assertViolation(request(bad), "have is not base64")
        for bad in (None, 8, [wire.pack([SHORT_A])], {"a": 1}):
            self.assertViolation(request(bad), "have must be a base64 string")
        for size in (1, 7, 9, 15, 17, 33):
            self.assertViolation(request(wire.pack([bytes(size)])),
                                 f"have is not a whole number of {SHORT_HASH}-byte items")
        for bad in ("a" * 64, "x", "AB", None, 3):
            self.assertViolation(request(wire.pack([SHORT_A]), prefix=bad),
                                 "prefix is malformed")
        self.assertEqual(wire.decode(request(wire.pack([SHORT_A]), prefix="a" * 63)),
                         DiffRequest(id=1, prefix="a" * 63, have=(SHORT_A,)))

    def test_diff_widths(self) -> None:
        def answer(**changes: Any) -> bytes:
            value = json.loads(wire.diff(1, 5, [HASH_A], [SHORT_B]))
            value.update(changes)
            return frame(value)

        for size in (8, 31, 33, 63):
            self.assertViolation(answer(missing=wire.pack([bytes(size)])),
                                 "missing is not a whole number of 32-byte items")
        for size in (7, 16 + 1, 32 + 4):
            self.assertViolation(answer(extra=wire.pack([bytes(size)])),
                                 f"extra is not a whole number of {SHORT_HASH}-byte items")
        self.assertViolation(answer(missing="%%%%"), "missing is not base64")
        self.assertViolation(answer(extra="AB"), "extra is not base64")
        self.assertViolation(answer(missing=[HASH_A]), "missing must be a base64 string")
        self.assertViolation(answer(rev=-1), "rev must be an integer")
        self.assertViolation(answer(rev="5"), "rev must be an integer")
        self.assertViolation(answer(extra2=""), "diff", "unknown extra2")

    def test_packed_hashes_are_not_hex(self) -> None:
        """
        Packed fields carry raw bytes: hex text where base64 is expected is
        read as base64 and fails the item width, not silently accepted.
        """
        self.assertViolation(
            frame({"type": "diff", "id": 1, "rev": 1, "missing": HASH_A, "extra": ""}),
            "missing is not a whole number of 32-byte items",
        )

    def test_protocol_version(self) -> None:
        for other in (PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1):
            self.assertViolation(frame(hello_json(version=other)),
                                 f"protocol version {other} is not supported")
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
        trouble: as too deep, before its type is looked at.
        """
        self.assertViolation(
            b'{"type":' + b"[" * 500 + b"]" * 500 + b"}", "nested deeper than"
        )
        self.assertViolation(
            b'{"type":' + b"[" * 50 + b"]" * 50 + b"}", "unknown frame type"
        )


# Property tests ----------------------------------------------------------------

_FIELD_NAMES = [
    "type", "version", "node_id", "port", "role", "master", "head", "id",
    "hashes", "objects", "reason", "origin", "body", "add", "remove", "rev",
    "base", "root", "sig", "since", "batches", "prefixes", "nodes", "prefix",
    "have", "missing", "extra", "p", "n", "d", "c",
]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from([NODE, ROOT, SIG, MASTER, "link", "probe", "", 0, 1, PROTOCOL_VERSION,
                       "batch", wire.pack([DIGEST[:DIGEST_BYTES]]), wire.pack([SHORT_A]),
                       wire.pack([bytes(32)]), "AQ=", "a"])
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

_KINDS = ["hello", "ping", "pong", "batch", "head", "msg", "fetch", "objects",
          "refused", "log?", "log", "tree?", "tree", "diff?", "diff"]

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
                "Fetch", "Objects", "Refusal", "LogRequest", "LogEntries",
                "TreeRequest", "TreeNodes", "DiffRequest", "Diff",
            })

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        self._decode(data)

    @settings(max_examples=500, deadline=None)
    @given(_frames)
    def test_arbitrary_objects(self, payload: dict[str, Any]) -> None:
        self._decode(json.dumps(payload).encode("utf-8"))

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(_FIELD_NAMES), _json, max_size=7),
           st.sampled_from([None, 0, 2]), st.booleans())
    def test_parsed_as_the_json_decoder_parses(self, payload: dict[str, Any],
                                               indent: int | None,
                                               spaced: bool) -> None:
        """
        Frames are parsed value by value, keeping the text of some lists'
        items; the result is what the JSON decoder makes of the same text,
        however it is laid out.
        """
        text = json.dumps(payload, indent=indent, ensure_ascii=spaced,
                          separators=(" , ", " : ") if spaced else (",", ":"))
        self.assertEqual(wire._parse_frame(text), json.loads(text))
        self.assertEqual(wire._parse_frame(f" \n{text}\t"), json.loads(text))

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


# Discovery: nodes and beacons --------------------------------------------------

OTHER_NODE = "fedcba9876543210fedcba9876543210"


def nodes_json(*entries: Any) -> dict[str, Any]:
    return {"type": "nodes", "nodes": list(entries)}


def beacon_json(**changes: Any) -> dict[str, Any]:
    value = json.loads(wire.beacon("b-1", NODE))
    value.update(changes)
    return value


class NodesRoundTripTests(SynchronousTestCase):
    """
    wire.nodes() and wire.beacon() read back as L{wire.Nodes} and
    L{wire.Beacon}.
    """

    def test_nodes(self) -> None:
        entries = [(NODE, "10.0.0.1", 10000), (OTHER_NODE, "::1", 1),
                   (NODE, "2001:db8::5", 65535)]
        message = wire.decode(wire.nodes(entries))
        self.assertEqual(message, wire.Nodes(nodes=(
            wire.NodeAddress(node_id=NODE, host="10.0.0.1", port=10000),
            wire.NodeAddress(node_id=OTHER_NODE, host="::1", port=1),
            wire.NodeAddress(node_id=NODE, host="2001:db8::5", port=65535),
        )))

    def test_nodes_from_any_iterable(self) -> None:
        message = wire.decode(wire.nodes(iter([(NODE, "127.0.0.1", 5)])))
        self.assertEqual(message.nodes, (wire.NodeAddress(NODE, "127.0.0.1", 5),))

    def test_empty_nodes(self) -> None:
        self.assertEqual(wire.decode(wire.nodes([])), wire.Nodes(nodes=()))

    def test_nodes_frame(self) -> None:
        self.assertEqual(json.loads(wire.nodes([(NODE, "10.0.0.1", 7)])),
                         {"type": "nodes", "nodes": [[NODE, "10.0.0.1", 7]]})

    def test_mapped_ipv4_host_as_given(self) -> None:
        message = wire.decode(wire.nodes([(NODE, "::ffff:127.0.0.1", 5)]))
        self.assertEqual(message.nodes[0].host, "::ffff:127.0.0.1")

    def test_max_nodes(self) -> None:
        entries = [(NODE, f"10.0.{i // 256}.{i % 256}", 1000 + i)
                   for i in range(wire.MAX_NODES)]
        message = wire.decode(wire.nodes(entries))
        self.assertEqual(len(message.nodes), wire.MAX_NODES)
        self.assertEqual(message.nodes[-1],
                         wire.NodeAddress(NODE, "10.0.0.255", 1000 + wire.MAX_NODES - 1))

    def test_builder_keeps_the_first_max_nodes(self) -> None:
        entries = [(NODE, "10.0.0.1", port) for port in range(1, wire.MAX_NODES + 11)]
        message = wire.decode(wire.nodes(entries))
        self.assertEqual([n.port for n in message.nodes],
                         list(range(1, wire.MAX_NODES + 1)))

    def test_beacon(self) -> None:
        self.assertEqual(wire.decode(wire.beacon("b-1", NODE)),
                         wire.Beacon(id="b-1", origin=NODE))
        longest = "x" * 64
        self.assertEqual(wire.decode(wire.beacon(longest, OTHER_NODE)),
                         wire.Beacon(id=longest, origin=OTHER_NODE))

    def test_beacon_frame(self) -> None:
        self.assertEqual(json.loads(wire.beacon("b-1", NODE)),
                         {"type": "beacon", "id": "b-1", "origin": NODE, "master": False,
                          "rev": 0, "links": []})

    def test_beacon_with_overlay(self) -> None:
        frame = wire.beacon("b-2", NODE, master=True, rev=12,
                            links=[(OTHER_NODE, 1.23456), (NODE, None)])
        self.assertEqual(wire.decode(frame), wire.Beacon(
            id="b-2", origin=NODE, master=True, rev=12,
            links=((OTHER_NODE, 1.235), (NODE, None))))

    def test_beacon_keeps_the_first_max_nodes_links(self) -> None:
        links = [(NODE, float(i)) for i in range(wire.MAX_NODES + 5)]
        self.assertEqual(len(wire.decode(wire.beacon("b", NODE, links=links)).links),
                         wire.MAX_NODES)

    def test_not_responses(self) -> None:
        self.assertIsNone(wire.response_id(wire.Beacon(id="b", origin=NODE)))
        self.assertIsNone(wire.response_id(wire.Nodes(nodes=())))


class NodesRejectionTests(SynchronousTestCase):
    """
    Nodes and beacons that break their schema are ProtocolViolations.
    """

    assertViolation = RejectionTests.assertViolation

    def test_hosts_not_ip_literals(self) -> None:
        for host in ("localhost", "node.example", "", "[::1]", "10.0.0.1:5",
                     " 10.0.0.1", "10.0.0.1\n", "10.0.0", "256.0.0.1", "01.2.3.4",
                     "0x7f.0.0.1", "2130706433", "\uff11.2.3.4", "::1::", "gg::1",
                     "a" * 46):
            self.assertViolation(frame(nodes_json([NODE, host, 1])),
                                 "node host must be an IP address")

    def test_host_not_a_string(self) -> None:
        for host in (None, 2130706433, ["10.0.0.1"], {"h": "10.0.0.1"}, True):
            self.assertViolation(frame(nodes_json([NODE, host, 1])),
                                 "node host must be an IP address")

    def test_longest_host(self) -> None:
        host = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
        self.assertEqual(len(host), 45)
        message = wire.decode(frame(nodes_json([NODE, host, 1])))
        self.assertEqual(message.nodes[0].host, host)

    def test_bad_node_id(self) -> None:
        for bad in (NODE.upper(), NODE[:-1], NODE + "0", "node-1", "", 7, None):
            self.assertViolation(frame(nodes_json([bad, "10.0.0.1", 1])),
                                 "node_id is malformed")

    def test_ports(self) -> None:
        for port in (0, 70000, 65536, -1):
            self.assertViolation(frame(nodes_json([NODE, "10.0.0.1", port])),
                                 "port must be an integer in [1, 65535]")
        for port in (True, "80", 80.0, None):
            self.assertViolation(frame(nodes_json([NODE, "10.0.0.1", port])),
                                 "port must be an integer")

    def test_too_many(self) -> None:
        entry = [NODE, "10.0.0.1", 1]
        self.assertViolation(frame(nodes_json(*[entry] * (wire.MAX_NODES + 1))),
                             f"at most {wire.MAX_NODES} nodes")

    def test_too_many_before_entries_are_read(self) -> None:
        self.assertViolation(frame(nodes_json(*[None] * (wire.MAX_NODES + 1))),
                             f"at most {wire.MAX_NODES} nodes")

    def test_one_bad_entry_among_good(self) -> None:
        good = [NODE, "10.0.0.1", 1]
        self.assertViolation(frame(nodes_json(good, [NODE, "localhost", 1], good)),
                             "node host must be an IP address")

    def test_entry_shapes(self) -> None:
        for entry in ([NODE, "10.0.0.1"], [NODE, "10.0.0.1", 1, 2], [], NODE,
                      {"node_id": NODE, "host": "10.0.0.1", "port": 1}, None, 7,
                      "10.0.0.1:1"):
            self.assertViolation(frame(nodes_json(entry)), "a node is [node_id, host, port]")

    def test_nodes_not_a_list(self) -> None:
        for value in ({}, NODE, None, 3):
            self.assertViolation(frame({"type": "nodes", "nodes": value}),
                                 "nodes must be a list")

    def test_nodes_fields(self) -> None:
        self.assertViolation(frame({"type": "nodes"}), "nodes:", "missing nodes")
        self.assertViolation(frame({"type": "nodes", "nodes": [], "from": NODE}),
                             "nodes:", "unknown from")

    def test_beacon_fields(self) -> None:
        self.assertViolation(frame({"type": "beacon", "id": "b"}),
                             "beacon:", "missing links, master, origin, rev")
        self.assertViolation(frame({k: v for k, v in beacon_json().items() if k != "id"}),
                             "beacon:", "missing id")
        self.assertViolation(frame(beacon_json(hops=1)), "beacon:", "unknown hops")

    def test_beacon_overlay_fields(self) -> None:
        for bad in ("yes", 1, None):
            self.assertViolation(frame(beacon_json(master=bad)), "master")
        for bad in (-1, 1.5, "3", 2**63):
            self.assertViolation(frame(beacon_json(rev=bad)), "rev")
        for bad in ([[NODE]], [[NODE, "1"]], [[NODE, -1]], [["x", 1]], [NODE],
                    [[NODE, 1]] * (wire.MAX_NODES + 1), {"a": 1}):
            self.assertViolation(frame(beacon_json(links=bad)), "link")

    def test_beacon_id(self) -> None:
        for bad in ("", "a" * 65, "a b", "\u00fc", 5, None, ["b"]):
            self.assertViolation(frame(beacon_json(id=bad)), "id is malformed")

    def test_beacon_origin(self) -> None:
        for bad in (NODE.upper(), NODE[:-1], NODE + "0", "node-1", "", 7, None):
            self.assertViolation(frame(beacon_json(origin=bad)), "origin is malformed")


class NodesPropertyTests(SynchronousTestCase):
    """
    Frames that claim to be nodes or beacons decode to those messages or
    raise ProtocolViolation, never another exception.
    """

    def _decode(self, payload: dict[str, Any]) -> None:
        try:
            message = wire.decode(json.dumps(payload).encode("utf-8"))
        except ProtocolViolation as e:
            self.assertIsInstance(e.reason, str)
        else:
            self.assertIsInstance(message, (wire.Nodes, wire.Beacon))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["nodes", "beacon"]),
           st.dictionaries(st.sampled_from(["nodes", "id", "origin"]), _json, max_size=3))
    def test_arbitrary_fields(self, kind: str, fields: dict[str, Any]) -> None:
        self._decode({**fields, "type": kind})

    @settings(max_examples=300, deadline=None)
    @given(st.lists(
        st.lists(_scalars | st.sampled_from(["10.0.0.1", "::1", "x::"]), max_size=4)
        | _scalars,
        max_size=4))
    def test_arbitrary_entries(self, entries: list[Any]) -> None:
        self._decode(nodes_json(*entries))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(
        st.sampled_from([NODE, OTHER_NODE]),
        st.ip_addresses().map(str),
        st.integers(min_value=1, max_value=65535),
    ), max_size=20))
    def test_valid_nodes_round_trip(self, entries: list[tuple[str, str, int]]) -> None:
        message = wire.decode(wire.nodes(entries))
        self.assertEqual(message, wire.Nodes(nodes=tuple(
            wire.NodeAddress(node_id=n, host=h, port=p) for n, h, p in entries)))


class NestingTests(SynchronousTestCase):
    """
    A frame's nesting is limited by wire itself, not by how deep the
    decoder's caller happens to be in the stack.
    """

    def frame(self, depth: int) -> bytes:
        # A message body of depth containers: the frame adds one level.
        body = b"[" * depth + b"]" * depth
        return wire.message("m", "a" * 32, "@").replace(b'"@"', body)

    def test_deepest_accepted(self) -> None:
        message = wire.decode(self.frame(wire.MAX_NESTING - 1))
        self.assertIsInstance(message, wire.Message)

    def test_one_level_more_is_refused(self) -> None:
        with self.assertRaises(ProtocolViolation) as e:
            wire.decode(self.frame(wire.MAX_NESTING))
        self.assertIn("nested deeper", e.exception.reason)

    def test_brackets_inside_strings_are_not_levels(self) -> None:
        frame = wire.message("m", "a" * 32, "[" * 500 + "{" * 500)
        self.assertIsInstance(wire.decode(frame), wire.Message)

    def test_large_message_one_level_more_is_refused(self) -> None:
        padded = b'{"pad":"' + b"p" * 10_000 + b'","b":'
        deepest = wire.message("m", "a" * 32, "@").replace(
            b'"@"', padded + b"[" * (wire.MAX_NESTING - 2) + b"]" * (wire.MAX_NESTING - 2) + b"}")
        self.assertIsInstance(wire.decode(deepest), wire.Message)
        deeper = wire.message("m", "a" * 32, "@").replace(
            b'"@"', padded + b"[" * (wire.MAX_NESTING - 1) + b"]" * (wire.MAX_NESTING - 1) + b"}")
        self.assertRaises(ProtocolViolation, wire.decode, deeper)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["{", "[", "]", "x" * 700]), max_size=60).map("".join),
           st.integers(0, 30), st.data())
    def test_openers_over_is_a_count(self, text: str, levels: int, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, len(text)))
        counted = text.count("{", start, end) + text.count("[", start, end)
        self.assertEqual(wire.openers_over(text, start, end, levels), counted > levels)
        self.assertEqual(wire.openers_over(text.encode(), start, end, levels), counted > levels)

    def test_nested_deeper_than(self) -> None:
        self.assertFalse(wire.nested_deeper_than("x", 0))
        self.assertTrue(wire.nested_deeper_than([], 0))
        self.assertFalse(wire.nested_deeper_than([[1], {"a": 1}], 2))
        self.assertTrue(wire.nested_deeper_than([[1], {"a": []}], 2))
