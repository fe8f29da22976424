"""
Restart of a node that holds many objects: the time until it serves reads
(when_started fires and get() answers) and the process's resident memory,
against the raw bytes of the objects it holds.

The store is filled directly (as a node would have left it), then a fresh
node starts on it in this process.

    python benchmarks/restart.py [--objects 1000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from dtable import DistributedTable, crypto
from dtable.canonical import canonical_bytes, hash_bytes
from dtable.replication import HeadSigner
from dtable.store import SqliteStore
from dtable.table import root_of


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fill(path: str, key: str, objects: int) -> tuple[int, str]:
    rng = random.Random(1)
    network = crypto.derive_network(crypto.parse_network_key(key))
    signer = HeadSigner(network.network_id, network.master_key)
    store = SqliteStore(path)
    store.open()
    hashes = []
    raw = 0
    rev = 0
    chunk = 50_000
    for start in range(0, objects, chunk):
        adds = []
        for i in range(start, min(objects, start + chunk)):
            obj = {"name": f"object-{i}", "ip": f"192.0.2.{i % 256}",
                   "pad": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100))}
            data = canonical_bytes(obj)
            raw += len(data)
            h = hash_bytes(data)
            hashes.append(h)
            adds.append((h, data))
        rev += 1
        root = root_of(hashes) if start + chunk >= objects else "0" * 64
        store.commit(signer.sign(rev, rev - 1, root), adds, [])
    store.close()
    return raw, hashes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    key = crypto.generate_network_key()

    async def go(reactor):
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, "node")
            filled = time.perf_counter()
            raw, first = fill(os.path.join(path, "table.sqlite3"), key, args.objects)
            filled = time.perf_counter() - filled
            gc.collect()
            before = rss_bytes()
            table = DistributedTable(port=0, key=key, reactor=reactor, data_dir=path,
                                     interface="127.0.0.1")
            began = time.perf_counter()
            table.startService()
            await table.when_started()
            assert table.get(first) is not None
            serving = time.perf_counter() - began
            gc.collect()
            after = rss_bytes()
            held = after - before
            target = 2 * raw + 100 * args.objects
            await table.stopService()
            row = dict(objects=args.objects, raw_bytes=raw, fill_seconds=filled,
                       seconds_until_serving=serving, rss_before=before, rss_after=after,
                       rss_for_table=held, target=target,
                       per_object=held / args.objects)
            print(f"\nrestart of a node holding {args.objects:,} objects "
                  f"({raw / args.objects:.0f} bytes each, {raw / 1e6:.0f} MB raw)\n")
            print(f"  store filled in              {filled:8.1f} s")
            print(f"  serving reads after          {serving:8.2f} s")
            print(f"  RSS before start             {before / 1e6:8.0f} MB")
            print(f"  RSS after start              {after / 1e6:8.0f} MB")
            print(f"  RSS for the table            {held / 1e6:8.0f} MB "
                  f"({held / args.objects:.0f} bytes per object)")
            print(f"  target (2 x raw + 100/obj)   {target / 1e6:8.0f} MB "
                  f"{'ok' if held <= target else 'over'}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(row, f, indent=2)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
