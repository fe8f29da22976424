"""
The overlay over real TLS on loopback: discovery from a few initial
addresses, latency-based choice of the primary link, and healing after a
partition (with dtable.faults' proxies adding latency and cutting links).
"""

from __future__ import annotations

import random

import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.task import LoopingCall

from dtable import crypto
from dtable.service import DistributedTable
from dtable.testing import FAST, ProxyMesh, components, free_ports, wait_for, wait_for_all


def _reactor():
    from twisted.internet import reactor
    return reactor


async def start_nodes(count: int, key: str, mesh: ProxyMesh | None = None,
                      **options) -> list[DistributedTable]:
    """
    Start C{count} nodes, node 0 the master; with C{mesh}, node i dials
    through the mesh as C{str(i)}.
    """
    nodes = [DistributedTable(port=0, key=key, master=i == 0, reactor=_reactor(),
                              interface="127.0.0.1",
                              connect_ssl=mesh.connector(str(i)) if mesh else None,
                              **{**FAST, **options})
             for i in range(count)]
    for node in nodes:
        node.startService()
    await DeferredList([n.when_started() for n in nodes], fireOnOneErrback=True)
    return nodes


async def stop_nodes(nodes: list[DistributedTable]) -> None:
    await DeferredList([n.stopService() for n in nodes if n.running], consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_twenty_nodes_from_one_or_two_addresses_form_one_overlay():
    rng = random.Random(20)
    key = crypto.generate_network_key()
    nodes = await start_nodes(20, key)
    try:
        for i, node in enumerate(nodes[1:], start=1):
            for j in rng.sample(range(i), min(i, rng.choice((1, 2)))):
                node.add_peer(f"127.0.0.1:{nodes[j].listening_port}")
        master = nodes[0]
        h = master.add_object({"reaches": "everyone"})
        head = await master.flush()
        await wait_for_all(nodes, lambda n: n.head == head, timeout=60)
        assert all(h in n for n in nodes)
        assert len(components(nodes)) == 1
        # Discovery: nodes learn of nodes they were not given, and every
        # node's beacons reach every other node.
        await wait_for_all(
            nodes, lambda n: len(n.overlay()["component"]) == 20, timeout=60)
        learned = [len(n.directory.addresses()) for n in nodes]
        assert max(learned) > 2
    finally:
        await stop_nodes(nodes)


@pytest_twisted.ensureDeferred
async def test_primary_follows_latency_and_no_update_is_lost():
    """
    A node whose candidates sit behind 5, 40 and 80 ms of latency links to
    the 5 ms one; when that one's latency rises to 100 ms it moves to the
    40 ms one after the better-primary wait, while the master keeps
    publishing, and it misses nothing.
    """
    reactor = _reactor()
    key = crypto.generate_network_key()
    master, *peers = await start_nodes(4, key)
    mesh = None
    node = None
    publisher = None
    try:
        for peer in peers:
            peer.add_peer(f"127.0.0.1:{master.listening_port}")
        fast, middle, slow = (f"127.0.0.1:{p.listening_port}" for p in peers)
        one_way = {fast: 0.005, middle: 0.040, slow: 0.080}
        mesh = ProxyMesh(reactor, latency=lambda source, target: one_way.get(target, 0.150))
        node = DistributedTable(port=0, key=key, reactor=reactor, interface="127.0.0.1",
                                peers=[slow, middle, fast],
                                connect_ssl=mesh.connector("node"),
                                **{**FAST, "ping_window": 5, "better_primary_wait": 1.0,
                                   "probe_retest": 2.0})
        node.startService()
        await node.when_started()

        def primary_is(address):
            def check(n):
                view = n.overlay()
                return view["primary"] == address and any(
                    link["address"] == address for link in view["links"])
            return check

        await wait_for(node, primary_is(fast), timeout=60)
        counter = iter(range(10_000))
        publisher = LoopingCall(lambda: master.add_object({"during": next(counter)}))
        publisher.clock = reactor
        publisher.start(0.05)
        mesh.set_latency(0.100, lambda source, target: target == fast)
        await wait_for(node, primary_is(middle), timeout=60)
        publisher.stop()
        publisher = None
        head = await master.flush()
        await wait_for(node, lambda n: n.head == head, timeout=60)
        assert set(node.table.hashes()) == set(master.table.hashes())
        assert len(node) > 0
    finally:
        if publisher is not None:
            publisher.stop()
        if node is not None:
            await node.stopService()
        await stop_nodes([master, *peers])
        if mesh is not None:
            await mesh.stop()


@pytest_twisted.ensureDeferred
async def test_partition_heals_into_one_overlay_with_the_masters_table():
    reactor = _reactor()
    rng = random.Random(4)
    key = crypto.generate_network_key()
    mesh = ProxyMesh(reactor)
    nodes = await start_nodes(20, key, mesh, probe_retest=2.0)
    try:
        index = {f"127.0.0.1:{n.listening_port}": i for i, n in enumerate(nodes)}
        for i, node in enumerate(nodes[1:], start=1):
            for j in rng.sample(range(i), min(i, rng.choice((1, 2)))):
                node.add_peer(f"127.0.0.1:{nodes[j].listening_port}")
        master = nodes[0]
        kept = [master.add_object({"before": i}) for i in range(20)]
        head = await master.flush()
        await wait_for_all(nodes, lambda n: n.head == head, timeout=60)

        # Discovery first: every node hears every other's beacons and has
        # learned addresses beyond the ones it was given.
        await wait_for_all(nodes, lambda n: len(n.overlay()["component"]) == 20, timeout=60)
        await wait_for_all(nodes, lambda n: len(n.directory.addresses()) >= 10, timeout=60)

        def across(source: str, target: str) -> bool:
            return (int(source) < 10) != (index[target] < 10)

        mesh.partition(across)
        await wait_for_all(
            nodes, lambda n: all((nodes.index(n) < 10) == (index.get(link["address"], -1) < 10)
                                 for link in n.overlay()["links"]
                                 if link["address"] in index),
            timeout=60)
        assert len(components(nodes)) >= 2
        # Each side links up among itself, so healing needs the fragments to
        # find each other, not just a retry of a cut link.
        await wait_for_all(nodes, lambda n: len(n.links) >= 1, timeout=60)
        for h in kept[:10]:
            master.remove_object(h)
        added = [master.add_object({"during": i}) for i in range(10)]
        head = await master.flush()
        # Nothing crosses the cut: the other side stays behind until it heals.
        await wait_for_all(nodes[:1], lambda n: n.head == head)
        assert all(n.head.rev < head.rev for n in nodes[10:])
        assert sum(1 for n in nodes[10:] for link in n.links if index.get(
            str(n._address_of(link)), 99) < 10) == 0

        mesh.heal()
        await wait_for_all(nodes, lambda n: n.head == master.head, timeout=120)
        await wait_for_all(nodes, lambda n: len(components(nodes)) == 1, timeout=120)
        expected = set(kept[10:]) | set(added)
        for node in nodes:
            assert set(node.table.hashes()) == expected
    finally:
        await stop_nodes(nodes)
        await mesh.stop()


@pytest_twisted.ensureDeferred
async def test_extra_outbound_links_for_redundancy():
    """
    With outbound_links=2 a node keeps a second outbound link; when one peer
    goes away it still has a link and keeps replicating.
    """
    key = crypto.generate_network_key()
    master, one, two = await start_nodes(3, key)
    node = None
    try:
        one.add_peer(f"127.0.0.1:{master.listening_port}")
        two.add_peer(f"127.0.0.1:{master.listening_port}")
        node = DistributedTable(port=0, key=key, reactor=_reactor(), interface="127.0.0.1",
                                peers=[f"127.0.0.1:{one.listening_port}",
                                       f"127.0.0.1:{two.listening_port}"],
                                outbound_links=2, learn_peers=False, **FAST)
        node.startService()
        await wait_for(node, lambda n: sum(1 for link in n.links if link.outbound
                                           and link.role == "link") == 2)
        await one.stopService()
        h = master.add_object({"still": "linked"})
        await wait_for(node, lambda n: h in n)
        assert [link.node_id for link in node.links] == [two.node_id]
    finally:
        if node is not None:
            await node.stopService()
        await stop_nodes([master, one, two])


@pytest_twisted.ensureDeferred
async def test_master_that_only_dials_out():
    """
    A master nobody can reach (behind NAT: every connection to it is cut)
    still publishes to the network over the link it dials.
    """
    reactor = _reactor()
    key = crypto.generate_network_key()
    mesh = ProxyMesh(reactor)
    nodes = await start_nodes(4, key, mesh)
    try:
        master_address = f"127.0.0.1:{nodes[0].listening_port}"
        mesh.partition(lambda source, target: target == master_address)
        nodes[0].add_peer(f"127.0.0.1:{nodes[1].listening_port}")
        for node in nodes[2:]:
            node.add_peer(master_address)
            node.add_peer(f"127.0.0.1:{nodes[1].listening_port}")
        hashes = {nodes[0].add_object({"from": "behind nat", "n": i}) for i in range(5)}
        head = await nodes[0].flush()
        await wait_for_all(nodes, lambda n: n.head == head, timeout=60)
        for node in nodes[1:]:
            assert set(node.table.hashes()) == hashes
        assert all(link.outbound for link in nodes[0].links)
    finally:
        await stop_nodes(nodes)
        await mesh.stop()


@pytest_twisted.ensureDeferred
async def test_master_that_started_last_is_joined_by_the_nodes_that_know_it():
    """
    Node one's only address is the master's, which does not listen yet; node
    two dials node one, and one, giving up on the master, links back to two.
    When the master starts, both probe it, but it knows neither: with the
    smallest id it would be the one to merge the two fragments, so one of
    the others has to link to it.
    """
    reactor = _reactor()
    key = crypto.generate_network_key()
    [port] = free_ports(1)

    def node_whose_id(condition, **options) -> DistributedTable:
        # Each try meets the condition with a chance of a half or more.
        for _ in range(100):
            node = DistributedTable(key=key, reactor=reactor, interface="127.0.0.1",
                                    **FAST, **options)
            if condition(node.node_id):
                return node
        raise AssertionError("no node id met the condition in 100 tries")

    master = node_whose_id(lambda node_id: node_id < "8", port=port, master=True)

    def above_master(**options) -> DistributedTable:
        return node_whose_id(lambda node_id: node_id > master.node_id, port=0, **options)

    one = above_master(peers=[f"127.0.0.1:{port}"])
    two = None
    try:
        one.startService()
        await one.when_started()
        two = above_master(peers=[f"127.0.0.1:{one.listening_port}"])
        two.startService()
        await wait_for(one, lambda n: n.overlay()["primary"]
                       == f"127.0.0.1:{two.listening_port}", timeout=60)
        master.startService()
        await master.when_started()
        h = master.add_object({"started": "last"})
        head = await master.flush()
        nodes = [master, one, two]
        await wait_for_all(nodes, lambda n: n.head == head, timeout=60)
        assert all(h in n for n in nodes)
        assert len(components(nodes)) == 1
    finally:
        await stop_nodes([n for n in (master, one, two) if n is not None])
