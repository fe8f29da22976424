"""
Nodes over real mutual TLS on loopback, in one reactor.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase
import pytest_twisted

from dtable import crypto
from dtable.canonical import InvalidObjectError, object_hash
from dtable.protocol import SEND_PIECE
from dtable.service import DistributedTable, NotMasterError
from dtable.testing import (FAST, LocalNetwork, Recorder, free_ports, listening_port_range,
                            wait_for, wait_for_all)

# The seed's five-node example: 0 is the master and lists itself and node 3;
# 1 -> 0, 2 -> 1, 3 -> 1, 4 -> 3.
SEED_LINKS = {0: [0, 3], 1: [0], 2: [1], 3: [1], 4: [3]}


def _reactor():
    from twisted.internet import reactor
    return reactor


def _hashes(node: DistributedTable) -> set[str]:
    return set(node.table.hashes())


@pytest_twisted.ensureDeferred
async def test_seed_topology_add_remove_and_duplicate_add():
    net = LocalNetwork(_reactor(), size=5, links=SEED_LINKS)
    await net.start()
    try:
        master = net.master
        h = master.add_object({"test": "test"})
        await wait_for_all(net.nodes, lambda n: h in n)
        assert all(n.get(h) == {"test": "test"} for n in net.nodes)
        # The master's own address looped back and was marked as itself.
        assert len(master.directory.self_addresses()) == 1

        rev = master.head.rev
        assert master.add_object({"test": "test"}) == h
        await master.flush()
        other = master.add_object({"other": 1})
        await net.converged()
        # The duplicate add published nothing: one revision for "other".
        assert master.head.rev == rev + 1
        for recorder in net.recorders:
            added = recorder.named("object_added")
            assert added.count(({"test": "test"},)) == 1

        master.remove_object(h)
        await wait_for_all(net.nodes, lambda n: h not in n)
        await net.converged()
        for node, recorder in zip(net.nodes, net.recorders):
            assert _hashes(node) == {other}
            assert recorder.named("object_removed") == [({"test": "test"},)]
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_frames_larger_than_a_piece_cross_a_relay_in_order():
    """
    A batch and a message larger than L{SEND_PIECE}, written a piece at a
    time over real TLS, reach a node two hops away whole, and the small
    frames sent right behind them on the same links arrive after them.
    """
    net = LocalNetwork(_reactor(), size=3, links={1: [0], 2: [1]})
    await net.start()
    try:
        master, far = net.master, net.nodes[2]
        await wait_for_all(net.nodes, lambda n: len(n.links) >= 1)
        large = {"blob": "b" * (2 * SEND_PIECE + 1000)}
        h = master.add_object(large)
        await master.flush()
        small = master.add_object({"after": "the large one"})
        master.send_message({"large": "m" * (SEND_PIECE + 10)})
        master.send_message({"small": 1})
        await wait_for(far, lambda n: small in n)
        assert far.get(h) == large
        await net.converged()
        recorder = net.recorders[2]
        await wait_for(far, lambda n: len(recorder.named("message_received")) == 2)
        received = [args[0] for args in recorder.named("message_received")]
        assert [sorted(body) for body in received] == [["large"], ["small"]]
        assert received[0]["large"] == "m" * (SEND_PIECE + 10)
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_messages_reach_every_node_once_around_a_cycle():
    ring = {0: [1], 1: [2], 2: [3], 3: [0]}
    net = LocalNetwork(_reactor(), size=4, links=ring)
    await net.start()
    try:
        await wait_for_all(net.nodes, lambda n: len(n.links) >= 2)
        for i, node in enumerate(net.nodes):
            node.send_message({"from": i})

        def senders(i: int) -> set[int]:
            return {args[0]["from"] for args in net.recorders[i].named("message_received")}

        await wait_for_all(
            net.nodes,
            lambda n: senders(net.nodes.index(n)) >= set(range(4)) - {net.nodes.index(n)})
        # A last message that every node has received bounds the flood: a
        # duplicate of the earlier ones would have arrived before it.
        net.nodes[0].send_message("barrier")
        await wait_for_all(
            net.nodes[1:],
            lambda n: ("barrier",) in net.recorders[net.nodes.index(n)].named(
                "message_received"))
        for i, recorder in enumerate(net.recorders):
            got = [args for args in recorder.named("message_received") if args != ("barrier",)]
            assert sorted(a[0]["from"] for a in got) == [j for j in range(4) if j != i]
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_network_without_master_carries_messages():
    net = LocalNetwork(_reactor(), size=3, master=False)
    await net.start()
    try:
        assert not any(n.config.master for n in net.nodes)
        await wait_for_all(net.nodes[1:], lambda n: len(n.links) >= 1)
        await wait_for(net.nodes[1], lambda n: len(n.links) == 2)
        net.nodes[2].send_message({"load": 0.3})
        net.nodes[0].send_message({"load": 0.5})
        await wait_for(net.nodes[0], lambda n: len(net.recorders[0].named("message_received")) == 1)
        await wait_for(net.nodes[2], lambda n: len(net.recorders[2].named("message_received")) == 1)
        await wait_for(net.nodes[1], lambda n: len(net.recorders[1].named("message_received")) == 2)
        assert net.recorders[0].named("message_received") == [({"load": 0.3},)]
        assert net.recorders[2].named("message_received") == [({"load": 0.5},)]
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_replication_over_ipv6_loopback():
    net = LocalNetwork(_reactor(), size=3, interface="::1")
    await net.start()
    try:
        hashes = [net.master.add_object({"n": i}) for i in range(10)]
        await net.converged()
        net.master.remove_object(hashes[0])
        await net.converged()
        for node in net.nodes:
            assert _hashes(node) == set(hashes[1:])
        assert net.nodes[1].links[0].transport.getPeer().host == "::1"
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_non_master_cannot_change_the_table():
    net = LocalNetwork(_reactor(), size=3)
    await net.start()
    try:
        node = net.nodes[1]
        with pytest.raises(NotMasterError, match="only allowed on the master"):
            node.add_object({"evil": True})
        with pytest.raises(NotMasterError):
            node.remove_object({"evil": True})
        with pytest.raises(NotMasterError):
            node.add_objects([{"evil": True}])
        errors = net.recorders[1].named("error")
        assert [e[1] for e in errors] == ["add_object", "remove_object", "add_objects"]
        assert "not the master" in errors[0][0]
        h = net.master.add_object({"good": True})
        await net.converged()
        for n in net.nodes:
            assert _hashes(n) == {h}
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_add_objects_all_or_none():
    """
    add_objects publishes every object it is given, or, if one of them is
    not a table object, none of them, and says which.
    """
    net = LocalNetwork(_reactor(), size=2)
    await net.start()
    try:
        objects = [{"n": i} for i in range(5)]
        with pytest.raises(InvalidObjectError, match="object 3: .*NaN"):
            net.master.add_objects(objects[:3] + [{"n": float("nan")}])
        await net.master.flush()
        assert len(net.master) == 0
        hashes = net.master.add_objects(objects)
        assert hashes == [object_hash(o) for o in objects]
        await net.master.flush()
        await net.converged()
        assert _hashes(net.nodes[1]) == set(hashes)
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_returning_node_holds_exactly_the_masters_table():
    reactor = _reactor()
    net = LocalNetwork(reactor, size=3, links={1: [0], 2: [0]})
    await net.start()
    returning = None
    try:
        master = net.master
        old = [master.add_object({"old": i}) for i in range(30)]
        await net.converged()
        store = net.nodes[2]._store
        await net.nodes[2].stopService()

        new = [master.add_object({"new": i}) for i in range(50)]
        for h in old[:20]:
            master.remove_object(h)
        await master.flush()
        await wait_for(net.nodes[1], lambda n: n.head == master.head)

        returning = DistributedTable(port=0, key=net.key, reactor=reactor,
                                     store=store, interface="127.0.0.1", **FAST)
        recorder = Recorder()
        returning.subscribe(recorder)
        returning.startService()
        await returning.when_started()
        # On start it serves what it had: one object_added per stored object.
        assert len(recorder.named("object_added")) == 30
        returning.add_peer(net.address(0))
        await wait_for(returning, lambda n: n.head == master.head)
        assert _hashes(returning) == _hashes(master) == set(old[20:]) | set(new)
        assert returning.table.root() == master.head.root
        removed = {o[0]["old"] for o in recorder.named("object_removed")}
        assert removed == set(range(20))
    finally:
        if returning is not None:
            await returning.stopService()
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_node_with_another_key_cannot_link_or_inject(logs):
    reactor = _reactor()
    net = LocalNetwork(reactor, size=2)
    await net.start()
    intruder = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                                reactor=reactor, interface="127.0.0.1", **FAST)
    try:
        h = net.master.add_object({"honest": 1})
        await net.converged()
        intruder.startService()
        await intruder.when_started()
        intruder.add_peer(net.address(1))
        intruder.add_object({"forged": 1})
        # The honest node logs that it refused the connection.
        refusal = await logs.wait(
            lambda e: e.get("log_namespace") == "dtable.links"
            and "closed before its hello" in e.get("log_format", "")
            and e.get("direction") == "from")
        assert refusal["reason"]
        assert intruder.links == []
        assert net.nodes[1].links and all(
            link.node_id == net.master.node_id for link in net.nodes[1].links)
        # Nothing the intruder published reached anyone.
        h2 = net.master.add_object({"honest": 2})
        await net.converged()
        for node in net.nodes:
            assert _hashes(node) == {h, h2}
    finally:
        await intruder.stopService()
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_default_listener_accepts_both_families():
    """
    Without an interface, a node listens on every address of both families:
    peers reach it at 127.0.0.1 and at ::1 on the same port.
    """
    reactor = _reactor()
    key = crypto.generate_network_key()
    hub = DistributedTable(port=0, key=key, master=True, reactor=reactor, **FAST)
    hub.startService()
    port = await hub.when_listening()
    v4 = DistributedTable(port=0, key=key, peers=[f"127.0.0.1:{port}"], reactor=reactor,
                          interface="127.0.0.1", **FAST)
    v6 = DistributedTable(port=0, key=key, peers=[f"[::1]:{port}"], reactor=reactor,
                          interface="::1", **FAST)
    try:
        v4.startService()
        v6.startService()
        h = hub.add_object({"both": "families"})
        await wait_for_all([v4, v6], lambda n: h in n)
        assert {link.transport.getPeer().host for link in hub.links} >= {"::1"}
        assert len(hub.links) == 2
    finally:
        for node in (v6, v4, hub):
            await node.stopService()


@pytest_twisted.ensureDeferred
async def test_two_masters_are_reported_and_neither_table_flips():
    """
    A second node started as master is a configuration error: both masters
    report it through the error event, and neither adopts the other's
    table.
    """
    reactor = _reactor()
    key = crypto.generate_network_key()
    first = DistributedTable(port=0, key=key, master=True, reactor=reactor,
                             interface="127.0.0.1", **FAST)
    first_events = Recorder()
    first.subscribe(first_events)
    first.startService()
    port = await first.when_listening()
    mine = {first.add_object({"first": i}) for i in range(3)}
    await first.flush()
    other = DistributedTable(port=0, key=key, master=True, peers=[f"127.0.0.1:{port}"],
                             reactor=reactor, interface="127.0.0.1", **FAST)
    other_events = Recorder()
    other.subscribe(other_events)
    try:
        other.startService()
        await wait_for(first, lambda n: first_events.named("error"))
        await wait_for(other, lambda n: other_events.named("error"))
        assert "two masters" in first_events.named("error")[0][0]
        assert first_events.named("error")[0][1] == other.node_id
        assert "two masters" in other_events.named("error")[0][0]
        # Both keep publishing their own changes; neither follows the other.
        theirs = {other.add_object({"other": i}) for i in range(5)}
        await other.flush()
        more = first.add_object({"first": "more"})
        await first.flush()
        for i in range(3):
            first.add_object({"first": f"again {i}"})
            other.add_object({"other": f"again {i}"})
            await first.flush()
            await other.flush()
        assert mine | {more} <= set(first.table.hashes())
        assert not theirs & set(first.table.hashes())
        assert theirs <= set(other.table.hashes())
        assert more not in other
        assert first_events.named("object_removed") == []
        assert other_events.named("object_removed") == []
    finally:
        await other.stopService()
        await first.stopService()


@pytest_twisted.ensureDeferred
async def test_node_stops_while_its_peers_run():
    """
    stopService closes the node's links, inbound ones included, without
    waiting for its peers to hang up, and the peers notice the link is gone.
    """
    net = LocalNetwork(_reactor(), size=4, links={1: [0], 2: [0], 3: [1]})
    await net.start()
    try:
        await wait_for(net.master, lambda n: len(n.links) == 2)
        await wait_for(net.nodes[1], lambda n: len(n.links) == 2)
        # Node 1 has an outbound link to the master and an inbound one from 3.
        await net.nodes[1].stopService().addTimeout(10, _reactor())
        assert net.nodes[1].links == []
        await wait_for(net.nodes[3], lambda n: len(n.links) == 0)
        await wait_for(net.master, lambda n: len(n.links) == 1)
        h = net.master.add_object({"still": "replicating"})
        await wait_for(net.nodes[2], lambda n: h in n)
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_status_and_overlay_graph():
    """
    Every node's status shows its head, links and traffic, and, from the
    beacons, the whole overlay: three nodes, two links, the master and each
    node's revision.
    """
    net = LocalNetwork(_reactor(), size=3)
    await net.start()
    try:
        net.master.add_object({"seen": "everywhere"})
        await net.converged()
        rev = net.master.head.rev

        def whole(node: DistributedTable) -> bool:
            graph = node.overlay_graph()
            return (len(graph["nodes"]) == 3 and len(graph["links"]) == 2
                    and all(n["rev"] == rev for n in graph["nodes"]))

        await wait_for_all(net.nodes, whole)
        ids = {n.node_id for n in net.nodes}
        for node in net.nodes:
            graph = node.overlay_graph()
            assert {n["node_id"] for n in graph["nodes"]} == ids
            assert [n["node_id"] for n in graph["nodes"] if n["master"]] == [net.master.node_id]
            assert {(l["a"], l["b"]) for l in graph["links"]} == {
                tuple(sorted((net.nodes[0].node_id, net.nodes[1].node_id))),
                tuple(sorted((net.nodes[1].node_id, net.nodes[2].node_id)))}
            status = node.status()
            assert status["head"]["rev"] == rev and status["objects"] == 1
            assert status["traffic"]["frames_in"] > 0 and status["traffic"]["bytes_out"] > 0
            assert {link["node_id"] for link in status["links"]} <= ids
        middle = net.nodes[1].status()
        assert len(middle["links"]) == 2
        assert net.master.status()["counters"]["batches_applied"] == 1
        assert net.nodes[2].status()["counters"]["batches_applied"] + \
            net.nodes[2].status()["counters"]["catch_ups_log"] + \
            net.nodes[2].status()["counters"]["catch_ups_merkle"] >= 1
    finally:
        await net.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_start_is_reported_to_those_who_ask_after():
    """
    A node that cannot listen fails when_listening and when_started, also
    when they are asked for after startService.
    """
    reactor = _reactor()
    holder = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                              reactor=reactor, interface="127.0.0.1", **FAST)
    holder.startService()
    port = await holder.when_listening()
    node = DistributedTable(port=port, key=crypto.generate_network_key(), master=True,
                            reactor=reactor, interface="127.0.0.1", **FAST)
    try:
        node.startService()
        for waiting in (node.when_started(), node.when_listening()):
            with pytest.raises(CannotListenError):
                await waiting
    finally:
        await node.stopService()
        await holder.stopService()


@pytest_twisted.ensureDeferred
async def test_flush_of_a_master_stopped_before_it_published():
    """
    A master still learning the network's state holds what it is given;
    stopped then, its flush() fails rather than waiting for ever.
    """
    reactor = _reactor()
    master = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                              reactor=reactor, interface="127.0.0.1",
                              peers=["127.0.0.1:1"], **{**FAST, "master_sync_timeout": 30})
    master.startService()
    await master.when_started()
    master.add_object({"held": True})
    flushed = master.flush()
    assert not flushed.called
    await master.stopService()
    with pytest.raises(CancelledError, match="stopped before it could publish"):
        await flushed


class FreePortsTests(SynchronousTestCase):
    """
    Ports for nodes a test starts later: different, free, and below the
    range the system takes local ports of outgoing connections from.
    """

    def test_below_the_ephemeral_range(self) -> None:
        low, high = listening_port_range()
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
                ephemeral = int(f.read().split()[0])
        except OSError:
            ephemeral = 32768
        self.assertEqual((low, high), (20000, max(ephemeral, 21000)))

    def test_different_and_free(self) -> None:
        low, high = listening_port_range()
        for interface, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            ports = free_ports(20, interface)
            self.assertEqual(len(set(ports)), 20)
            self.assertTrue(all(low <= port < high for port in ports), ports)
            for port in ports:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((interface, port))
                    sock.listen()
