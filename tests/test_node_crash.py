"""
A replica running as its own twistd process is killed with SIGKILL while a
large batch reaches it; restarted on the same data directory it holds a
consistent state (its root matches its head) and converges to the master.
"""

from __future__ import annotations

import os
import signal

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from dtable import crypto
from dtable.service import DistributedTable
from dtable.store import DB_NAME, SqliteStore
from dtable.table import root_of
from dtable.testing import FAST, twistd_command, wait_for

DISK = {k: v for k, v in FAST.items() if k != "memory"}


def _reactor():
    from twisted.internet import reactor
    return reactor




class Child(ProcessProtocol):
    """
    Collects the child's log; C{batches(n)} fires once it has logged the
    receipt of n batch frames (it logs every frame at --debug 3).
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred = Deferred()
        self._waiting: list[tuple[int, Deferred]] = []

    def batches(self, count: int) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    def _check(self) -> None:
        seen = self.output.count(b"frame Batch from")
        for entry in list(self._waiting):
            if seen >= entry[0]:
                self._waiting.remove(entry)
                entry[1].callback(seen)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


@pytest_twisted.ensureDeferred
async def test_replica_killed_during_a_large_batch_recovers(tmp_path):
    reactor = _reactor()
    key = crypto.generate_network_key()
    key_file = tmp_path / "net.key"
    key_file.write_text(key)
    data_dir = tmp_path / "replica"
    master = DistributedTable(port=0, key=key, master=True, reactor=reactor,
                              interface="127.0.0.1", batch_max_ops=40_000, **FAST)
    master.startService()
    port = await master.when_listening()
    child = Child()
    process = reactor.spawnProcess(
        child, twistd_command()[0], [*twistd_command(), "-n", "--pidfile=", "--logfile=-", "dtable",
                              "--port", "0", "--interface", "127.0.0.1",
                              "--key-file", str(key_file), "--data-dir", str(data_dir),
                              "--peer", f"127.0.0.1:{port}", "--ping-interval", "0.5",
                              "--reconnect-initial-delay", "0.05", "--debug", "3"],
        env=os.environ.copy(), path=str(tmp_path))
    recovered = None
    try:
        await wait_for(master, lambda n: len(n.links) == 1, timeout=30)
        small = {master.add_object({"first": i}) for i in range(10)}
        first = await master.flush()
        await child.batches(1).addTimeout(30, reactor)
        big = {master.add_object({"n": i, "pad": "y" * 120}) for i in range(30_000)}
        await master.flush()
        # The replica logs the big batch's frame as it arrives, then applies
        # it (about 5 MB: canonical encoding, the trie, one SQLite commit):
        # kill it then.
        await child.batches(2).addTimeout(30, reactor)
        os.kill(process.pid, signal.SIGKILL)
        await child.ended.addTimeout(30, reactor)

        store = SqliteStore(os.path.join(data_dir, DB_NAME))
        store.open()
        head = store.head()
        stored = list(store.hashes())
        store.close()
        assert root_of(stored) == head.root
        assert head.rev in (first.rev, master.head.rev), child.output.decode()

        recovered = DistributedTable(port=0, key=key, reactor=reactor,
                                     interface="127.0.0.1", data_dir=str(data_dir),
                                     peers=[f"127.0.0.1:{port}"], **DISK)
        recovered.startService()
        await recovered.when_started()
        await wait_for(recovered, lambda n: n.head == master.head, timeout=60)
        assert set(recovered.table.hashes()) == small | big
    finally:
        if process.pid is not None:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not child.ended.called:
                await child.ended
        if recovered is not None:
            await recovered.stopService()
        await master.stopService()
