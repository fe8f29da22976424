"""
Tests for L{dtable.broadcast}: the duplicate filter that delivers each
message at most once per node, bounded in time and in count.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dtable import wire
from dtable.broadcast import DuplicateFilter, new_message_id


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
