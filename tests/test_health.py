"""
The node watching itself: the reactor stall probe, the memory report, and
SIGUSR2 on a node run by twistd.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import tempfile
import tracemalloc

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto
from dtable.health import StallProbe, memory_report
from dtable.service import DistributedTable
from dtable.testing import FAST, twistd_command

#: Seconds the twistd child may take to start, report and stop.
CHILD_TIMEOUT = 60.0


class StallProbeTests(SynchronousTestCase):
    def test_worst_and_recent(self) -> None:
        clock = Clock()
        probe = StallProbe(clock, 0.01)
        probe.start()
        clock.advance(0.01)
        self.assertEqual(probe.report()["worst_stall_ms"], 0.0)
        # The reactor was busy for 250 ms: the timer fires 240 ms late.
        clock.advance(0.25)
        report = probe.report()
        self.assertAlmostEqual(report["worst_stall_ms"], 240.0, places=3)
        self.assertAlmostEqual(report["recent_worst_stall_ms"], 240.0, places=3)
        for _ in range(7000):
            clock.advance(0.01)
        report = probe.report()
        self.assertAlmostEqual(report["worst_stall_ms"], 240.0, places=3)
        self.assertLess(report["recent_worst_stall_ms"], 1.0)
        self.assertEqual(report["probe_interval_ms"], 10.0)
        probe.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stalls_counted_by_threshold(self) -> None:
        """
        Each stall counts under every threshold it is longer than.
        """
        clock = Clock()
        probe = StallProbe(clock, 0.01)
        probe.start()
        self.assertEqual(probe.report()["stalls_over_ms"],
                         {"50": 0, "100": 0, "250": 0, "1000": 0})
        for busy in (0.25, 0.07, 0.13, 0.04, 1.5, 0.3):
            # The reactor was busy for `busy` seconds: the timer fires that
            # much late, less its interval.
            clock.advance(busy)
            clock.advance(0.01)
        self.assertEqual(probe.report()["stalls_over_ms"],
                         {"50": 5, "100": 4, "250": 2, "1000": 1})
        probe.stop()


class MemoryReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                                     reactor=MemoryReactorClock(),
                                     **{**FAST, "master_sync_timeout": 0})
        self.node.startService()
        self.successResultOf(self.node.when_started())
        self.addCleanup(lambda: self.successResultOf(self.node.stopService()))
        if not tracemalloc.is_tracing():
            self.addCleanup(tracemalloc.stop)

    def test_report(self) -> None:
        for i in range(50):
            self.node.add_object({"n": i})
        self.successResultOf(self.node.flush())
        directory = tempfile.mkdtemp(prefix="dtable-report-")
        self.addCleanup(shutil.rmtree, directory)
        first = memory_report(self.node, directory)
        with open(first) as f:
            text = f.read()
        self.assertIn(f"node {self.node.node_id}", text)
        self.assertIn("objects in the table: 50", text)
        self.assertIn("resident memory:", text)
        self.assertIn(" dict\n", text)
        self.assertTrue(tracemalloc.is_tracing())
        self.assertIn("traces from now on", text)
        second = memory_report(self.node, directory)
        self.assertNotEqual(first, second)
        with open(second) as f:
            self.assertIn("top 30 lines:", f.read())


class GarbageCollectorTests(SynchronousTestCase):
    def start(self, **options: object) -> DistributedTable:
        node = DistributedTable(port=0, key=crypto.generate_network_key(), master=True,
                                reactor=MemoryReactorClock(),
                                **{**FAST, "master_sync_timeout": 0, **options})
        node.startService()
        self.addCleanup(lambda: self.successResultOf(node.stopService()))
        self.addCleanup(gc.unfreeze)
        return node

    def test_frozen_once_started(self) -> None:
        """
        With gc_freeze (as under twistd), what the process holds once the
        node started is out of the collector's reach; by default the
        embedding application's collector is left alone.
        """
        gc.unfreeze()
        self.successResultOf(self.start().when_started())
        self.assertEqual(gc.get_freeze_count(), 0)
        self.successResultOf(self.start(gc_freeze=True).when_started())
        self.assertGreater(gc.get_freeze_count(), 0)


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred = Deferred()
        self._waiting: list[tuple[bytes, Deferred]] = []

    def logged(self, text: bytes) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((text, d))
        self._check()
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for entry in list(self._waiting):
            if entry[0] in self.output:
                self._waiting.remove(entry)
                entry[1].callback(None)

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_sigusr2_writes_a_report_and_the_node_goes_on(tmp_path):
    from twisted.internet import reactor


    key_file = tmp_path / "net.key"
    key_file.write_text(crypto.generate_network_key())
    data_dir = tmp_path / "node"
    child = Child()
    process = reactor.spawnProcess(
        child, twistd_command()[0], [*twistd_command(), "-n", "--pidfile=", "--logfile=-", "dtable",
                              "--port", "0", "--interface", "127.0.0.1", "--master",
                              "--key-file", str(key_file), "--data-dir", str(data_dir)],
        env=os.environ.copy(), path=str(tmp_path))
    try:
        await child.logged(b"listening on port").addTimeout(CHILD_TIMEOUT, reactor)
        os.kill(process.pid, signal.SIGUSR2)
        await child.logged(b"memory report written to").addTimeout(CHILD_TIMEOUT, reactor)
        reports = [name for name in os.listdir(data_dir) if name.startswith("memory-")]
        assert len(reports) == 1, child.output.decode()
        with open(data_dir / reports[0]) as f:
            assert "objects in the table: 0" in f.read()
        os.kill(process.pid, signal.SIGTERM)
        await child.ended.addTimeout(CHILD_TIMEOUT, reactor)
        assert b"Traceback" not in child.output, child.output.decode()
    finally:
        if not child.ended.called:
            os.kill(process.pid, signal.SIGKILL)
            await child.ended
