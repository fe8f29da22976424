"""
Catch-up between two replicas without a network: the node behind talks to
the node ahead through a function that encodes every request and answer as
the wire would, and counts the bytes.
"""

from __future__ import annotations

import functools
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from dtable import catchup, crypto, wire
from dtable.canonical import canonical_bytes, hash_bytes
from dtable.protocol import RequestRefused
from dtable.replication import BatchLog, HeadSigner, HeadVerifier, Replica
from dtable.store import MemoryStore
from dtable.table import Table


@functools.lru_cache(maxsize=None)
def network():
    return crypto.derive_network(crypto.parse_network_key(crypto.generate_network_key()))


def make_replica(log_batches: int = 1000) -> Replica:
    net = network()
    store = MemoryStore()
    store.open()
    verifier = HeadVerifier(net.network_id, crypto.public_key_hex(net.master_key))
    return Replica(Table(), store, verifier, BatchLog(log_batches, 64 * 1024 * 1024))


def signer() -> HeadSigner:
    net = network()
    return HeadSigner(net.network_id, net.master_key)


def entry(obj: dict) -> tuple[str, dict, bytes]:
    data = canonical_bytes(obj)
    return hash_bytes(data), obj, data


class Wire:
    """
    Carries requests from the node behind to the node ahead as frames, and
    counts the bytes of both directions.
    """

    def __init__(self, ahead: Replica,
                 answer_bytes: int = catchup.DEFAULT_ANSWER_BYTES) -> None:
        self.ahead = ahead
        self.answer_bytes = answer_bytes
        self.bytes = 0
        self.requests = 0
        self._ids = 0

    def request(self, build) -> Deferred:
        self._ids += 1
        frame = build(self._ids)
        self.bytes += len(frame) + 4
        self.requests += 1
        message = wire.decode(frame)
        bounded = functools.partial
        serve = {
            wire.LogRequest: bounded(catchup.serve_log, max_bytes=self.answer_bytes),
            wire.TreeRequest: catchup.serve_tree,
            wire.DiffRequest: catchup.serve_diff,
            wire.Fetch: bounded(catchup.serve_fetch, max_bytes=self.answer_bytes),
        }[type(message)]
        answer_frame = serve(self.ahead, message)
        self.bytes += len(answer_frame) + 4
        answer = wire.decode(answer_frame)
        if isinstance(answer, wire.Refusal):
            return fail(RequestRefused(answer.reason))
        return succeed(answer)


def publish(master: Replica, adds=(), removes=()) -> bytes:
    published = master.publish(signer(), [entry(o) for o in adds], list(removes))
    assert published is not None
    return published[1]


def run(testcase, behind: Replica, ahead: Replica, chunk: int = 100,
        answer_bytes: int = catchup.DEFAULT_ANSWER_BYTES):
    link = Wire(ahead, answer_bytes)
    d = Deferred.fromCoroutine(catchup.catch_up(behind, link.request, chunk))
    how, changes = testcase.successResultOf(d)
    return how, changes, link


class CatchUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.master = make_replica()
        publish(self.master, adds=[{"n": i} for i in range(500)])

    def follower(self, log_batches: int = 1000) -> Replica:
        replica = make_replica(log_batches)
        how, changes, _ = run(self, replica, self.master)
        self.assertEqual(replica.head, self.master.head)
        return replica

    def assertSame(self, behind: Replica, ahead: Replica) -> None:
        self.assertEqual(behind.head, ahead.head)
        self.assertEqual(behind.table.hashes(), ahead.table.hashes())
        self.assertEqual(behind.table.root(), ahead.head.root)
        self.assertEqual(sorted(behind._store.items()), sorted(ahead._store.items()))

    def test_full_resync_from_empty(self) -> None:
        replica = make_replica()
        how, changes, link = run(self, replica, self.master)
        # The master's log reaches back to revision 0.
        self.assertEqual(how, "log")
        self.assertSame(replica, self.master)
        self.assertEqual(len(changes[0].added), 500)

    def test_full_resync_by_reconciliation(self) -> None:
        self.master.log.clear()
        replica = make_replica()
        how, changes, link = run(self, replica, self.master)
        self.assertEqual(how, "merkle")
        self.assertSame(replica, self.master)

    def test_within_the_log_gets_exactly_the_missed_batches(self) -> None:
        replica = self.follower()
        hashes = self.master.table.hashes()
        publish(self.master, adds=[{"new": 1}], removes=hashes[:3])
        publish(self.master, adds=[{"new": 2}])
        how, changes, link = run(self, replica, self.master)
        self.assertEqual(how, "log")
        self.assertEqual([c.head.rev for c in changes], [2, 3])
        self.assertEqual(len(changes[0].removed), 3)
        self.assertSame(replica, self.master)
        self.assertEqual(link.requests, 1)
        # The answer is the two batch frames plus a few bytes of framing.
        self.assertLess(link.bytes, 2 * 1000)

    def test_beyond_the_log_reconciles_in_proportion_to_the_change(self) -> None:
        replica = self.follower()
        removed = self.master.table.hashes()[:2]
        publish(self.master, adds=[{"new": 1}, {"new": 2}], removes=removed)
        self.master.log.clear()
        how, changes, link = run(self, replica, self.master)
        self.assertEqual(how, "merkle")
        self.assertSame(replica, self.master)
        self.assertEqual({o["n"] for o in changes[0].removed},
                         {replica_obj["n"] for replica_obj in
                          [self.follower_object(h) for h in removed]})
        self.assertEqual(sorted(o["new"] for o in changes[0].added), [1, 2])
        # Four changed objects among 500: far less than the table's hashes.
        self.assertLess(link.bytes, 4 * 2500)

    def follower_object(self, h: str) -> dict:
        return {"n": next(i for i in range(500) if entry({"n": i})[0] == h)}

    def test_stale_objects_of_the_node_behind_are_removed(self) -> None:
        replica = self.follower()
        gone = self.master.table.hashes()
        publish(self.master, adds=[{"only": True}], removes=gone)
        self.master.log.clear()
        how, changes, _ = run(self, replica, self.master)
        self.assertEqual(how, "merkle")
        self.assertSame(replica, self.master)
        self.assertEqual(len(replica.table), 1)

    def test_peer_not_ahead_changes_nothing(self) -> None:
        replica = self.follower()
        how, changes, _ = run(self, replica, self.master)
        self.assertEqual(changes, [])
        self.assertSame(replica, self.master)

    def test_refused_log_falls_back_to_reconciliation(self) -> None:
        replica = self.follower(log_batches=1)
        for i in range(3):
            publish(self.master, adds=[{"step": i}])
        master_log = self.master.log
        self.master.log = BatchLog(1, 1024 * 1024)
        publish(self.master, adds=[{"step": 3}])
        how, _, _ = run(self, replica, self.master)
        self.assertEqual(how, "merkle")
        self.assertSame(replica, self.master)
        self.assertTrue(len(master_log) >= 3)


class BoundedAnswerTests(SynchronousTestCase):
    """
    What one request can make the node ahead read and send is bounded.
    """

    def setUp(self) -> None:
        self.master = make_replica()
        publish(self.master, adds=[{"n": i, "pad": "x" * 100} for i in range(500)])

    def test_fetch_answers_carry_what_fits_and_the_rest_is_asked_again(self) -> None:
        self.master.log.clear()
        replica = make_replica()
        how, _, link = run(self, replica, self.master, chunk=100, answer_bytes=1000)
        self.assertEqual(how, "merkle")
        self.assertEqual(replica.head, self.master.head)
        self.assertEqual(replica.table.hashes(), self.master.table.hashes())
        fetches = link.requests
        # Five chunks of 100 would do if answers were unbounded; about nine
        # 120-byte objects fit in 1000 bytes.
        _, _, unbounded = run(self, make_replica(), self.master, chunk=100)
        self.assertGreater(fetches, unbounded.requests + 40)

    def test_fetch_answer_holds_one_object_even_if_it_alone_is_too_big(self) -> None:
        h = self.master.table.hashes()[0]
        answer = wire.decode(catchup.serve_fetch(self.master, wire.Fetch(id=1, hashes=(h,)),
                                                 max_bytes=1))
        self.assertEqual(len(answer.objects), 1)

    def test_log_over_the_budget_is_refused(self) -> None:
        replica = make_replica()
        how, _, _ = run(self, replica, self.master, answer_bytes=10_000)
        self.assertEqual(how, "merkle")
        self.assertEqual(replica.head, self.master.head)

    def test_diff_of_a_broad_prefix_is_refused(self) -> None:
        publish(self.master, adds=[{"more": i} for i in range(catchup.MAX_DIFF_HASHES)])
        answer = wire.decode(catchup.serve_diff(
            self.master, wire.DiffRequest(id=1, prefix="", have=())))
        self.assertIsInstance(answer, wire.Refusal)
        self.assertIn("ask for its subtrees", answer.reason)
        leaf = self.master.table.hashes()[0][:2]
        answer = wire.decode(catchup.serve_diff(
            self.master, wire.DiffRequest(id=2, prefix=leaf, have=())))
        self.assertIsInstance(answer, wire.Diff)
        self.assertEqual(len(answer.missing), self.master.table.node(leaf).count)


changes_strategy = st.lists(
    st.tuples(st.booleans(), st.integers(0, 400)), min_size=1, max_size=60)


class CatchUpProperties(SynchronousTestCase):
    """
    Whatever the table and the changes, both ways of catching up end at
    exactly the master's state.
    """

    @settings(max_examples=40, deadline=None)
    @given(size=st.integers(0, 300), changes=changes_strategy,
           batches=st.integers(1, 5), keep_log=st.booleans(),
           seed=st.integers(0, 2**16))
    def test_catch_up_reaches_the_masters_state(self, size, changes, batches,
                                                keep_log, seed) -> None:
        rng = random.Random(seed)
        master = make_replica()
        if size:
            publish(master, adds=[{"n": i, "pad": "x" * rng.randrange(50)}
                                  for i in range(size)])
        behind = make_replica()
        run(self, behind, master)
        self.assertEqual(behind.head, master.head)
        rev_before = master.head.rev
        per_batch = max(1, len(changes) // batches)
        for start in range(0, len(changes), per_batch):
            adds, removes = [], []
            present = master.table.hashes()
            for is_add, value in changes[start:start + per_batch]:
                if is_add or not present:
                    adds.append({"c": value})
                else:
                    removes.append(present[value % len(present)])
            published = master.publish(signer(), [entry(o) for o in adds], removes)
            if published is None:
                continue
        if not keep_log:
            master.log.clear()
        how, _, _ = run(self, behind, master, chunk=7)
        self.assertEqual(behind.head, master.head)
        self.assertEqual(behind.table.hashes(), master.table.hashes())
        self.assertEqual(sorted(behind._store.items()), sorted(master._store.items()))
        if master.head.rev > rev_before:
            self.assertEqual(how, "log" if keep_log else "merkle")
