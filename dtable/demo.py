"""
The local demo: a small dtable network in one process, on loopback.

    python -m dtable demo --nodes 5 --objects 3

L{run} starts C{nodes} nodes on 127.0.0.1 with ephemeral ports, linked as a
binary tree (node i dials node (i - 1) // 2; node 0 is the master). The master
adds C{objects} objects in one batch and removes one of them in a second
batch; once every node holds exactly the master's table, the last node
broadcasts a message. The demo prints what replicated where and stops every
node.

This module is a program, not part of the library's API: it prints to
stdout and ends the process through L{twisted.internet.task.react}. It knows
nothing of the protocol; it only uses the public API of
L{dtable.service.DistributedTable} and the helpers of L{dtable.testing}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any, Callable

from twisted.internet.defer import DeferredList

from dtable.service import DistributedTable
from dtable.testing import LocalNetwork, wait_for

#: Seconds the whole demo may take to converge and deliver the message.
DEFAULT_TIMEOUT = 30.0

MAX_NODES = 64
MAX_OBJECTS = 10_000


def tree_links(size: int) -> dict[int, list[int]]:
    """
    The links of a binary tree of C{size} nodes rooted at node 0: node i
    dials node (i - 1) // 2.
    """
    return {i: [(i - 1) // 2] for i in range(1, size)}


def _bounded_int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{name} must be between {low} and {high}, not {value}")
        return value

    parse.__name__ = name
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add the demo's options (--nodes, --objects) to C{parser}.
    """
    parser.add_argument(
        "--nodes", type=_bounded_int("nodes", 2, MAX_NODES), default=5, metavar="N",
        help="how many nodes to run, the master included (2-%d; default 5)" % MAX_NODES)
    parser.add_argument(
        "--objects", type=_bounded_int("objects", 1, MAX_OBJECTS), default=3, metavar="K",
        help="how many objects the master adds before removing one "
             "(1-%d; default 3)" % MAX_OBJECTS)


async def _wait_each(tables: list[DistributedTable],
                     predicate: Callable[[DistributedTable], bool],
                     timeout: float) -> bool:
    """
    Wait until C{predicate} holds for every table or C{timeout} passes, and
    say whether it held for all. Every wait ends by then, so nothing is left
    scheduled.
    """
    results = await DeferredList([wait_for(t, predicate, max(timeout, 0.0))
                                  for t in tables], consumeErrors=True)
    return all(ok for ok, _ in results)


def _print_table(net: LocalNetwork, sender: int, out: IO[str]) -> None:
    master_hashes = set(net.master.table.hashes())
    rows = [("node", "port", "role", "links", "revision", "objects",
             "messages", "errors", "same as master")]
    for i, (node, recorder) in enumerate(zip(net.nodes, net.recorders)):
        same = node.head == net.master.head and set(node.table.hashes()) == master_hashes
        role = "master" if node.config.master else ("sender" if i == sender else "")
        rows.append((str(i), str(node.listening_port), role, str(len(node.links)),
                     str(node.head.rev), str(len(node)),
                     str(len(recorder.named("message_received"))),
                     str(len(recorder.named("error"))),
                     "yes" if same else "NO"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if cell.isdigit() else cell.ljust(width)
                        for cell, width in zip(row, widths)).rstrip(), file=out)


async def run(reactor: Any, nodes: int = 5, objects: int = 3, *,
              timeout: float = DEFAULT_TIMEOUT, out: IO[str] | None = None) -> None:
    """
    Run the demo; meant for L{twisted.internet.task.react}.

    @param reactor: the reactor to run the nodes on.
    @param nodes: how many nodes, the master included (at least 2).
    @param objects: how many objects the master adds (at least 1).
    @param timeout: seconds the network has to converge and deliver the
        message.
    @param out: where to print; stdout by default.

    @raise SystemExit: with code 1 if the nodes could not start, the network
        did not converge or the message did not reach every other node
        within C{timeout}; the table is printed and every node stopped first.
    @raise ValueError: if C{nodes} or C{objects} is out of range.
    """
    if not 2 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be between 2 and {MAX_NODES}, not {nodes}")
    if not 1 <= objects <= MAX_OBJECTS:
        raise ValueError(f"objects must be between 1 and {MAX_OBJECTS}, not {objects}")
    demo = _Demo(reactor, nodes, objects, timeout, out if out is not None else sys.stdout)
    try:
        ok = await demo.play()
    finally:
        await demo.stop()
    if not ok:
        raise SystemExit(1)


class _Demo:
    """
    One run of the demo: the network, what to print, and the deadline.
    """

    def __init__(self, reactor: Any, nodes: int, objects: int, timeout: float,
                 out: IO[str]) -> None:
        self.reactor = reactor
        self.size = nodes
        self.objects = objects
        self.timeout = timeout
        self.out = out
        self.links = tree_links(nodes)
        self.net = LocalNetwork(reactor, size=nodes, links=self.links)
        self.recorders = dict(zip(self.net.nodes, self.net.recorders))
        self.sender = nodes - 1
        self.deadline = reactor.seconds() + timeout
        self.listening = False

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def remaining(self) -> float:
        return self.deadline - self.reactor.seconds()

    async def play(self) -> bool:
        """
        Start the nodes, change the table, send the message; say whether
        everything arrived everywhere in time.
        """
        net, say = self.net, self.say
        say(f"dtable demo: {self.size} nodes in one process on 127.0.0.1, "
            "node 0 is the master")
        try:
            await net.start()
        except Exception as e:
            say(f"FAILED: the nodes could not start: {e}")
            return False
        self.listening = True
        say("links (dialler -> listener): " + ", ".join(
            f"{i} -> {j}" for i, targets in self.links.items() for j in targets))

        master = net.master
        added = [{"name": f"object-{k}", "index": k} for k in range(self.objects)]
        for obj in added:
            master.add_object(obj)
        await master.flush()
        say(f"master added {self.objects} object(s): revision {master.head.rev}")
        master.remove_object(added[0])
        await master.flush()
        say(f"master removed {json.dumps(added[0])}: revision {master.head.rev}, "
            f"{len(master)} object(s) left")

        head, hashes = master.head, set(master.table.hashes())
        began = self.reactor.seconds()
        if not await _wait_each(
                net.nodes, lambda n: n.head == head and set(n.table.hashes()) == hashes,
                self.remaining()):
            say(f"FAILED: not every node holds the master's table after {self.timeout:g} s")
            return False
        say(f"every node holds the master's table after "
            f"{self.reactor.seconds() - began:.2f} s")

        # A message reaches the nodes that are online and linked, so it is sent
        # once the overlay is up (every node has caught up through its link).
        body = {"from": f"node {self.sender}", "text": "hello, everyone"}
        net.nodes[self.sender].send_message(body)
        say(f"node {self.sender} sent the message {json.dumps(body)}")
        began = self.reactor.seconds()
        others = [n for i, n in enumerate(net.nodes) if i != self.sender]
        if not await _wait_each(
                others, lambda n: bool(self.recorders[n].named("message_received")),
                self.remaining()):
            say(f"FAILED: the message did not reach every other node "
                f"within {self.timeout:g} s")
            return False
        say(f"every other node received the message after "
            f"{self.reactor.seconds() - began:.2f} s")
        return True

    async def stop(self) -> None:
        if self.listening:
            self.say()
            _print_table(self.net, self.sender, self.out)
            self.say()
        await self.net.stop()
        self.say("all nodes stopped")
