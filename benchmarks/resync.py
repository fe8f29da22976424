"""
Resync cost: bytes exchanged and time to converge for a replica that missed
k changes while it was offline, caught up from the master's batch log and,
with the log exhausted, by Merkle reconciliation; and a full resync from an
empty replica.

Both nodes run in this process over real mutual TLS on 127.0.0.1, each with
its SQLite store in a temporary directory. Bytes are the frames (with their
length prefixes) both ways on the returning node's links, from its start to
the moment it holds the master's head.

    python benchmarks/resync.py [--objects 100000] [--json resync.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from dtable import DistributedTable, crypto
from dtable.testing import FAST, wait_for

SETTINGS = {k: v for k, v in FAST.items() if k != "memory"}


def payload(i: int, rng: random.Random) -> dict:
    # About 150 bytes of canonical JSON.
    return {"name": f"object-{i}", "ip": f"192.0.2.{i % 256}",
            "pad": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100))}


class Bench:
    def __init__(self, reactor, objects: int, workdir: str) -> None:
        self.reactor = reactor
        self.objects = objects
        self.workdir = workdir
        self.key = crypto.generate_network_key()
        self.rng = random.Random(7)
        self.counter = objects

    def node(self, name: str, **options) -> DistributedTable:
        return DistributedTable(port=0, key=self.key, reactor=self.reactor,
                                interface="127.0.0.1",
                                data_dir=os.path.join(self.workdir, name),
                                **{**SETTINGS, **options})

    async def master(self, log_batches: int) -> DistributedTable:
        master = self.node(f"master-{log_batches}-{self.counter}", master=True,
                           master_sync_timeout=0, log_max_batches=log_batches,
                           batch_max_ops=10_000)
        master.startService()
        await master.when_started()
        for i in range(self.objects):
            master.add_object(payload(i, self.rng))
        await master.flush()
        return master

    async def returning(self, master: DistributedTable, name: str) -> tuple[float, float, int, int]:
        node = self.node(name)
        started = time.perf_counter()
        node.startService()
        await node.when_started()
        serving = time.perf_counter() - started
        linked = time.perf_counter()
        node.add_peer(f"127.0.0.1:{master.listening_port}")
        await wait_for(node, lambda n: n.head == master.head, timeout=600)
        elapsed = time.perf_counter() - linked
        sent = sum(link.bytes_sent for link in node.links)
        received = sum(link.bytes_received for link in node.links)
        assert node.table.root() == master.head.root
        await node.stopService()
        return serving, elapsed, sent + received, len(node)

    async def change(self, master: DistributedTable, k: int, batches: int) -> int:
        """
        k changes, half adds and half removes, in C{batches} batches; returns
        the payload bytes of the changed objects.
        """
        changed_bytes = 0
        per_batch = max(1, k // batches)
        hashes = master.table.hashes()
        self.rng.shuffle(hashes)
        removes = iter(hashes)
        done = 0
        while done < k:
            for _ in range(min(per_batch, k - done)):
                if done % 2 == 0:
                    self.counter += 1
                    obj = payload(self.counter, self.rng)
                    changed_bytes += len(json.dumps(obj, separators=(",", ":")))
                    master.add_object(obj)
                else:
                    h = next(removes)
                    changed_bytes += 64
                    master.remove_object(h)
                done += 1
            await master.flush()
        return changed_bytes

    async def run(self, ks: list[int]) -> list[dict]:
        rows = []
        for mode, log_batches in (("log", 100_000), ("merkle", 1)):
            master = await self.master(log_batches)
            serving, elapsed, total, held = await self.returning(master, f"full-{mode}")
            rows.append(dict(case=f"full resync ({mode})", k=self.objects,
                             bytes=total, seconds=elapsed, start_seconds=serving,
                             held=held, changed_bytes=None))
            for k in ks:
                name = f"replica-{mode}-{k}"
                await self.returning(master, name)           # in sync, then offline
                changed = await self.change(master, k, batches=max(2, k // 100))
                serving, elapsed, total, held = await self.returning(master, name)
                rows.append(dict(case=f"missed k ({mode})", k=k, bytes=total,
                                 seconds=elapsed, start_seconds=serving, held=held,
                                 changed_bytes=changed))
            await master.stopService()
        return rows


def report(rows: list[dict], objects: int) -> None:
    print(f"\nresync of a replica of {objects} objects over TLS on 127.0.0.1 (SQLite stores)\n")
    print("start: from startService until it serves its stored table (events included);")
    print("catch-up: from dialling the master until it holds the master's head\n")
    print(f"{'case':<22}{'k':>9}{'bytes':>14}{'bytes/change':>14}{'target':>12}"
          f"{'start s':>10}{'catch-up s':>12}")
    for row in rows:
        k = row["k"]
        per = row["bytes"] / k if k else 0
        target = ""
        if row["case"].startswith("missed"):
            if "log" in row["case"]:
                limit = 2 * row["changed_bytes"] + 16 * 1024
            else:
                limit = 1024 * k + 64 * 1024
            target = "ok" if row["bytes"] <= limit else f"> {limit}"
        print(f"{row['case']:<22}{k:>9}{row['bytes']:>14,}{per:>14,.0f}{target:>12}"
              f"{row['start_seconds']:>10.3f}{row['seconds']:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--k", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    async def go(reactor):
        with tempfile.TemporaryDirectory() as workdir:
            rows = await Bench(reactor, args.objects, workdir).run(args.k)
        report(rows, args.objects)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"objects": args.objects, "rows": rows}, f, indent=2)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    sys.exit(main())
