"""
DistributedTable's own calls, on a MemoryReactorClock: no network.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto, service
from dtable.canonical import InvalidObjectError, object_hash
from dtable.service import DistributedTable, NotMasterError
from dtable.testing import FAST, next_turn


def _node(master: bool = True) -> DistributedTable:
    return DistributedTable(port=0, key=crypto.generate_network_key(), master=master,
                            reactor=MemoryReactorClock(),
                            **{**FAST, "master_sync_timeout": 0})


class AddObjectsCooperativelyTests(SynchronousTestCase):
    """
    add_objects_cooperatively encodes a slice per turn of the reactor and
    adds everything at once, or nothing.
    """

    def setUp(self) -> None:
        # Every turn is over budget at once: one slice of 64 objects per turn.
        self.patch(service, "ENCODE_BUDGET", 0.0)
        self.node = _node()
        self.clock = self.node.reactor
        self.node.startService()
        self.successResultOf(self.node.when_started())
        self.stopped = False

        def stop() -> None:
            if not self.stopped:
                self.successResultOf(self.node.stopService())
        self.addCleanup(stop)

    def held(self) -> int:
        """
        Ops in the master's batch window, not yet published.
        """
        return len(self.node._window)

    def turns_until_fired(self, d, limit: int = 100) -> int:
        for turn in range(1, limit + 1):
            next_turn(self.clock)
            if d.called:
                return turn
        self.fail(f"not fired after {limit} turns")

    def test_slices_across_turns_then_adds_all(self) -> None:
        objects = [{"n": i} for i in range(200)]
        d = self.node.add_objects_cooperatively(objects)
        self.assertNoResult(d)
        # 200 objects are four slices of 64; nothing is added before the last.
        for _ in range(3):
            next_turn(self.clock)
            self.assertNoResult(d)
            self.assertEqual(self.held(), 0)
        next_turn(self.clock)
        hashes = self.successResultOf(d)
        self.assertEqual(hashes, [object_hash(o) for o in objects])
        self.assertEqual(self.held(), 200)
        self.successResultOf(self.node.flush())
        self.assertEqual(set(self.node.table.hashes()), set(hashes))

    def test_one_invalid_object_adds_none(self) -> None:
        objects = [{"n": i} for i in range(200)]
        objects[150] = {"n": float("nan")}
        d = self.node.add_objects_cooperatively(objects)
        self.turns_until_fired(d)
        failure = self.failureResultOf(d, InvalidObjectError)
        self.assertIn("object 150: ", str(failure.value))
        self.assertEqual(self.held(), 0)
        self.successResultOf(self.node.flush())
        self.assertEqual(len(self.node), 0)

    def test_only_on_the_master(self) -> None:
        other = _node(master=False)
        other.startService()
        self.addCleanup(lambda: self.successResultOf(other.stopService()))
        self.failureResultOf(other.add_objects_cooperatively([{"n": 1}]), NotMasterError)

    def test_stopping_cancels_what_is_still_encoded(self) -> None:
        d = self.node.add_objects_cooperatively([{"n": i} for i in range(200)])
        next_turn(self.clock)
        self.stopped = True
        self.successResultOf(self.node.stopService())
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.node), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
