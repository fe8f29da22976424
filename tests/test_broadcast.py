"""
Tests for L{dtable.broadcast}: the duplicate filter that delivers each
message at most once per node, bounded in time and in count; and how a
node sends and relays messages sent together.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dtable import wire
from dtable.broadcast import DuplicateFilter, new_message_id
from dtable.canonical import InvalidObjectError
from dtable.service import DistributedTable
from dtable.testing import Recorder
from tests.test_fuzz import FUZZER_ID, KEY, NEIGHBOUR_ID, OPTIONS, Peer


class DuplicateFilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.filter = DuplicateFilter(self.clock, ttl=300.0, size=3)

    def test_first_sight_then_duplicate(self) -> None:
        self.assertTrue(self.filter.first_sight("m1"))
        self.assertFalse(self.filter.first_sight("m1"))
        self.assertFalse(self.filter.first_sight("m1"))
        self.assertTrue(self.filter.first_sight("m2"))
        self.assertFalse(self.filter.first_sight("m2"))

    def test_len(self) -> None:
        self.assertEqual(len(self.filter), 0)
        self.filter.first_sight("m1")
        self.assertEqual(len(self.filter), 1)
        self.filter.first_sight("m1")
        self.assertEqual(len(self.filter), 1)
        self.filter.first_sight("m2")
        self.assertEqual(len(self.filter), 2)

    def test_remembered_within_ttl(self) -> None:
        self.filter.first_sight("m1")
        self.clock.advance(299.9)
        self.assertFalse(self.filter.first_sight("m1"))

    def test_duplicate_does_not_extend_memory(self) -> None:
        self.filter.first_sight("m1")
        self.clock.advance(200)
        self.assertFalse(self.filter.first_sight("m1"))
        self.clock.advance(100)
        self.assertTrue(self.filter.first_sight("m1"))

    def test_expiry_after_ttl(self) -> None:
        self.filter.first_sight("m1")
        self.clock.advance(100)
        self.filter.first_sight("m2")
        self.clock.advance(200)
        # m1 is 300 s old and forgotten; m2 is 200 s old and remembered.
        self.assertTrue(self.filter.first_sight("m1"))
        self.assertFalse(self.filter.first_sight("m2"))
        self.assertEqual(len(self.filter), 2)
        self.clock.advance(100)
        self.assertTrue(self.filter.first_sight("m2"))

    def test_expired_ids_are_dropped(self) -> None:
        """
        Expired ids do not stay in memory.
        """
        for i in range(3):
            self.filter.first_sight(f"m{i}")
        self.clock.advance(301)
        self.filter.first_sight("new")
        self.assertEqual(len(self.filter), 1)

    def test_size_bound_forgets_oldest(self) -> None:
        for i in range(3):
            self.clock.advance(1)
            self.assertTrue(self.filter.first_sight(f"m{i}"))
        self.assertTrue(self.filter.first_sight("m3"))
        self.assertEqual(len(self.filter), 3)
        # m0, the oldest, is forgotten; the others are remembered.
        self.assertFalse(self.filter.first_sight("m1"))
        self.assertFalse(self.filter.first_sight("m2"))
        self.assertFalse(self.filter.first_sight("m3"))
        self.assertTrue(self.filter.first_sight("m0"))
        self.assertEqual(len(self.filter), 3)
        # Remembering m0 again pushed out m1.
        self.assertTrue(self.filter.first_sight("m1"))

    def test_never_above_size(self) -> None:
        for i in range(50):
            self.filter.first_sight(f"m{i}")
            self.assertLessEqual(len(self.filter), 3)


class MessageIdTests(SynchronousTestCase):
    def test_fresh(self) -> None:
        ids = {new_message_id() for _ in range(100)}
        self.assertEqual(len(ids), 100)

    def test_valid_on_the_wire(self) -> None:
        message_id = new_message_id()
        origin = "0" * 32
        message = wire.decode(wire.message(message_id, origin, {"x": 1}))
        self.assertEqual(message, wire.Message(id=message_id, origin=origin, body={"x": 1}))


def bodies_of(frame: wire.Message | wire.Messages) -> tuple:
    return frame.bodies if isinstance(frame, wire.Messages) else (frame.body,)


class SentTogetherTests(SynchronousTestCase):
    """
    Messages sent in one call travel in as few frames as L{wire.BUNDLE_BYTES}
    and L{wire.MAX_BUNDLE} allow; every node delivers each of them, in
    order, and relays the frame as it came.
    """

    def setUp(self) -> None:
        self.node = DistributedTable(port=0, key=KEY, reactor=MemoryReactorClock(), **OPTIONS)
        self.node.startService()
        self.recorder = Recorder()
        self.node.subscribe(self.recorder)
        self.peers = [Peer(self.node, FUZZER_ID, "203.0.113.9"),
                      Peer(self.node, NEIGHBOUR_ID, "198.51.100.8")]
        for peer in self.peers:
            peer.hello()
            peer.received()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        for peer in self.peers:
            peer.lose()
        self.assertIsNone(self.successResultOf(self.node.stopService()))

    def sent(self) -> list[wire.Message | wire.Messages]:
        """
        What the node flooded since the last call: the same to both peers.
        """
        frames = [peer.received() for peer in self.peers]
        self.assertEqual(frames[0], frames[1])
        return [wire.decode(f) for f in frames[0]]  # type: ignore[misc]

    def test_one_frame_for_small_messages(self) -> None:
        bodies = [{"n": 1}, [2], "three", None]
        ids = self.node.send_messages(bodies)
        [frame] = self.sent()
        self.assertEqual(frame, wire.Messages(id=frame.id, origin=self.node.node_id,
                                              bodies=tuple(bodies)))
        self.assertEqual(ids, [f"{frame.id}.{i}" for i in range(4)])

    def test_a_lone_message_is_a_msg_frame(self) -> None:
        message_id = self.node.send_message({"n": 1})
        self.assertEqual(self.sent(), [wire.Message(id=message_id, origin=self.node.node_id,
                                                    body={"n": 1})])
        self.assertEqual(self.node.send_messages(["x"]), [self.sent()[0].id])

    def test_frames_bounded_in_bytes(self) -> None:
        """
        Bodies fill a frame up to BUNDLE_BYTES; one larger than that goes
        alone.
        """
        third = "a" * (wire.BUNDLE_BYTES // 3 - 10)
        bodies = [f"{i}{third}" for i in range(5)] + ["b" * wire.BUNDLE_BYTES, "c"]
        ids = self.node.send_messages(bodies)
        frames = self.sent()
        self.assertEqual([len(bodies_of(f)) for f in frames], [3, 2, 1, 1])
        self.assertEqual([b for f in frames for b in bodies_of(f)], bodies)
        self.assertEqual(len(set(ids)), len(bodies))

    def test_frames_bounded_in_count(self) -> None:
        bodies = list(range(wire.MAX_BUNDLE + 1))
        self.node.send_messages(bodies)
        frames = self.sent()
        self.assertEqual([type(f) for f in frames], [wire.Messages, wire.Message])
        self.assertEqual(frames[0].bodies, tuple(range(wire.MAX_BUNDLE)))
        self.assertEqual(frames[1].body, wire.MAX_BUNDLE)

    def test_deepest_message_travels_alone(self) -> None:
        """
        A body in a msgs frame sits a level deeper than in a msg frame, so
        a body as deep as a message may be goes in a msg frame of its own,
        which every node accepts.
        """
        deep: object = 1
        for _ in range(wire.MAX_NESTING - 1):
            deep = [deep]
        self.node.send_messages([1, 2, deep, 3])
        frames = self.sent()
        self.assertEqual([type(f) for f in frames], [wire.Messages, wire.Message, wire.Message])
        self.assertEqual(frames[1].body, deep)
        with self.assertRaises(InvalidObjectError):
            self.node.send_messages([1, [deep]])
        self.assertEqual(self.sent(), [])

    def test_nothing_sent_if_one_is_not_json(self) -> None:
        with self.assertRaisesRegex(InvalidObjectError, "message 2 is not JSON"):
            self.node.send_messages([1, 2, float("nan"), 3])
        self.assertEqual(self.sent(), [])

    def test_received_together(self) -> None:
        """
        A msgs frame from a peer: each body delivered in order, the frame
        relayed to the other peer as it came, a duplicate dropped.
        """
        frame = wire.message_frame("m7", FUZZER_ID, [b'{"n":1}', b'"two"', b"[3]"])
        self.peers[0].send(frame)
        self.peers[0].send(frame)
        self.assertEqual(self.recorder.named("message_received"), [({"n": 1},), ("two",), ([3],)])
        self.assertEqual([peer.received() for peer in self.peers], [[], [frame]])
        self.assertEqual(self.node.counters["messages_received"], 3)
        self.assertEqual(self.node.counters["messages_relayed"], 1)
