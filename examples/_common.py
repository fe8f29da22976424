"""
What the five example nodes share: the environment they read, the network
key, an observer that prints every event, and running one node until it is
interrupted.

The five nodes are the original project's example network; ports are
DTABLE_EXAMPLE_PORT_BASE (default 9999) plus an offset:

    example1_master.py  9999   dials itself and 10002; the master
    example2.py         10000  dials 9999
    example3.py         10001  dials 10000
    example4.py         10002  dials 10000
    example5.py         10003  dials 10002

Environment:

    DTABLE_KEY                the network key; by default examples/example.key
    DTABLE_EXAMPLE_PORT_BASE  shifts every port (default 9999)
    DTABLE_EXAMPLE_SECONDS    stop cleanly after this many seconds (default: run
                              until interrupted)
    DTABLE_EXAMPLE_FAST=1     use the short intervals of dtable.testing.FAST
                              instead of the production defaults

examples/example.key is a published key for these examples only: anyone can
read it, so it protects nothing. Make your own network's key with
``python -m dtable keygen -o net.key``. For the same reason the examples
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from dtable.crypto import WeakKeyError, parse_network_key
from dtable.interfaces import TableObserver
from dtable.service import DistributedTable

DEFAULT_PORT_BASE = 9999
HOST = "127.0.0.1"
#: The examples' shared key; for the examples only (see the module docstring).
KEY_FILE = Path(__file__).with_name("example.key")
#: Ports are the base plus an offset up to this.
MAX_OFFSET = 4


class UsageError(Exception):
    """
    An environment variable has a bad value; str() says which and why.
    """


class PrintingObserver(TableObserver):
    """
    Prints each event as one line: its name, then its argument as JSON.
    """

    def __init__(self, out: Any = None) -> None:
        self._out = out if out is not None else sys.stdout

    def _print(self, event: str, *payload: Any) -> None:
        line = " ".join([event, *(json.dumps(p, sort_keys=True) for p in payload)])
        print(line, file=self._out, flush=True)

    def started(self) -> None:
        self._print("started")

    def object_added(self, obj: dict) -> None:
        self._print("object_added", obj)

    def object_removed(self, obj: dict) -> None:
        self._print("object_removed", obj)

    def message_received(self, msg: object) -> None:
        self._print("message_received", msg)

    def error(self, error_string: str, origin: str, obj: object) -> None:
        self._print("error", {"error": error_string, "origin": origin, "obj": obj})


def port_base(environ: dict[str, str]) -> int:
    text = environ.get("DTABLE_EXAMPLE_PORT_BASE", "")
    if not text:
        return DEFAULT_PORT_BASE
    try:
        base = int(text)
    except ValueError:
        raise UsageError(f"DTABLE_EXAMPLE_PORT_BASE must be a port number, not {text!r}")
    if not 1 <= base <= 65535 - MAX_OFFSET:
        raise UsageError(
            f"DTABLE_EXAMPLE_PORT_BASE must be between 1 and {65535 - MAX_OFFSET}, "
            f"not {base}")
    return base


def seconds(environ: dict[str, str]) -> float | None:
    text = environ.get("DTABLE_EXAMPLE_SECONDS", "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"DTABLE_EXAMPLE_SECONDS must be a number, not {text!r}")
    if not value > 0:
        raise UsageError(f"DTABLE_EXAMPLE_SECONDS must be greater than 0, not {text}")
    return value


def network_key(environ: dict[str, str]) -> str:
    if environ.get("DTABLE_KEY"):
        key, where = environ["DTABLE_KEY"], "DTABLE_KEY"
    else:
        where = str(KEY_FILE)
        try:
            key = KEY_FILE.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot read the example key {where}: {e.strerror}; "
                             "set DTABLE_KEY or make one with: "
                             f"python -m dtable keygen -o {where}")
    try:
        parse_network_key(key)
    except WeakKeyError as e:
        raise UsageError(f"{where}: {e}")
    return key


def options(environ: dict[str, str]) -> dict[str, Any]:
    """
    The production defaults, or dtable.testing.FAST with DTABLE_EXAMPLE_FAST=1.
    Like the original project's examples, the nodes keep their tables in
    memory; a real node keeps it in its data directory (the default).
    """
    if environ.get("DTABLE_EXAMPLE_FAST") == "1":
        from dtable.testing import FAST

        return dict(FAST)
    return {"memory": True}


async def _run(reactor: Any, name: str, offset: int, peer_offsets: Sequence[int],
               master: bool, on_started: Callable[[DistributedTable], None] | None,
               environ: dict[str, str]) -> None:
    base = port_base(environ)
    peers = [f"{HOST}:{base + o}" for o in peer_offsets]
    table = DistributedTable(port=base + offset, key=network_key(environ), peers=peers,
                             master=master, reactor=reactor, interface=HOST,
                             **options(environ))
    table.subscribe(PrintingObserver())
    # Interrupted (Ctrl-C, SIGTERM): the reactor waits for the node to stop.
    shutdown = reactor.addSystemEventTrigger("before", "shutdown", table.stopService)
    print(f"{name}: port {base + offset}, peers {', '.join(peers) or 'none'}, "
          f"{'master' if master else 'not the master'}", flush=True)
    table.startService()
    try:
        await table.when_started()
    except Exception as e:
        print(f"{name}: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if on_started is not None:
        on_started(table)
    duration = seconds(environ)
    if duration is None:
        await Deferred()  # until interrupted
    done: Deferred = Deferred()
    reactor.callLater(duration, done.callback, None)
    await done
    reactor.removeSystemEventTrigger(shutdown)
    await table.stopService()
    print(f"{name}: stopped after {duration:g} s", flush=True)


def run_node(name: str, offset: int, peer_offsets: Sequence[int], master: bool = False,
             on_started: Callable[[DistributedTable], None] | None = None) -> None:
    """
    Run one example node until it is interrupted, or for
    DTABLE_EXAMPLE_SECONDS; exits 2 if the environment is wrong.
    """
    environ = dict(os.environ)
    try:
        port_base(environ), seconds(environ), network_key(environ)
    except UsageError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    react(_run, (name, offset, peer_offsets, master, on_started, environ))
