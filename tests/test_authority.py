"""
Master authority: with a separate master key pair, holding the network key
is not enough to change any table. Forged, unsigned, tampered and replayed
batches change nothing; the forged ones close the sender's connection, are
logged with their reason and count against its address in the firewall.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto, wire
from dtable.canonical import InvalidObjectError, canonical_bytes, hash_bytes
from dtable.config import ConfigError
from dtable.protocol import PeerProtocol
from dtable.replication import HeadSigner
from dtable.service import DistributedTable
from dtable.store import MemoryStore
from dtable.table import EMPTY_ROOT, root_of
from dtable.testing import FAST, LocalNetwork, wait_for
from dtable.wire import Head

NETWORK_KEY = crypto.generate_network_key()
MASTER_KEY = crypto.generate_master_key()
MASTER_PUBLIC = crypto.public_key_hex(crypto.parse_master_key(MASTER_KEY))
PEER_ID = "ab" * 16


def _network() -> crypto.NetworkCredentials:
    return crypto.derive_network(crypto.parse_network_key(NETWORK_KEY))


def real_signer() -> HeadSigner:
    """
    The master's signer: what only the holder of the master key has.
    """
    return HeadSigner(_network().network_id, crypto.parse_master_key(MASTER_KEY))


def derived_signer() -> HeadSigner:
    """
    What any holder of the network key can sign with: the derived key.
    """
    network = _network()
    return HeadSigner(network.network_id, network.master_key)


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def batch_frame(signer: HeadSigner | None, rev: int, base: int, hashes: list[str],
                adds: list[dict], removes: list[str] = (), sig: str | None = None) -> bytes:
    """
    A hand-built batch on top of a table holding C{hashes}; the root is the
    honest one for the ops. C{sig} overrides the signature.
    """
    after = (set(hashes) - set(removes)) | {hash_bytes(canonical_bytes(o)) for o in adds}
    root = root_of(after)
    if signer is not None:
        head = signer.sign(rev, base, root)
    else:
        head = Head(rev=rev, base=base, root=root, sig="0" * 128, master=MASTER_PUBLIC)
    if sig is not None:
        head = Head(rev=head.rev, base=head.base, root=head.root, sig=sig,
                    master=head.master)
    return wire.batch(head, [canonical_bytes(o) for o in adds], list(removes))


# --- one node, one hand-driven connection ------------------------------------


class ForgedBatchTests(SynchronousTestCase):
    """
    A node trusting the master's public key, fed frames over one connection
    from a peer that completed its handshake (so it holds the network key).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.node = DistributedTable(
            port=0, key=NETWORK_KEY, reactor=self.reactor,
            master_public_key=MASTER_PUBLIC, **FAST)
        self.node.startService()
        self.successResultOf(self.node.when_started())
        self.protocols: list[PeerProtocol] = []
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        d = self.node.stopService()
        # StringTransport only records that it was closed: say it is gone.
        for protocol in self.protocols:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)

    def open(self) -> PeerProtocol:
        protocol = PeerProtocol(self.node, self.reactor, self.node.config, outbound=False)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return protocol

    def connect(self, head: Head = Head(rev=0, base=0, root=EMPTY_ROOT)) -> PeerProtocol:
        protocol = self.open()
        # As if TLS had verified the peer's network certificate.
        protocol.node_id = PEER_ID
        protocol.dataReceived(framed(wire.hello(PEER_ID, 4000, "link", False, head)))
        self.assertTrue(protocol.is_live)
        return protocol

    def assert_dropped(self, protocol: PeerProtocol, reason: str) -> None:
        self.assertFalse(protocol.is_live)
        self.assertIn(reason, protocol.close_reason)
        self.assertTrue(protocol.transport.disconnecting)
        self.assertEqual(len(self.node), 0)
        self.assertEqual(self.node.head.rev, 0)

    def failures(self) -> int:
        details = self.node.firewall.details("192.168.1.1")
        return details["failures"] if details else 0

    def test_signed_with_the_derived_key(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(framed(batch_frame(derived_signer(), 1, 0, [], [{"a": 1}])))
        self.assert_dropped(protocol, "signed by another master key")
        self.assertEqual(self.failures(), 1)

    def test_bad_signature(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(framed(batch_frame(None, 1, 0, [], [{"a": 1}])))
        self.assert_dropped(protocol, "bad signature")
        self.assertEqual(self.failures(), 1)

    def test_missing_signature(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(framed(batch_frame(real_signer(), 1, 0, [], [{"a": 1}], sig="")))
        self.assert_dropped(protocol, "head.sig is malformed")
        self.assertEqual(self.failures(), 1)

    def test_signature_of_another_batch(self) -> None:
        """
        A real signed head with other objects than the master published: the
        root after applying them is not the signed one.
        """
        real = batch_frame(real_signer(), 1, 0, [], [{"real": 1}])
        head = wire.decode(real).head
        tampered = wire.batch(head, [canonical_bytes({"evil": 1})], [])
        protocol = self.connect()
        protocol.dataReceived(framed(tampered))
        self.assert_dropped(protocol, "does not apply")
        self.assertEqual(self.failures(), 1)
        # The genuine batch still applies over another connection.
        honest = self.connect()
        honest.dataReceived(framed(real))
        self.assertEqual(self.node.objects(), [{"real": 1}])

    def test_replayed_batch(self) -> None:
        """
        An old batch of the master's, replayed after the master removed what
        it added, is a duplicate: dropped, not applied, and not held against
        the sender (flooding delivers duplicates honestly).
        """
        signer = real_signer()
        add = batch_frame(signer, 1, 0, [], [{"a": 1}])
        h = hash_bytes(canonical_bytes({"a": 1}))
        remove = batch_frame(signer, 2, 1, [h], [], [h])
        protocol = self.connect()
        protocol.dataReceived(framed(add) + framed(remove))
        self.assertEqual(self.node.head.rev, 2)
        self.assertEqual(len(self.node), 0)
        protocol.dataReceived(framed(add))
        self.assertTrue(protocol.is_live)
        self.assertEqual(len(self.node), 0)
        self.assertEqual(self.node.head.rev, 2)
        self.assertEqual(self.failures(), 0)

    def test_peer_cannot_name_an_address_as_this_node(self) -> None:
        """
        A nodes frame that gives this node's id at some address is hearsay:
        believing it would keep the node from ever dialling that address.
        """
        protocol = self.connect()
        protocol.dataReceived(framed(wire.nodes([(self.node.node_id, "192.0.2.7", 4000)])))
        self.assertTrue(protocol.is_live)
        self.assertEqual(self.node.directory.self_addresses(), [])

    def test_too_deep_message_is_refused_at_the_sender(self) -> None:
        body: list = []
        for _ in range(wire.MAX_NESTING):
            body = [body]
        with self.assertRaises(InvalidObjectError):
            self.node.send_message(body)

    def test_hello_with_a_forged_head(self) -> None:
        protocol = self.open()
        protocol.node_id = PEER_ID
        forged = derived_signer().sign(5, 4, EMPTY_ROOT)
        protocol.dataReceived(framed(wire.hello(PEER_ID, 4000, "link", False, forged)))
        self.assertFalse(protocol.is_live)
        self.assertIn("bad head", protocol.close_reason)
        self.assertEqual(self.failures(), 1)


class StoredStateTests(SynchronousTestCase):
    """
    A stored table that the trusted master key did not sign is never served.
    """

    def start(self, store: MemoryStore, stop_after: bool = True,
              **options) -> DistributedTable:
        reactor = MemoryReactorClock()
        node = DistributedTable(port=0, key=NETWORK_KEY, reactor=reactor, store=store,
                                **{**FAST, "memory": False, "data_dir": "unused",
                                   **options})
        node.startService()
        self.successResultOf(node.when_started())
        if stop_after:
            self.addCleanup(lambda: self.successResultOf(node.stopService()))
        return node

    def derived_state(self) -> MemoryStore:
        """
        A store written by a master that signed with the derived key.
        """
        store = MemoryStore()
        node = self.start(store, stop_after=False, master=True, master_sync_timeout=0)
        node.add_object({"kept": 1})
        self.successResultOf(node.flush())
        self.assertEqual(node.head.master, derived_signer().public)
        self.successResultOf(node.stopService())
        return store

    def test_master_signs_it_again(self) -> None:
        store = self.derived_state()
        master = self.start(store, master=True, master_key=MASTER_KEY,
                            master_sync_timeout=0)
        self.assertEqual(master.objects(), [{"kept": 1}])
        self.assertEqual(master.head.rev, 2)
        self.assertEqual(master.head.base, 1)
        self.assertEqual(master.head.master, MASTER_PUBLIC)

    def test_other_node_starts_empty(self) -> None:
        store = self.derived_state()
        node = self.start(store, master_public_key=MASTER_PUBLIC)
        self.assertEqual(len(node), 0)
        self.assertEqual(node.head.rev, 0)
        self.assertEqual(store.count(), 0)


class MasterKeyOptionsTests(SynchronousTestCase):
    def test_master_needs_private_half(self) -> None:
        with self.assertRaises(ConfigError) as e:
            DistributedTable(port=0, key=NETWORK_KEY, master=True,
                             master_public_key=MASTER_PUBLIC, memory=True)
        self.assertIn("private half", str(e.exception))

    def test_private_half_is_for_the_master(self) -> None:
        with self.assertRaises(ConfigError) as e:
            DistributedTable(port=0, key=NETWORK_KEY, master_key=MASTER_KEY, memory=True)
        self.assertIn("master only", str(e.exception))

    def test_halves_must_match(self) -> None:
        other = crypto.public_key_hex(crypto.parse_master_key(crypto.generate_master_key()))
        with self.assertRaises(ConfigError) as e:
            DistributedTable(port=0, key=NETWORK_KEY, master=True, master_key=MASTER_KEY,
                             master_public_key=other, memory=True)
        self.assertIn("not the public half", str(e.exception))

    def test_malformed_public_key(self) -> None:
        with self.assertRaises(ConfigError) as e:
            DistributedTable(port=0, key=NETWORK_KEY, master_public_key="abc", memory=True)
        self.assertIn("64 hex characters", str(e.exception))

    def test_network_key_given_as_master_key(self) -> None:
        with self.assertRaises(crypto.MasterKeyError) as e:
            DistributedTable(port=0, key=NETWORK_KEY, master=True, master_key=NETWORK_KEY,
                             memory=True)
        self.assertIn("network key, not a master key", str(e.exception))


# --- real networks ----------------------------------------------------------


def _reactor():
    from twisted.internet import reactor
    return reactor


def _linked(node: DistributedTable, other: DistributedTable):
    return lambda n: any(link.node_id == other.node_id for link in node.links)


@pytest_twisted.ensureDeferred
async def test_separate_master_key_replicates():
    net = LocalNetwork(_reactor(), size=3, master_key=MASTER_KEY)
    await net.start()
    try:
        h = net.master.add_object({"signed": "by the master key"})
        await net.converged()
        for node in net.nodes:
            assert h in node
            assert node.head.master == MASTER_PUBLIC
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_second_master_without_the_master_key_changes_nothing(logs):
    """
    A node holding the network key declares itself master and publishes;
    its batches are signed with the derived key, and every node rejects
    them, so neither the real master nor any other node changes.
    """
    net = LocalNetwork(_reactor(), size=2, key=NETWORK_KEY, master_key=MASTER_KEY)
    rogue = DistributedTable(port=0, key=net.key, master=True, reactor=_reactor(),
                             interface="127.0.0.1", **FAST)
    await net.start()
    rogue.startService()
    try:
        await rogue.when_started()
        rogue.add_peer(net.address(1))
        await wait_for(net.nodes[1], _linked(net.nodes[1], rogue))
        rogue.add_object({"rogue": "object"})
        await logs.wait(lambda e: "signed by another master key" in str(e.get("reason")))
        h = net.master.add_object({"real": 1})
        await net.converged()
        for node in net.nodes:
            assert node.objects() == [{"real": 1}]
            assert h in node
        assert net.nodes[1].firewall.details("127.0.0.1")["failures"] >= 1
    finally:
        await rogue.stopService()
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_hand_built_batches_from_a_node_with_the_network_key(logs):
    """
    A non-master that holds the network key and follows the master sends
    its peer hand-built batches over a live link: signed with the derived
    key, with a bad signature, without one, and an old batch replayed. No
    table changes; each forgery closes the link with its reason in the log
    and counts against the sender's address.
    """
    net = LocalNetwork(_reactor(), size=2, key=NETWORK_KEY, master_key=MASTER_KEY)
    await net.start()
    master, replica = net.nodes
    rogue = DistributedTable(port=0, key=net.key, reactor=_reactor(),
                             interface="127.0.0.1", master_public_key=MASTER_PUBLIC,
                             **FAST)
    rogue.startService()
    try:
        a = master.add_object({"a": 1})
        await net.converged()
        master.remove_object(a)
        await net.converged()
        await rogue.when_started()
        rogue.add_peer(net.address(1))
        await wait_for(rogue, lambda n: n.head == master.head)
        old_add = batch_frame(real_signer(), 1, 0, [], [{"a": 1}])
        hashes = list(replica.table)
        rev = replica.head.rev
        forgeries = [
            (batch_frame(derived_signer(), rev + 1, rev, hashes, [{"evil": 1}]),
             "signed by another master key"),
            (batch_frame(None, rev + 1, rev, hashes, [{"evil": 2}]), "bad signature"),
            (batch_frame(real_signer(), rev + 1, rev, hashes, [{"evil": 3}], sig=""),
             "head.sig is malformed"),
        ]
        for frame, reason in forgeries:
            await wait_for(replica, _linked(replica, rogue))
            link = next(link for link in rogue.links if link.node_id == replica.node_id)
            link.send_frame(frame)
            await logs.wait(lambda e, r=reason: r in str(e.get("reason")))
            await wait_for(rogue, lambda n, gone=link: gone not in n.links)
        await wait_for(replica, _linked(replica, rogue))
        link = next(link for link in rogue.links if link.node_id == replica.node_id)
        link.send_frame(old_add)
        # Another change from the master shows the replica is still in step.
        b = master.add_object({"b": 2})
        await net.converged()
        await wait_for(rogue, lambda n: n.head == master.head)
        for node in (master, replica, rogue):
            assert node.objects() == [{"b": 2}]
            assert a not in node and b in node
        assert link.is_live
        assert replica.firewall.details("127.0.0.1")["failures"] >= len(forgeries)
    finally:
        await rogue.stopService()
        await net.stop()


@pytest.mark.parametrize("text", ["", "dtable-master-key-v1:short", "x" * 64])
def test_parse_master_key_rejects(text):
    with pytest.raises(crypto.MasterKeyError):
        crypto.parse_master_key(text)


def test_master_key_round_trip():
    text = crypto.generate_master_key()
    key = crypto.parse_master_key(text)
    assert crypto.parse_master_key(text + "\n").private_bytes_raw() == key.private_bytes_raw()
    public = crypto.public_key_hex(key)
    assert crypto.parse_master_public_key(public.upper() + "\n") == public
    with pytest.raises(crypto.MasterKeyError, match="private key"):
        crypto.parse_master_public_key(text)
