"""
The overlay over real TLS on loopback: discovery from a few initial
addresses, latency-based choice of the primary link, and healing after a
partition (with dtable.faults' proxies adding latency and cutting links).
"""

from __future__ import annotations

import random

import pytest_twisted
from twisted.internet.defer import DeferredList

from dtable import crypto
from dtable.service import DistributedTable
from dtable.testing import FAST, wait_for, wait_for_all


def _reactor():
    from twisted.internet import reactor
    return reactor


def components(nodes: list[DistributedTable]) -> list[set[str]]:
    """
    The connected components of the graph of live links among C{nodes}.
    """
    ids = {n.node_id for n in nodes}
    edges: dict[str, set[str]] = {i: set() for i in ids}
    for node in nodes:
        for link in node.links:
            if link.node_id in ids:
                edges[node.node_id].add(link.node_id)
                edges[link.node_id].add(node.node_id)
    seen: set[str] = set()
    parts = []
    for start in sorted(ids):
        if start in seen:
            continue
        part, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current in part:
                continue
            part.add(current)
            todo.extend(edges[current] - part)
        seen |= part
        parts.append(part)
    return parts


async def start_nodes(count: int, key: str, **options) -> list[DistributedTable]:
    nodes = [DistributedTable(port=0, key=key, master=i == 0, reactor=_reactor(),
                              interface="127.0.0.1", **{**FAST, **options})
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
