"""
The firewall in a running node, over real sockets on loopback: strangers
from 127.0.0.2 that send garbage or nothing are counted and blocked at
accept time, while peers on 127.0.0.1 that hold the network key link as
before.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from dtable.hostfirewall import run_command
from dtable.service import DistributedTable
from dtable.testing import FAST, LocalNetwork, wait_for

STRANGER = "127.0.0.2"
GARBAGE = b"GET / HTTP/1.1\r\nHost: not-a-node\r\n\r\n" * 16
#: Seconds a raw connection may stay open before the test fails.
CLOSE_TIMEOUT = 10.0


def _reactor():
    from twisted.internet import reactor
    return reactor


class RawClient(Protocol):
    """
    A stranger's connection: it sends C{payload} (or nothing) and records
    what comes back until the node closes it.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = 0
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


async def open_raw(port: int, payload: bytes = b"", source: str = STRANGER) -> RawClient:
    endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", port, timeout=5,
                                  bindAddress=(source, 0))
    client = RawClient(payload)
    await connectProtocol(endpoint, client)
    client.closed.addTimeout(CLOSE_TIMEOUT, _reactor())
    return client


async def garbage(port: int) -> int:
    """
    One connection that sends garbage; returns the bytes it got back once
    the node closed it.
    """
    client = await open_raw(port, GARBAGE)
    return await client.closed


async def start(**options) -> DistributedTable:
    node = DistributedTable(port=0, key=KEY, reactor=_reactor(), interface="127.0.0.1",
                            **{**FAST, **options})
    node.startService()
    await node.when_started()
    return node


KEY = LocalNetwork(_reactor(), size=0).key


@pytest_twisted.ensureDeferred
async def test_failures_block_the_address_and_honest_peers_still_link(logs):
    node = await start(master=True, block_after_failures=3)
    blocks = []
    node.on_block(blocks.append)
    peer = await start()
    try:
        for _ in range(3):
            await garbage(node.listening_port)
        assert node.firewall.is_blocked(STRANGER)
        assert [(e.kind, e.address) for e in blocks] == [("address", STRANGER)]
        assert "3 failed handshakes" in blocks[0].reason
        assert logs.matching(lambda e: e.get("address") == STRANGER
                             and "block" in e.get("log_format", ""))
        # Refused as it is accepted: closed at once, nothing sent back.
        refused_before = node.firewall.counts().refused
        assert await garbage(node.listening_port) == 0
        assert node.firewall.counts().refused == refused_before + 1
        # A node with the network key, on another address, links and follows.
        peer.add_peer(f"127.0.0.1:{node.listening_port}")
        h = node.add_object({"still": "replicating"})
        await wait_for(peer, lambda n: h in n)
        details = node.firewall.details("127.0.0.1")
        assert details is not None and not details["blocked"]
        assert details["new_connections"] == 0
    finally:
        await peer.stopService()
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_never_block_counts_but_lets_everyone_in():
    node = await start(block_after_failures=1, never_block=True)
    try:
        for _ in range(3):
            await garbage(node.listening_port)
        assert not node.firewall.is_blocked(STRANGER)
        details = node.firewall.details(STRANGER)
        assert details["failures"] >= 1 and details["new_connections"] == 3
        assert node.firewall.counts().refused == 0
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_block_command_applies_the_block_on_the_host(logs):
    directory = tempfile.mkdtemp(prefix="dtable-firewall-")
    try:
        record = os.path.join(directory, "blocked")
        command = (f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a')"
                   f".write(sys.argv[2] + '\\n')\" {record} {{address}}")
        node = await start(block_after_failures=1, block_command=command)
        try:
            await garbage(node.listening_port)
            await logs.wait(lambda e: "firewall command" in e.get("log_format", ""))
            with open(record) as f:
                assert f.read() == STRANGER + "\n"
        finally:
            await node.stopService()
    finally:
        shutil.rmtree(directory)


@pytest_twisted.ensureDeferred
async def test_handshakes_in_progress_are_capped():
    """
    Past max_pending_handshakes, new connections are closed as they are
    accepted; those already open are closed at the handshake timeout and
    count as failures.
    """
    node = await start(max_pending_handshakes=2, handshake_timeout=1.0)
    try:
        silent = [await open_raw(node.listening_port) for _ in range(2)]
        extra = await open_raw(node.listening_port)
        assert await extra.closed == 0
        assert node.refused_busy == 1
        assert not any(client.closed.called for client in silent)
        for client in silent:
            await client.closed
        assert node.firewall.details(STRANGER)["failures"] == 2
        assert node.firewall.details(STRANGER)["new_connections"] == 2
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_host_firewall_command_is_bounded_in_time(logs):
    """
    A command that hangs is killed after its timeout; one that fails is
    logged with its exit code and error output.
    """
    hang = f"{sys.executable} -c \"import time; time.sleep(60)\" {{address}}"
    assert await run_command(_reactor(), hang, STRANGER, timeout=0.5) is None
    assert logs.matching(lambda e: "killing it" in e.get("log_format", ""))
    fail = f"{sys.executable} -c \"import sys; sys.exit('no such chain: ' + sys.argv[1])\" {{address}}"
    assert await run_command(_reactor(), fail, STRANGER) == 1
    failed = logs.matching(lambda e: e.get("status") == "exit 1")
    assert failed and "no such chain: 127.0.0.2" in failed[0]["stderr"]
