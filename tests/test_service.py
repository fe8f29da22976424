"""
DistributedTable's own calls, on a MemoryReactorClock: no network.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dtable import crypto, service
from dtable.canonical import InvalidObjectError, object_hash
from dtable.interfaces import ITableObserver, TableObserver
from dtable.service import DistributedTable, NotMasterError
from dtable.store import MemoryStore
from dtable.testing import FAST, Recorder, next_turn


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


class RemovedObjectsTests(SynchronousTestCase):
    """
    The objects that leave the table are read from the store only when an
    observer takes object_removed events.
    """

    def setUp(self) -> None:
        self.reads: list[list[str]] = []
        reads = self.reads

        class CountingStore(MemoryStore):
            def get_many(self, hs):
                hs = list(hs)
                reads.append(hs)
                return super().get_many(hs)

        self.node = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                                     reactor=MemoryReactorClock(), store=CountingStore(),
                                     **{**FAST, "master_sync_timeout": 0})
        self.node.startService()
        self.successResultOf(self.node.when_started())
        self.addCleanup(lambda: self.successResultOf(self.node.stopService()))

    def remove_one(self, n: int) -> list[str]:
        """
        Add and publish {"n": n}, remove it, publish; the reads that took.
        """
        h = self.node.add_object({"n": n})
        self.successResultOf(self.node.flush())
        del self.reads[:]
        self.node.remove_object(h)
        self.successResultOf(self.node.flush())
        return [h for read in self.reads for h in read]

    def test_nobody_listens(self) -> None:
        class Adds(TableObserver):
            def object_added(self, obj: dict) -> None:
                pass

        self.node.subscribe(TableObserver())
        self.node.subscribe(Adds())
        self.node.on("object_added", lambda obj: None)
        self.assertEqual(self.remove_one(1), [])
        self.assertEqual(len(self.node), 0)

    def test_listeners(self) -> None:
        """
        An on("object_removed") callback, an observer that overrides
        object_removed, or one that provides ITableObserver without
        TableObserver gets the object, read from the store.
        """
        @implementer(ITableObserver)
        class Bare:
            def __init__(self) -> None:
                self.removed: list[dict] = []

            def started(self) -> None:
                pass

            def object_added(self, obj: dict) -> None:
                pass

            def object_removed(self, obj: dict) -> None:
                self.removed.append(obj)

            def message_received(self, msg: object) -> None:
                pass

            def error(self, error_string: str, origin: str, obj: object) -> None:
                pass

        got: list[dict] = []
        unsubscribe = self.node.on("object_removed", got.append)
        self.assertEqual(len(self.remove_one(1)), 1)
        unsubscribe()
        recorder = Recorder()
        unsubscribe = self.node.subscribe(recorder)
        self.assertEqual(len(self.remove_one(2)), 1)
        unsubscribe()
        bare = Bare()
        self.node.subscribe(bare)
        self.assertEqual(len(self.remove_one(3)), 1)
        self.assertEqual((got, recorder.named("object_removed"), bare.removed),
                         ([{"n": 1}], [({"n": 2},)], [{"n": 3}]))
