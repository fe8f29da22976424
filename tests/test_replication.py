"""
Tests for L{dtable.replication}: the merge rule, signed heads, publishing
and applying batches, installing a caught-up state, loading a stored one,
and the master's batch window.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dtable import crypto, wire
from dtable.canonical import canonical_bytes, hash_bytes
from dtable.interfaces import IStore
from dtable.replication import (
    BadHead,
    BatchLog,
    BatchRejected,
    BatchWindow,
    Decision,
    HeadSigner,
    HeadVerifier,
    Replica,
    head_signing_bytes,
    merge_rule,
)
from dtable.store import MemoryStore, empty_head
from dtable.table import EMPTY_ROOT, Table, root_of
from dtable.testing import next_turn
from dtable.wire import Head


@functools.lru_cache(maxsize=None)
def network(name: str) -> crypto.NetworkCredentials:
    """
    A network derived once per name for the whole module (derivation is
    deliberately slow).
    """
    return crypto.derive_network(crypto.parse_network_key(crypto.generate_network_key()))


def entry(obj: dict[str, Any]) -> tuple[str, dict[str, Any], bytes]:
    data = canonical_bytes(obj)
    return hash_bytes(data), obj, data


def h(obj: dict[str, Any]) -> str:
    return entry(obj)[0]


def verifier_for(net: crypto.NetworkCredentials) -> HeadVerifier:
    return HeadVerifier(net.network_id, crypto.public_key_hex(net.master_key))


def signer_for(net: crypto.NetworkCredentials) -> HeadSigner:
    return HeadSigner(net.network_id, net.master_key)


def open_store() -> MemoryStore:
    store = MemoryStore()
    store.open()
    return store


def new_replica(net: crypto.NetworkCredentials,
                store: MemoryStore | None = None) -> Replica:
    return Replica(Table(), store if store is not None else open_store(),
                   verifier_for(net))


def decode_batch(frame: bytes) -> wire.Batch:
    message = wire.decode(frame)
    assert isinstance(message, wire.Batch)
    return message


A = {"name": "a"}
B = {"name": "b", "n": 1}
C = {"name": "c", "tags": ["x", "ü"]}
D = {"name": "d", "nested": {"k": None}}


class MergeRuleTests(SynchronousTestCase):
    """
    The one rule: apply a batch that starts here, drop one at or below this
    revision, catch up for one that starts beyond.
    """

    CASES = [
        # local rev, head rev, head base, decision
        (0, 1, 0, Decision.APPLY),
        (4, 5, 4, Decision.APPLY),
        (1, 1, 0, Decision.DUPLICATE),
        (5, 1, 0, Decision.DUPLICATE),
        (5, 5, 4, Decision.DUPLICATE),
        (0, 2, 1, Decision.GAP),
        (3, 9, 8, Decision.GAP),
        (3, 5, 2, Decision.GAP),
        (0, 7, 3, Decision.GAP),
    ]

    def test_cases(self) -> None:
        for local, rev, base, expected in self.CASES:
            head = Head(rev=rev, base=base, root=EMPTY_ROOT, sig="s", master="m")
            self.assertEqual(merge_rule(local, head), expected,
                             f"local {local}, batch {base} -> {rev}")

    def test_replica_decides_by_its_revision(self) -> None:
        net = network("main")
        master = new_replica(net)
        master.publish(signer_for(net), [entry(A)], [])
        follower = new_replica(net)
        head = Head(rev=2, base=1, root=EMPTY_ROOT)
        self.assertEqual(follower.decide(head), Decision.GAP)
        self.assertEqual(master.decide(head), Decision.APPLY)
        self.assertEqual(master.decide(master.head), Decision.DUPLICATE)


class HeadSignatureTests(SynchronousTestCase):
    """
    Heads signed by the network's master verify; anything else is BadHead.
    """

    def setUp(self) -> None:
        self.net = network("main")
        self.signer = signer_for(self.net)
        self.verifier = verifier_for(self.net)
        self.head = self.signer.sign(3, 2, root_of([h(A)]))

    def test_good_head(self) -> None:
        self.assertEqual(self.head.master, crypto.public_key_hex(self.net.master_key))
        self.assertEqual(self.signer.public, self.head.master)
        self.assertEqual((self.head.rev, self.head.base, self.head.root),
                         (3, 2, root_of([h(A)])))
        self.verifier.check(self.head)

    def test_signature_covers_the_signing_bytes(self) -> None:
        data = head_signing_bytes(self.net.network_id, 3, 2, self.head.root)
        self.assertTrue(crypto.verify(self.head.master, data, self.head.sig))

    def test_signed_heads_survive_the_wire(self) -> None:
        message = wire.decode(wire.head_announcement(self.head))
        assert isinstance(message, wire.HeadAnnouncement)
        self.verifier.check(message.head)

    def test_tampered_fields(self) -> None:
        for changes in ({"rev": 4}, {"base": 1}, {"root": root_of([h(B)])},
                        {"root": EMPTY_ROOT}):
            tampered = attrs.evolve(self.head, **changes)
            self.assertRaises(BadHead, self.verifier.check, tampered)

    def test_tampered_signature(self) -> None:
        sig = self.head.sig
        flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
        self.assertRaises(BadHead, self.verifier.check,
                          attrs.evolve(self.head, sig=flipped))
        self.assertRaises(BadHead, self.verifier.check, attrs.evolve(self.head, sig=""))
        self.assertRaises(BadHead, self.verifier.check,
                          attrs.evolve(self.head, sig="zz" * 64))

    def test_other_master_key(self) -> None:
        other = HeadSigner(self.net.network_id, Ed25519PrivateKey.generate())
        head = other.sign(3, 2, self.head.root)
        e = self.assertRaises(BadHead, self.verifier.check, head)
        self.assertIn("another master key", str(e))
        # The same signature claimed for the trusted key does not verify.
        claimed = attrs.evolve(head, master=self.head.master)
        e = self.assertRaises(BadHead, self.verifier.check, claimed)
        self.assertIn("bad signature", str(e))

    def test_other_network(self) -> None:
        """
        A head signed for another network does not verify here, even with
        the same master key.
        """
        other_net = network("other")
        self.assertNotEqual(other_net.network_id, self.net.network_id)
        foreign = HeadSigner(other_net.network_id, self.net.master_key)
        head = foreign.sign(3, 2, self.head.root)
        self.assertRaises(BadHead, self.verifier.check, head)
        self.assertRaises(BadHead, verifier_for(other_net).check, self.head)
        verifier_for(other_net).check(signer_for(other_net).sign(3, 2, self.head.root))

    def test_revision_zero_is_unsigned(self) -> None:
        self.verifier.check(empty_head())


class PublishAndApplyTests(SynchronousTestCase):
    """
    What the master publishes, a follower applies to the same root and head.
    """

    def setUp(self) -> None:
        self.net = network("main")
        self.signer = signer_for(self.net)
        self.master_store = open_store()
        self.master = new_replica(self.net, self.master_store)
        self.follower_store = open_store()
        self.follower = new_replica(self.net, self.follower_store)

    def publish(self, adds: list[dict], removes: list[dict]) -> bytes:
        result = self.master.publish(
            self.signer, [entry(o) for o in adds], [h(o) for o in removes]
        )
        assert result is not None
        return result[1]

    def assertSameState(self, one: Replica, one_store: MemoryStore) -> None:
        """
        C{one} and its store hold exactly the master's state.
        """
        self.assertEqual(one.table.root(), self.master.table.root())
        self.assertEqual(one.head, self.master.head)
        self.assertEqual(one.table.hashes(), self.master.table.hashes())
        self.assertEqual(one_store.head(), self.master.head)
        self.assertEqual(sorted(one_store.items()), sorted(self.master_store.items()))

    def test_memory_store_provides_istore(self) -> None:
        self.assertTrue(verifyObject(IStore, MemoryStore()))

    def test_publish(self) -> None:
        result = self.master.publish(self.signer, [entry(A), entry(B)], [])
        assert result is not None
        change, frame = result
        self.assertEqual(change.head.rev, 1)
        self.assertEqual(change.head.base, 0)
        self.assertEqual(change.head.root, root_of([h(A), h(B)]))
        self.assertEqual(change.added, [A, B])
        self.assertEqual(change.removed, [])
        self.assertEqual(self.master.head, change.head)
        verifier_for(self.net).check(change.head)
        batch = decode_batch(frame)
        self.assertEqual(batch.head, change.head)
        self.assertEqual(list(batch.adds), [A, B])
        self.assertEqual(batch.removes, ())
        # Persisted before it is returned.
        self.assertEqual(self.master_store.head(), change.head)
        self.assertEqual(dict(self.master_store.items()),
                         {h(A): canonical_bytes(A), h(B): canonical_bytes(B)})
        # Kept in the log for peers a little behind.
        self.assertEqual(self.master.log.since(0), [frame])

    def test_publish_reports_removed_objects(self) -> None:
        self.publish([A, B, C], [])
        result = self.master.publish(self.signer, [entry(D)], [h(A), h(C)])
        assert result is not None
        change, frame = result
        self.assertEqual(change.added, [D])
        self.assertEqual((change.removed, change.removed_count), ([A, C], 2))
        self.assertEqual(dict(self.master_store.items()),
                         {h(B): canonical_bytes(B), h(D): canonical_bytes(D)})
        self.assertEqual(self.master.log.since(1), [frame])
        self.assertEqual(len(self.master.log), 2)

    def test_removed_objects_read_only_if_wanted(self) -> None:
        """
        A replica told that nobody wants the objects that leave does not
        read them from its store (on the master or a follower), nor does it
        ask its table which of them it holds before removing them, and it
        counts them all the same; once they are wanted again, it reads them.
        """
        wanted = [False]
        reads: list[list[str]] = []
        lookups: list[str] = []

        class CountingTable(Table):
            def __contains__(self, h: object) -> bool:
                lookups.append(str(h))
                return super().__contains__(h)

        class CountingStore(MemoryStore):
            def get_many(self, hs: Any) -> dict[str, bytes]:
                hs = list(hs)
                reads.append(hs)
                return super().get_many(hs)

        def replica() -> tuple[Replica, MemoryStore]:
            store = CountingStore()
            store.open()
            return Replica(CountingTable(), store, verifier_for(self.net),
                           removed_wanted=lambda: wanted[0]), store

        self.master, self.master_store = replica()
        follower, follower_store = replica()
        follower.apply_batch(decode_batch(self.publish([A, B, C], [])))
        del lookups[:]
        result = self.master.publish(self.signer, [], [h(A), h(B)])
        assert result is not None
        change, frame = result
        self.assertEqual((change.removed, change.removed_count), ([], 2))
        change = follower.apply_batch(decode_batch(frame))
        self.assertEqual((change.removed, change.removed_count), ([], 2))
        self.assertEqual((reads, lookups), ([], []))
        self.assertSameState(follower, follower_store)
        wanted[0] = True
        change = follower.apply_batch(decode_batch(self.publish([], [C])))
        self.assertEqual((change.removed, change.removed_count), ([C], 1))
        self.assertEqual(reads, [[h(C)], [h(C)]])

    def test_publish_nothing(self) -> None:
        self.assertIsNone(self.master.publish(self.signer, [], []))
        self.publish([A], [])
        head = self.master.head
        self.assertIsNone(self.master.publish(self.signer, [entry(A)], []))
        self.assertIsNone(self.master.publish(self.signer, [], [h(B)]))
        self.assertEqual(self.master.head, head)

    def test_publish_leaves_out_ops_that_change_nothing(self) -> None:
        """
        Adds of held objects and removes of absent ones are left out, an
        add of a held object that is removed too changes nothing, and a
        hash removed twice is removed once.
        """
        self.publish([A], [])
        batch = decode_batch(self.publish([A, B], [A, C, A]))
        self.assertEqual(list(batch.adds), [B])
        self.assertEqual(batch.removes, (h(A),))
        self.assertEqual(self.master.table.hashes(), [h(B)])
        self.assertEqual(dict(self.master_store.items()), {h(B): canonical_bytes(B)})
        self.assertEqual(self.master.table.root(), root_of([h(B)]))

    def test_follower_applies_batches(self) -> None:
        for adds, removes in (([A, B], []), ([C], [A]), ([D, A], [B, C])):
            frame = self.publish(adds, removes)
            batch = decode_batch(frame)
            self.assertEqual(self.follower.decide(batch.head), Decision.APPLY)
            change = self.follower.apply_batch(batch)
            self.assertEqual(change.head, self.master.head)
            self.assertEqual(change.added, adds)
            self.assertEqual(change.removed, removes)
            self.assertSameState(self.follower, self.follower_store)
        self.assertEqual(self.follower.head.rev, 3)
        self.assertEqual(sorted(self.follower.objects(), key=h), sorted([D, A], key=h))

    def test_applied_batches_are_logged(self) -> None:
        """
        A follower logs the frame it was given, or rebuilds the very same
        bytes from the batch.
        """
        first = self.publish([A, B], [])
        second = self.publish([C], [A])
        self.follower.apply_batch(decode_batch(first), first)
        self.assertIs(self.follower.log.since(0)[0], first)
        self.follower.apply_batch(decode_batch(second))
        self.assertEqual(self.follower.log.since(0), [first, second])
        self.assertEqual(self.follower.log.since(1), [second])
        self.assertEqual(self.follower.log.since(2), [])

    def test_reads_go_through_the_store(self) -> None:
        frame = self.publish([A, B], [])
        self.follower.apply_batch(decode_batch(frame))
        self.assertEqual(self.follower.get(h(A)), A)
        self.assertIsNone(self.follower.get(h(C)))
        self.assertEqual(self.follower.data([h(A), h(B), h(C)]),
                         {h(A): canonical_bytes(A), h(B): canonical_bytes(B)})
        self.assertEqual(self.follower.data([]), {})
        self.assertEqual(sorted(self.follower.objects(), key=h), sorted([A, B], key=h))
        self.follower.apply_batch(decode_batch(self.publish([], [A])))
        self.assertIsNone(self.follower.get(h(A)))
        self.assertEqual(self.follower.data([h(A)]), {})
        self.assertIsNone(self.follower_store.get(h(A)))

    def test_batch_frame_is_relayed_unchanged(self) -> None:
        """
        A second follower that gets the frame from the first applies it the
        same way.
        """
        frame = self.publish([A, C], [])
        self.follower.apply_batch(decode_batch(frame))
        third_store = open_store()
        third = new_replica(self.net, third_store)
        third.apply_batch(decode_batch(frame))
        self.assertSameState(third, third_store)

    def test_duplicate_batch_is_not_applied(self) -> None:
        batch = decode_batch(self.publish([A], []))
        self.follower.apply_batch(batch)
        self.assertEqual(self.follower.decide(batch.head), Decision.DUPLICATE)
        self.assertRaises(BatchRejected, self.follower.apply_batch, batch)
        self.assertSameState(self.follower, self.follower_store)
        self.assertEqual(len(self.follower.log), 1)

    def test_base_not_this_revision(self) -> None:
        self.publish([A], [])
        batch = decode_batch(self.publish([B], []))
        e = self.assertRaises(BatchRejected, self.follower.apply_batch, batch)
        self.assertIn("starts at 1", e.reason)
        self.assertEqual(self.follower.table.hashes(), [])
        self.assertEqual(self.follower.head, empty_head())
        self.assertEqual(len(self.follower.log), 0)

    def test_unsigned_batch(self) -> None:
        other = HeadSigner(self.net.network_id, Ed25519PrivateKey.generate())
        head = other.sign(1, 0, root_of([h(A)]))
        batch = wire.Batch(head=head, adds=(A,), removes=())
        self.assertRaises(BadHead, self.follower.apply_batch, batch)
        self.assertEqual(len(self.follower.table), 0)
        self.assertEqual(self.follower.head, empty_head())
        self.assertEqual(self.follower_store.count(), 0)
        self.assertEqual(len(self.follower.log), 0)

    def test_wrong_root_leaves_table_unchanged(self) -> None:
        logged = self.publish([A, B, C], [])
        self.follower.apply_batch(decode_batch(logged))
        hashes = self.follower.table.hashes()
        root = self.follower.table.root()
        head = self.follower.head
        stored = sorted(self.follower_store.items())
        # Signed, starts here, but the signed root is not what the ops make.
        wrong = self.signer.sign(2, 1, root_of([h(A), h(D)]))
        batch = wire.Batch(head=wrong, adds=(D, {"extra": 1}), removes=(h(B), h(C)))
        e = self.assertRaises(BatchRejected, self.follower.apply_batch, batch)
        self.assertIn("root", e.reason)
        self.assertEqual(self.follower.table.hashes(), hashes)
        self.assertEqual(self.follower.table.root(), root)
        self.assertEqual(self.follower.head, head)
        self.assertEqual(sorted(self.follower.objects(), key=h), sorted([A, B, C], key=h))
        for obj in (A, B, C):
            self.assertEqual(self.follower.get(h(obj)), obj)
            self.assertEqual(self.follower.data([h(obj)]), {h(obj): canonical_bytes(obj)})
        self.assertIsNone(self.follower.get(h(D)))
        self.assertEqual(self.follower_store.head(), head)
        self.assertEqual(sorted(self.follower_store.items()), stored)
        self.assertEqual(self.follower.log.since(0), [logged])

    def test_object_bytes_not_the_master_s(self) -> None:
        """
        An arriving batch is hashed over the bytes it carries: the same
        objects written otherwise (here with spaces, as a relay that
        re-encodes might) do not give the signed root, and nothing changes.
        """
        frame = self.publish([A, D], [])
        respaced = frame.replace(canonical_bytes(D), b'{"name": "d", "nested": {"k": null}}')
        batch = decode_batch(respaced)
        self.assertEqual(batch.adds, (A, D))
        e = self.assertRaises(BatchRejected, self.follower.apply_batch, batch, respaced)
        self.assertIn("root", e.reason)
        self.assertEqual(len(self.follower.table), 0)
        self.assertEqual(self.follower_store.count(), 0)
        self.follower.apply_batch(decode_batch(frame), frame)
        self.assertEqual(self.follower.data([h(D)]), {h(D): canonical_bytes(D)})

    def test_wrong_root_with_remove_and_readd(self) -> None:
        """
        Undoing a rejected batch that removed and re-added one object keeps
        the object.
        """
        self.follower.apply_batch(decode_batch(self.publish([A, B], [])))
        root = self.follower.table.root()
        wrong = self.signer.sign(2, 1, EMPTY_ROOT)
        batch = wire.Batch(head=wrong, adds=(A,), removes=(h(A),))
        self.assertRaises(BatchRejected, self.follower.apply_batch, batch)
        self.assertEqual(self.follower.table.hashes(), sorted([h(A), h(B)]))
        self.assertEqual(self.follower.table.root(), root)
        self.assertEqual(self.follower.get(h(A)), A)
        self.assertEqual(self.follower_store.get(h(A)), canonical_bytes(A))
        self.assertEqual(self.follower_store.head().rev, 1)

    def test_remove_and_readd_in_one_batch(self) -> None:
        """
        A batch that removes an object and adds it again keeps it, and
        reports both steps.
        """
        self.follower.apply_batch(decode_batch(self.publish([A, B], [])))
        head = self.signer.sign(2, 1, self.follower.table.root())
        change = self.follower.apply_batch(
            wire.Batch(head=head, adds=(A,), removes=(h(A),)))
        self.assertEqual(change.added, [A])
        self.assertEqual(change.removed, [A])
        self.assertEqual(self.follower.table.hashes(), sorted([h(A), h(B)]))
        self.assertEqual(self.follower_store.get(h(A)), canonical_bytes(A))
        self.assertEqual(self.follower_store.head(), head)

    def test_invalid_object(self) -> None:
        head = self.signer.sign(1, 0, EMPTY_ROOT)
        batch = wire.Batch(head=head, adds=({"x": float("nan")},), removes=())
        e = self.assertRaises(BatchRejected, self.follower.apply_batch, batch)
        self.assertIn("invalid object", e.reason)
        self.assertEqual(self.follower.head, empty_head())


class InstallTests(SynchronousTestCase):
    """
    A state learnt from a peer: the removes and adds that turn this node's
    set into the peer's, checked against the peer's signed head.
    """

    def setUp(self) -> None:
        self.net = network("main")
        self.signer = signer_for(self.net)
        self.store = open_store()
        self.replica = new_replica(self.net, self.store)
        self.replica.apply_batch(
            wire.Batch(head=self.signer.sign(1, 0, root_of([h(A), h(B)])),
                       adds=(A, B), removes=())
        )

    def objects_for(self, *objs: dict) -> dict[str, tuple[dict, bytes]]:
        return {h(o): (o, canonical_bytes(o)) for o in objs}

    def assertUnchanged(self) -> None:
        """
        The replica and its store still hold revision 1 with A and B.
        """
        self.assertEqual(self.replica.table.hashes(), sorted([h(A), h(B)]))
        self.assertEqual(self.replica.table.root(), root_of([h(A), h(B)]))
        self.assertEqual(self.replica.head.rev, 1)
        self.assertEqual(self.store.head(), self.replica.head)
        self.assertEqual(dict(self.store.items()),
                         {h(A): canonical_bytes(A), h(B): canonical_bytes(B)})

    def test_install_moves_to_exactly_the_set(self) -> None:
        hashes = {h(B), h(C), h(D)}
        head = self.signer.sign(5, 4, root_of(hashes))
        change = self.replica.install(head, self.objects_for(C, D), [h(A)])
        self.assertEqual(set(self.replica.table.hashes()), hashes)
        self.assertNotIn(h(A), self.replica.table)
        self.assertEqual(self.replica.head, head)
        self.assertEqual(change.head, head)
        self.assertEqual(change.removed, [A])
        self.assertEqual(sorted(change.added, key=h), sorted([C, D], key=h))
        # The stale object is gone from the store too.
        self.assertEqual(dict(self.store.items()),
                         {x: canonical_bytes(o) for x, o in
                          ((h(B), B), (h(C), C), (h(D), D))})
        self.assertIsNone(self.store.get(h(A)))
        self.assertIsNone(self.replica.get(h(A)))
        self.assertEqual(self.replica.get(h(D)), D)
        self.assertEqual(self.store.head(), head)

    def test_install_empty_state(self) -> None:
        head = self.signer.sign(2, 1, EMPTY_ROOT)
        change = self.replica.install(head, {}, [h(A), h(B)])
        self.assertEqual(len(self.replica.table), 0)
        self.assertEqual(sorted(change.removed, key=h), sorted([A, B], key=h))
        self.assertEqual(change.added, [])
        self.assertEqual(list(self.store.items()), [])
        self.assertEqual(self.store.head(), head)

    def test_install_ignores_ops_that_change_nothing(self) -> None:
        """
        Adds of objects already held and removes of absent ones are not in
        the change, and the held objects' bytes stay as stored.
        """
        hashes = {h(A), h(B), h(C)}
        head = self.signer.sign(3, 2, root_of(hashes))
        change = self.replica.install(head, self.objects_for(B, C), [h(D)])
        self.assertEqual(change.added, [C])
        self.assertEqual(change.removed, [])
        self.assertEqual(set(self.replica.table.hashes()), hashes)
        self.assertEqual(self.store.count(), 3)

    def test_install_empties_the_log(self) -> None:
        """
        An installed state is no batch: the log starts a new run after it.
        """
        self.assertEqual(len(self.replica.log), 1)
        head = self.signer.sign(5, 4, root_of([h(A), h(B), h(C)]))
        self.replica.install(head, self.objects_for(C), [])
        self.assertEqual(len(self.replica.log), 0)
        self.assertIsNone(self.replica.log.since(1))
        result = self.replica.publish(self.signer, [entry(D)], [])
        assert result is not None
        self.assertEqual(self.replica.log.since(5), [result[1]])
        self.assertIsNone(self.replica.log.since(4))

    def test_refused_install_keeps_the_log(self) -> None:
        logged = self.replica.log.since(0)
        self.assertRaises(BatchRejected, self.replica.install,
                          self.signer.sign(5, 4, root_of([h(D)])), self.objects_for(C), [])
        self.assertEqual(self.replica.log.since(0), logged)

    def test_refuses_older_or_same_head(self) -> None:
        same = self.signer.sign(1, 0, root_of([h(C)]))
        self.assertRaises(BatchRejected, self.replica.install, same,
                          self.objects_for(C), [h(A), h(B)])
        self.assertUnchanged()
        # Move to 4, then 3 is older.
        self.replica.install(self.signer.sign(4, 3, root_of([h(C)])),
                             self.objects_for(C), [h(A), h(B)])
        e = self.assertRaises(BatchRejected, self.replica.install,
                              self.signer.sign(3, 2, root_of([h(D)])),
                              self.objects_for(D), [h(C)])
        self.assertIn("not newer", e.reason)
        self.assertEqual(self.replica.table.hashes(), [h(C)])
        self.assertEqual(self.replica.head.rev, 4)
        self.assertEqual(dict(self.store.items()), {h(C): canonical_bytes(C)})
        self.assertEqual(self.store.head().rev, 4)

    def test_refuses_unsigned_state(self) -> None:
        head = HeadSigner(self.net.network_id, Ed25519PrivateKey.generate()).sign(
            5, 4, root_of([h(C)]))
        self.assertRaises(BadHead, self.replica.install, head, self.objects_for(C),
                          [h(A), h(B)])
        self.assertUnchanged()

    def test_missing_object(self) -> None:
        """
        Adds that leave out an object of the signed state do not reach its
        root.
        """
        hashes = {h(C), h(D)}
        head = self.signer.sign(5, 4, root_of(hashes))
        e = self.assertRaises(BatchRejected, self.replica.install, head,
                              self.objects_for(C), [h(A), h(B)])
        self.assertIn("root", e.reason)
        self.assertUnchanged()

    def test_stale_object_kept(self) -> None:
        """
        Removes that leave out a stale object do not reach the signed root
        either.
        """
        head = self.signer.sign(5, 4, root_of([h(B), h(C)]))
        self.assertRaises(BatchRejected, self.replica.install, head,
                          self.objects_for(C), [])
        self.assertUnchanged()

    def test_wrong_root_leaves_table_unchanged(self) -> None:
        head = self.signer.sign(5, 4, root_of([h(D)]))
        self.assertRaises(BatchRejected, self.replica.install, head,
                          self.objects_for(C), [h(A), h(B)])
        self.assertUnchanged()
        self.assertEqual(self.replica.get(h(A)), A)
        self.assertIsNone(self.replica.get(h(C)))


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = network("main")

    def test_load_committed_state(self) -> None:
        store = MemoryStore()
        store.open()
        master = new_replica(self.net, store)
        master.publish(signer_for(self.net), [entry(A), entry(B), entry(C)], [])
        master.publish(signer_for(self.net), [entry(D)], [h(B)])
        restarted = new_replica(self.net, store)
        self.assertEqual(restarted.head, empty_head())
        restarted.load()
        self.assertEqual(restarted.head, master.head)
        self.assertEqual(restarted.head.rev, 2)
        self.assertEqual(restarted.table.root(), master.table.root())
        self.assertEqual(restarted.table.hashes(), master.table.hashes())
        self.assertEqual(sorted(restarted.objects(), key=h),
                         sorted(master.objects(), key=h))
        self.assertEqual(restarted.get(h(D)), D)
        self.assertIsNone(restarted.get(h(B)))

    def test_load_replaces_the_table(self) -> None:
        store = open_store()
        signer_replica = new_replica(self.net, store)
        signer_replica.publish(signer_for(self.net), [entry(A)], [])
        replica = new_replica(self.net, store)
        replica.table.add(h(B))
        replica.load()
        self.assertEqual(replica.table.hashes(), [h(A)])
        replica.load()
        self.assertEqual(replica.table.hashes(), [h(A)])

    def test_load_empty_store(self) -> None:
        replica = new_replica(self.net)
        replica.load()
        self.assertEqual(replica.head, empty_head())
        self.assertEqual(len(replica.table), 0)

    def test_load_mismatch(self) -> None:
        store = MemoryStore()
        store.open()
        head = signer_for(self.net).sign(1, 0, root_of([h(A)]))
        store.commit(head, [(h(B), canonical_bytes(B))], [])
        replica = new_replica(self.net, store)
        self.assertRaises(ValueError, replica.load)
        self.assertEqual(replica.head, empty_head())


def log_head(rev: int, base: int | None = None) -> Head:
    """
    The head of the batch from C{base} (by default C{rev - 1}) to C{rev}.
    The log trusts its caller, so it need not be signed.
    """
    return Head(rev=rev, base=rev - 1 if base is None else base, root=EMPTY_ROOT)


def log_frame(rev: int, size: int = 10) -> bytes:
    """
    A stand-in frame of C{size} bytes for the batch to C{rev}.
    """
    return f"{rev:0{size}d}".encode("ascii")


class BatchLogTests(SynchronousTestCase):
    """
    The log of recent batch frames: one unbroken run of revisions, bounded
    by count and by bytes.
    """

    def filled(self, log: BatchLog, revs: range, size: int = 10) -> BatchLog:
        for rev in revs:
            log.append(log_head(rev), log_frame(rev, size))
        return log

    def test_empty(self) -> None:
        log = BatchLog(10, 1000)
        self.assertEqual(len(log), 0)
        self.assertEqual(log.bytes, 0)
        for rev in (0, 1, 5):
            self.assertIsNone(log.since(rev))

    def test_consecutive_run(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(1, 6))
        self.assertEqual(len(log), 5)
        self.assertEqual(log.bytes, 50)
        self.assertEqual(log.since(0), [log_frame(r) for r in range(1, 6)])
        self.assertEqual(log.since(2), [log_frame(r) for r in (3, 4, 5)])
        self.assertEqual(log.since(4), [log_frame(5)])

    def test_since_newest_is_empty(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(1, 4))
        self.assertEqual(log.since(3), [])

    def test_since_beyond_newest(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(1, 4))
        self.assertIsNone(log.since(4))
        self.assertIsNone(log.since(100))

    def test_since_before_oldest_base(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(4, 8))
        self.assertIsNone(log.since(2))
        self.assertIsNone(log.since(0))
        # The oldest batch's base is the earliest revision served.
        self.assertEqual(log.since(3), [log_frame(r) for r in range(4, 8)])

    def test_bounded_by_count(self) -> None:
        log = self.filled(BatchLog(3, 1000), range(1, 6))
        self.assertEqual(len(log), 3)
        self.assertEqual(log.bytes, 30)
        self.assertIsNone(log.since(1))
        self.assertEqual(log.since(2), [log_frame(r) for r in (3, 4, 5)])

    def test_bounded_by_bytes(self) -> None:
        log = BatchLog(100, 25)
        log.append(log_head(1), log_frame(1))
        log.append(log_head(2), log_frame(2))
        self.assertEqual((len(log), log.bytes), (2, 20))
        log.append(log_head(3), log_frame(3))
        self.assertEqual((len(log), log.bytes), (2, 20))
        self.assertIsNone(log.since(0))
        self.assertEqual(log.since(1), [log_frame(2), log_frame(3)])
        self.assertEqual(log.since(2), [log_frame(3)])
        # A large frame pushes out as many old ones as it needs.
        log.append(log_head(4), log_frame(4, size=20))
        self.assertEqual((len(log), log.bytes), (1, 20))
        self.assertEqual(log.since(3), [log_frame(4, size=20)])
        self.assertIsNone(log.since(2))

    def test_bytes_at_the_limit_are_kept(self) -> None:
        log = self.filled(BatchLog(100, 30), range(1, 4))
        self.assertEqual((len(log), log.bytes), (3, 30))
        self.assertEqual(log.since(0), [log_frame(r) for r in (1, 2, 3)])

    def test_frame_over_the_byte_limit_is_not_kept(self) -> None:
        log = self.filled(BatchLog(100, 25), range(1, 3))
        log.append(log_head(3), log_frame(3, size=26))
        self.assertEqual((len(log), log.bytes), (0, 0))
        self.assertIsNone(log.since(2))
        # The next batch starts a new run.
        log.append(log_head(4), log_frame(4))
        self.assertEqual(log.since(3), [log_frame(4)])

    def test_non_consecutive_head_starts_a_new_run(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(1, 4))
        log.append(log_head(7), log_frame(7))
        self.assertEqual((len(log), log.bytes), (1, 10))
        self.assertEqual(log.since(6), [log_frame(7)])
        self.assertIsNone(log.since(3))
        self.assertIsNone(log.since(0))

    def test_batch_spanning_revisions(self) -> None:
        """
        A batch whose base is the previous batch's revision continues the
        run, however far apart their revisions are.
        """
        log = self.filled(BatchLog(10, 1000), range(1, 3))
        log.append(log_head(6, base=2), log_frame(6))
        self.assertEqual(len(log), 3)
        self.assertEqual(log.since(2), [log_frame(6)])
        self.assertEqual(log.since(0), [log_frame(r) for r in (1, 2, 6)])

    def test_clear(self) -> None:
        log = self.filled(BatchLog(10, 1000), range(1, 4))
        log.clear()
        self.assertEqual((len(log), log.bytes), (0, 0))
        self.assertIsNone(log.since(3))
        log.append(log_head(9), log_frame(9))
        self.assertEqual(log.since(8), [log_frame(9)])

    def test_replica_uses_the_given_log(self) -> None:
        net = network("main")
        log = BatchLog(2, 1 << 20)
        replica = Replica(Table(), open_store(), verifier_for(net), log)
        self.assertIs(replica.log, log)
        frames = []
        for obj in (A, B, C):
            result = replica.publish(signer_for(net), [entry(obj)], [])
            assert result is not None
            frames.append(result[1])
        self.assertEqual(len(log), 2)
        self.assertEqual(log.since(1), frames[1:])
        self.assertIsNone(log.since(0))


class BatchWindowTests(SynchronousTestCase):
    """
    The master's add and remove calls within one window become one publish.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.published: list[tuple[list, list]] = []

    def window(self, window: float = 0.5, max_ops: int = 100) -> BatchWindow:
        return BatchWindow(self.clock, window, max_ops,
                           lambda adds, removes: self.published.append((adds, removes)))

    def test_one_window_one_publish(self) -> None:
        w = self.window()
        w.add(*entry(A))
        self.clock.advance(0.3)
        w.add(*entry(B))
        w.remove(h(C))
        self.assertEqual(len(w), 3)
        self.clock.advance(0.1)
        self.assertEqual(self.published, [])
        self.clock.advance(0.1)
        self.assertEqual(self.published, [([entry(A), entry(B)], [h(C)])])
        self.assertEqual(len(w), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_next_window(self) -> None:
        w = self.window()
        w.add(*entry(A))
        self.clock.advance(0.5)
        w.add(*entry(B))
        self.clock.advance(0.5)
        self.assertEqual(self.published, [([entry(A)], []), ([entry(B)], [])])

    def test_zero_window_is_one_turn(self) -> None:
        w = self.window(window=0.0)
        w.add(*entry(A))
        w.add(*entry(B))
        self.assertEqual(self.published, [])
        self.clock.advance(0)
        self.assertEqual(self.published, [([entry(A), entry(B)], [])])

    def test_add_then_remove_is_remove(self) -> None:
        w = self.window()
        w.add(*entry(A))
        w.remove(h(A))
        self.assertEqual(len(w), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.published, [([], [h(A)])])

    def test_remove_then_add_is_add(self) -> None:
        w = self.window()
        w.remove(h(A))
        w.add(*entry(A))
        self.clock.advance(0.5)
        self.assertEqual(self.published, [([entry(A)], [])])

    def test_max_ops_splits(self) -> None:
        """
        A window with more than max_ops publishes them as several batches,
        one per turn of the reactor.
        """
        w = self.window(max_ops=2)
        objs = [{"i": i} for i in range(5)]
        for obj in objs:
            w.add(*entry(obj))
        next_turn(self.clock, 0.5)
        self.assertEqual(self.published, [([entry(objs[0]), entry(objs[1])], [])])
        next_turn(self.clock)
        self.assertEqual(len(self.published), 2)
        next_turn(self.clock)
        self.assertEqual(self.published, [
            ([entry(objs[0]), entry(objs[1])], []),
            ([entry(objs[2]), entry(objs[3])], []),
            ([entry(objs[4])], []),
        ])
        self.assertEqual(len(w), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_publishes_every_batch_at_once(self) -> None:
        w = self.window(max_ops=2)
        for i in range(5):
            w.add(*entry({"i": i}))
        w.flush()
        self.assertEqual([len(adds) for adds, _ in self.published], [2, 2, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hold_and_release(self) -> None:
        w = self.window()
        w.add(*entry(A))
        w.hold()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        w.add(*entry(B))
        self.clock.advance(10)
        w.flush()
        self.assertEqual(self.published, [])
        self.assertEqual(len(w), 2)
        w.release()
        self.assertEqual(self.published, [])
        self.clock.advance(0.5)
        self.assertEqual(self.published, [([entry(A), entry(B)], [])])

    def test_release_with_nothing_pending(self) -> None:
        w = self.window()
        w.hold()
        w.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        w.add(*entry(A))
        self.clock.advance(0.5)
        self.assertEqual(self.published, [([entry(A)], [])])

    def test_flush(self) -> None:
        w = self.window()
        w.add(*entry(A))
        w.flush()
        self.assertEqual(self.published, [([entry(A)], [])])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(len(self.published), 1)

    def test_stop_cancels(self) -> None:
        w = self.window()
        w.add(*entry(A))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        w.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.published, [])

    def test_window_feeds_replica(self) -> None:
        """
        The window's publish is the replica's publish: adds and removes of
        one window reach a follower as one batch.
        """
        net = network("main")
        signer = signer_for(net)
        master = new_replica(net)
        follower = new_replica(net)
        frames: list[bytes] = []

        def publish(adds: list, removes: list) -> None:
            result = master.publish(signer, adds, removes)
            if result is not None:
                frames.append(result[1])

        w = BatchWindow(self.clock, 0.1, 100, publish)
        w.add(*entry(A))
        w.add(*entry(B))
        w.remove(h(A))
        self.clock.advance(0.1)
        w.add(*entry(C))
        w.remove(h(B))
        self.clock.advance(0.1)
        self.assertEqual(len(frames), 2)
        for frame in frames:
            follower.apply_batch(decode_batch(frame))
        self.assertEqual(follower.table.hashes(), [h(C)])
        self.assertEqual(follower.head, master.head)
        self.assertEqual(follower.head.rev, 2)
