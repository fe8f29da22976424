"""
A loopback attack: a separate process opens hundreds of connections from
127.0.0.2 that send garbage or nothing. The node blocks the address with its
default thresholds, goes on replicating to an honest peer on 127.0.0.1, and
holds no more state for the attacker than its bounds allow. The numbers are
printed (run pytest with -s to see them); benchmarks/attack.py measures
rates at scale.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall

from dtable import crypto
from dtable.service import DistributedTable
from dtable.testing import FAST, wait_for

ATTACKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "attacker.py")
STRANGER = "127.0.0.2"
#: Seconds the attacker may run before it is killed and the test fails.
ATTACK_TIMEOUT = 60.0


def _reactor():
    from twisted.internet import reactor
    return reactor


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_attacker_is_blocked_and_replication_goes_on():
    reactor = _reactor()
    key = crypto.generate_network_key()
    # Silent connections are closed at the handshake timeout.
    settings = {**FAST, "handshake_timeout": 2.0}
    master = DistributedTable(port=0, key=key, master=True, reactor=reactor,
                              interface="127.0.0.1", **settings)
    master.startService()
    await master.when_started()
    replica = DistributedTable(port=0, key=key, reactor=reactor, interface="127.0.0.1",
                               peers=[f"127.0.0.1:{master.listening_port}"], **settings)
    replica.startService()
    counter = itertools.count()
    adder = LoopingCall(lambda: master.add_object({"n": next(counter)}))
    process = None
    try:
        await replica.when_started()
        await wait_for(replica, lambda n: len(n.links) == 1)
        rss_before = rss_bytes()
        adder.start(0.05)
        collect = Collect()
        process = reactor.spawnProcess(
            collect, sys.executable,
            [sys.executable, ATTACKER, "--port", str(master.listening_port),
             "--source", STRANGER, "--garbage", "300", "--silent", "100",
             "--concurrency", "20", "--hold", "20"],
            env=os.environ)
        collect.ended.addTimeout(ATTACK_TIMEOUT, reactor)
        code = await collect.ended
        process = None
        held_during_attack = len(replica)
        peak_pending = master.pending_handshakes
        adder.stop()
        await master.flush()
        await wait_for(replica, lambda n: n.head == master.head)
        rss_after = rss_bytes()

        assert code == 0, collect.err.decode()
        report = json.loads(collect.out)
        print(f"\nattack: {report}")
        print(f"firewall: {master.firewall.counts()}")
        print(f"objects replicated during the attack: {held_during_attack}; "
              f"RSS before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB")
        assert master.firewall.is_blocked(STRANGER)
        counts = master.firewall.counts()
        # Blocked after the default 30 failures: nearly all garbage
        # connections after that were refused as they were accepted.
        assert counts.refused >= 300 - master.config.block_after_failures - 20
        assert report["garbage"]["timed_out"] == 0
        assert report["silent"]["timed_out"] == 0
        # The honest peer was served all along and holds the whole table.
        assert held_during_attack > 0
        assert sorted(o["n"] for o in replica.objects()) == sorted(
            o["n"] for o in master.objects())
        # Nothing of the attacker is left but its firewall entry.
        assert counts.total == 2
        assert master.pending_handshakes == 0 and peak_pending <= 100
        assert [link.node_id for link in master.links] == [replica.node_id]
    finally:
        if adder.running:
            adder.stop()
        if process is not None:
            os.kill(process.pid, signal.SIGKILL)
        await replica.stopService()
        await master.stopService()

