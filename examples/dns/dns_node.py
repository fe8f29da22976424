"""
What the two DNS programs share about being a dtable node: the command-line
options, the node itself, printing, and stopping cleanly on Ctrl-C or
SIGTERM.

examples/example.key is a published key for the examples only: anyone can
read it, so it protects nothing. Give every node of a real network your own
key (``python -m dtable keygen -o net.key``) with ``--key-file``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from dtable.crypto import WeakKeyError, parse_network_key
from dtable.peers import AddressError, PeerAddress
from dtable.service import DistributedTable

#: The examples' shared, published key (see the module docstring).
EXAMPLE_KEY = Path(__file__).resolve().parent.parent / "example.key"


def add_node_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """
    The options every node takes.
    """
    group = parser.add_argument_group("dtable node")
    group.add_argument("--port", type=int, default=default_port,
                       help="the dtable port to listen on; 0 picks a free one "
                            "(default: %(default)s)")
    group.add_argument("--interface", default="127.0.0.1",
                       help="the address to listen on (default: %(default)s)")
    group.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                       help="a node to link to; give it again for more")
    group.add_argument("--key-file", type=Path, default=EXAMPLE_KEY,
                       help="the network key (default: the published example key, "
                            "which protects nothing)")
    group.add_argument("--data-dir", type=Path,
                       help="keep the table in this directory across restarts "
                            "(default: in memory only)")
    group.add_argument("--fast", action="store_true",
                       help="use the short intervals of tests "
                            "(dtable.testing.FAST), not the production ones")


def check_node_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """
    Check the node options that argparse cannot; exit through C{parser}
    (status 2) with a precise message if one is wrong. Returns the network
    key.
    """
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, not {args.port}")
    for peer in args.peer:
        try:
            PeerAddress.parse(peer)
        except AddressError as e:
            parser.error(f"--peer {peer}: {e}")
    try:
        key = args.key_file.read_text(encoding="utf-8")
    except OSError as e:
        parser.error(f"--key-file {args.key_file}: {e.strerror}")
    try:
        parse_network_key(key)
    except WeakKeyError as e:
        parser.error(f"--key-file {args.key_file}: {e}")
    return key


def make_table(args: argparse.Namespace, key: str, master: bool,
               reactor: Any) -> DistributedTable:
    """
    The node the options describe (not started).
    """
    options: dict[str, Any] = {}
    if args.fast:
        from dtable.testing import FAST

        options.update(FAST)
    if args.data_dir is None:
        options["memory"] = True
    else:
        options.update(memory=False, data_dir=str(args.data_dir))
    return DistributedTable(port=args.port, key=key, peers=args.peer, master=master,
                            reactor=reactor, interface=args.interface, **options)


def say(*parts: Any) -> None:
    """
    Print one line at once: the nodes' output is read by other programs.
    """
    print(*parts, flush=True)


def complain(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_links(table: DistributedTable) -> Callable[[], None]:
    """
    Print "linked to N nodes" whenever the number of live links changes,
    so that an operator (or a test) sees the node join the overlay.
    Returns a function that stops the reports.
    """
    last = [0]

    def changed() -> None:
        count = len(table.links)
        if count != last[0]:
            last[0] = count
            say(f"linked to {count} node{'' if count == 1 else 's'}")

    return table.watch(changed)


def when_linked(table: DistributedTable, reactor: Any, timeout: float) -> Deferred:
    """
    A Deferred that fires once C{table} has a live link, or fails with
    L{twisted.internet.defer.TimeoutError} after C{timeout} seconds.
    """
    linked: Deferred = Deferred()

    def check() -> None:
        if table.links and not linked.called:
            linked.callback(None)

    def done(result: Any) -> Any:
        stop_watching()
        return result

    stop_watching = table.watch(check)
    linked.addTimeout(timeout, reactor)
    linked.addBoth(done)
    check()
    return linked


class Node:
    """
    A running node and the ports the program serves beside it, stopped
    together on Ctrl-C or SIGTERM, or when the program is done.
    """

    def __init__(self, table: DistributedTable, reactor: Any, name: str) -> None:
        self.table = table
        self.name = name
        self._reactor = reactor
        self._ports: list[Any] = []
        self._trigger: Any = None

    async def start(self) -> None:
        """
        Start the node; exits 1 if it cannot, for instance on a port in use.
        """
        self._trigger = self._reactor.addSystemEventTrigger("before", "shutdown",
                                                            self._stop)
        # Asked before starting: a node that cannot listen fails inside
        # startService, and a when_started() asked after that never fires.
        started = self.table.when_started()
        self.table.startService()
        try:
            await started
        except Exception as e:
            complain(f"{self.name}: cannot start the node: {e}")
            raise SystemExit(1)
        host = self.table.config.interface
        host = f"[{host}]" if ":" in host else host
        say(f"{self.name}: node {self.table.node_id[:8]} on "
            f"{host}:{self.table.listening_port}, pid {os.getpid()}")

    def serve(self, port: Any) -> None:
        """
        Close C{port} (an IListeningPort) when the node stops.
        """
        self._ports.append(port)

    async def run_forever(self) -> None:
        """
        Run until Ctrl-C or SIGTERM; the reactor stops everything then.
        """
        await Deferred()

    async def stop(self) -> None:
        """
        Stop everything now, when the program ends by itself.
        """
        self._reactor.removeSystemEventTrigger(self._trigger)
        await self._stop()

    def _stop(self) -> Deferred:
        closing = [maybeDeferred(port.stopListening) for port in self._ports]
        return gatherResults([*closing, self.table.stopService()], consumeErrors=True)
