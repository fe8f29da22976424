"""
Nodes with SQLite stores on disk, over real TLS on loopback: restarts keep
the table, and a master that lost its disk gets its table back from the
network instead of wiping it.
"""

from __future__ import annotations

import os
import shutil

import pytest_twisted

from dtable import crypto
from dtable.service import DistributedTable
from dtable.testing import FAST, Recorder, wait_for, wait_for_all

DISK = {k: v for k, v in FAST.items() if k != "memory"}


def _reactor():
    from twisted.internet import reactor
    return reactor


def node(tmp_path, name: str, key: str, **options) -> DistributedTable:
    return DistributedTable(port=0, key=key, reactor=_reactor(), interface="127.0.0.1",
                            data_dir=str(tmp_path / name), **{**DISK, **options})


async def started(table: DistributedTable) -> DistributedTable:
    table.startService()
    await table.when_started()
    return table


def address(table: DistributedTable) -> str:
    return f"127.0.0.1:{table.listening_port}"


@pytest_twisted.ensureDeferred
async def test_restarted_master_continues_from_its_revision(tmp_path):
    key = crypto.generate_network_key()
    master = await started(node(tmp_path, "master", key, master=True))
    hashes = [master.add_object({"n": i}) for i in range(100)]
    head = await master.flush()
    await master.stopService()

    again = node(tmp_path, "master", key, master=True, master_sync_timeout=0)
    recorder = Recorder()
    again.subscribe(recorder)
    await started(again)
    try:
        assert again.head == head
        assert set(again.table.hashes()) == set(hashes)
        # Served from disk at start: one object_added per stored object.
        assert len(recorder.named("object_added")) == 100
        assert again.get(hashes[0]) == {"n": 0}
        again.add_object({"n": "next"})
        assert (await again.flush()).rev == head.rev + 1
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_master_that_lost_its_disk_recovers_from_the_network(tmp_path):
    key = crypto.generate_network_key()
    master = await started(node(tmp_path, "master", key, master=True,
                                batch_max_ops=250))
    replicas = [await started(node(tmp_path, f"replica{i}", key)) for i in range(2)]
    restarted = None
    try:
        # replica 0 dials the master, replica 1 dials replica 0.
        replicas[0].add_peer(address(master))
        replicas[1].add_peer(address(replicas[0]))
        hashes = {master.add_object({"n": i, "pad": "x" * 100}) for i in range(1000)}
        head = await master.flush()
        await wait_for_all(replicas, lambda n: n.head == head)
        await master.stopService()
        shutil.rmtree(tmp_path / "master")
        assert not os.path.exists(tmp_path / "master")

        # The master comes back empty, dialling its former replicas; it adds
        # an object at once, as the seed's example does.
        restarted = node(tmp_path, "master", key, master=True,
                         peers=[address(r) for r in replicas], master_sync_timeout=5)
        recorder = Recorder()
        restarted.subscribe(recorder)
        await started(restarted)
        assert len(restarted) == 0
        extra = restarted.add_object({"added": "at start"})
        after = await restarted.flush()
        # It published only after it had caught up to the newest state
        # signed by its key: nothing was removed anywhere.
        assert after.rev == head.rev + 1
        assert set(restarted.table.hashes()) == hashes | {extra}
        assert recorder.named("object_removed") == []
        await wait_for_all(replicas, lambda n: n.head == after)
        for replica in replicas:
            assert set(replica.table.hashes()) == hashes | {extra}
    finally:
        for table in [restarted, *replicas]:
            if table is not None and table.running:
                await table.stopService()


@pytest_twisted.ensureDeferred
async def test_replica_restarted_from_disk_catches_up_from_the_log(tmp_path):
    key = crypto.generate_network_key()
    master = await started(node(tmp_path, "master", key, master=True))
    replica = await started(node(tmp_path, "replica", key))
    returning = None
    try:
        replica.add_peer(address(master))
        old = [master.add_object({"old": i}) for i in range(50)]
        first = await master.flush()
        await wait_for(replica, lambda n: n.head == first)
        await replica.stopService()
        new = [master.add_object({"new": i}) for i in range(5)]
        for h in old[:5]:
            master.remove_object(h)
        head = await master.flush()

        returning = node(tmp_path, "replica", key)
        recorder = Recorder()
        returning.subscribe(recorder)
        await started(returning)
        assert len(recorder.named("object_added")) == 50
        returning.add_peer(address(master))
        await wait_for(returning, lambda n: n.head == head)
        assert set(returning.table.hashes()) == set(old[5:]) | set(new)
        assert len(recorder.named("object_removed")) == 5
        # Five adds and five removes in one batch: one log entry, a few KB.
        received = sum(link.bytes_received for link in returning.links)
        assert received < 8 * 1024
    finally:
        for table in (returning, master):
            if table is not None and table.running:
                await table.stopService()
