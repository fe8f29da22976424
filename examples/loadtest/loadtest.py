"""
The original project's load test, as two programs around one
DistributedTable each.

The master, every round, adds a random object, adds the same object again (a
duplicate: the table must not change) and, once the table holds more than
--max-objects, removes a random share of it. The sender links to the master
and broadcasts a message every round. After each round both write one JSON
line of their state to a size-bounded log: objects held, revision, links
with their RTTs, and the size of the message duplicate filter; the master
also logs every message that reaches it.

A node whose object count stays the same for three rounds in a row prints
one line saying so and exits 1: on the master that means its changes are no
longer published, on the sender that replication from the master stopped.

    python examples/loadtest/loadtest.py master --port 9999 --log master.log
    python examples/loadtest/loadtest.py sender --port 10000 \\
        --peer 127.0.0.1:9999 --log sender.log

Give the sender an interval no shorter than the master's, or it sees rounds
in which the master changed nothing. The nodes keep their tables in memory
and use examples/example.key, a published key for the examples only, unless
given --key-file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater, react
from twisted.python.logfile import LogFile

from dtable import ConfigError, DistributedTable, TableObserver, WeakKeyError
from dtable.crypto import parse_network_key
from dtable.peers import AddressError, PeerAddress
from dtable.testing import wait_for

HOST = "127.0.0.1"
#: The examples' shared key; it protects nothing (see the module docstring).
KEY_FILE = Path(__file__).resolve().parent.parent / "example.key"
#: Rounds with an unchanged object count after which a node gives up.
STALL_ROUNDS = 3
#: The smallest --log-bytes: a state line with a few links must fit.
MIN_LOG_BYTES = 1024

#: What a round does on one node: given the round's number, it returns the
#: fields that round adds to the node's state line.
Step = Callable[[int], Awaitable[dict[str, Any]]]


class StateLog:
    """
    One JSON object per line, in a file that never grows past a limit: a
    line that would take it past moves the file to FILE.1 (the previous
    FILE.1 is dropped) and starts a new FILE, so a long run keeps its latest
    lines in at most twice the limit. Only a line longer than the limit by
    itself gets a file of its own, larger than the limit.
    """

    def __init__(self, logfile: LogFile) -> None:
        self._file = logfile

    @classmethod
    def open(cls, path: str, limit: int) -> "StateLog":
        """
        Append to the log at C{path}, keeping each file within C{limit}
        bytes.

        @raise OSError: if the file cannot be opened.
        """
        return cls(LogFile.fromFullPath(path, rotateLength=limit, maxRotatedFiles=1))

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        # LogFile rotates only once a file has passed its length; rotating
        # before the write keeps every file within it.
        if self._file.size and self._file.size + len(data) > self._file.rotateLength:
            self._file.rotate()
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


class StallWatch:
    """
    Counts the rounds in a row in which the object count did not change.
    """

    def __init__(self, count: int, limit: int = STALL_ROUNDS) -> None:
        self.limit = limit
        self.unchanged = 0
        self._count = count

    def observe(self, count: int) -> bool:
        """
        Note this round's object count; True once it has been the same for
        C{limit} rounds in a row.
        """
        self.unchanged = self.unchanged + 1 if count == self._count else 0
        self._count = count
        return self.unchanged >= self.limit


class EventLog(TableObserver):
    """
    Logs each message and error event as it arrives, and counts
    object_added events so that the master can tell that a duplicate added
    nothing.
    """

    def __init__(self, log: StateLog, clock: Any) -> None:
        self._log = log
        self._clock = clock
        self.added = 0

    def object_added(self, obj: dict) -> None:
        self.added += 1

    def message_received(self, msg: object) -> None:
        self._log.write({"event": "message_received", "time": self._now(), "body": msg})

    def error(self, error_string: str, origin: str, obj: object) -> None:
        self._log.write({"event": "error", "time": self._now(), "error": error_string,
                         "origin": origin})

    def _now(self) -> float:
        return round(self._clock.seconds(), 3)


def node_state(table: DistributedTable) -> dict[str, Any]:
    """
    What a state line says about C{table}, from its public status(): RTTs
    are the mean and the last of the link's window, in milliseconds (None
    until the first ping came back).
    """
    status = table.status()
    return {
        "objects": status["objects"],
        "rev": status["head"]["rev"],
        "links": [{"peer": link["node_id"], "address": link["address"],
                   "direction": link["direction"], "rtt_ms": link["rtt_ms"]["mean"],
                   "rtt_last_ms": link["rtt_ms"]["last"]}
                  for link in status["links"]],
        "duplicate_filter": status["messages_remembered"],
        "messages_received": status["counters"]["messages_received"],
    }


class MasterStep:
    """
    The master's round: add a random object, add it again, and remove a
    random share of the table once it holds more than C{max_objects}.
    """

    def __init__(self, table: DistributedTable, events: EventLog, rng: random.Random,
                 max_objects: int, remove_share: float) -> None:
        self._table = table
        self._events = events
        self._rng = rng
        self._max_objects = max_objects
        self._remove_share = remove_share

    async def __call__(self, number: int) -> dict[str, Any]:
        table = self._table
        obj = {"round": number, "token": f"{self._rng.getrandbits(64):016x}"}
        added = table.add_object(obj)
        await table.flush()
        rev, count, events = table.head.rev, len(table), self._events.added
        again = table.add_object(obj)
        await table.flush()
        ignored = (again == added and table.head.rev == rev and len(table) == count
                   and self._events.added == events)
        removed = self._remove_some()
        await table.flush()
        return {"added": added, "duplicate": "ignored" if ignored else "changed the table",
                "removed": removed}

    def _remove_some(self) -> int:
        objects = self._table.objects()
        if len(objects) <= self._max_objects:
            return 0
        victims = self._rng.sample(objects, math.ceil(self._remove_share * len(objects)))
        for obj in victims:
            self._table.remove_object(obj)
        return len(victims)


class SenderStep:
    """
    The sender's round: broadcast a message naming the round.
    """

    def __init__(self, table: DistributedTable) -> None:
        self._table = table

    async def __call__(self, number: int) -> dict[str, Any]:
        body = {"from": self._table.node_id, "round": number}
        return {"sent": self._table.send_message(body)}


class Rounds:
    """
    Runs a step every C{interval} seconds and logs the node's state after
    it. Ends after C{rounds} rounds (exit code 0), when the object count
    stalls (1), or when L{stop} is called (0).
    """

    def __init__(self, reactor: Any, table: DistributedTable, role: str, step: Step,
                 log: StateLog, interval: float, rounds: int | None) -> None:
        self._reactor = reactor
        self._table = table
        self._role = role
        self._step = step
        self._log = log
        self._interval = interval
        self._rounds = rounds
        self._sleep: Deferred | None = None
        self.stopped = False

    async def run(self) -> int:
        watch = StallWatch(len(self._table))
        number = 0
        while self._rounds is None or number < self._rounds:
            self._sleep = deferLater(self._reactor, self._interval, lambda: None)
            try:
                await self._sleep
            except CancelledError:
                return 0
            number += 1
            record = await self._step(number)
            if self.stopped:
                return 0
            record = {"event": "round", "role": self._role, "round": number,
                      "time": round(self._reactor.seconds(), 3), **record,
                      **node_state(self._table)}
            self._log.write(record)
            if watch.observe(record["objects"]):
                self._stalled(number, record["objects"], watch.unchanged)
                return 1
        return 0

    def stop(self) -> None:
        """
        Start no further round (the node is being stopped).
        """
        self.stopped = True
        if self._sleep is not None:
            self._sleep.cancel()

    def _stalled(self, number: int, count: int, unchanged: int) -> None:
        self._log.write({"event": "stalled", "round": number, "objects": count,
                         "unchanged_rounds": unchanged})
        print(f"{self._role}: stalled: object count {count} unchanged for "
              f"{unchanged} rounds", file=sys.stderr, flush=True)


def node_options(args: argparse.Namespace) -> dict[str, Any]:
    """
    DistributedTable's options: dtable.testing.FAST with --fast, else the
    production intervals; the table in memory either way.
    """
    if args.fast:
        from dtable.testing import FAST

        return dict(FAST)
    return {"memory": True}


async def run(reactor: Any, args: argparse.Namespace, key: str) -> None:
    role = args.role
    try:
        table = DistributedTable(port=args.port, key=key, peers=[str(p) for p in args.peer],
                                 master=role == "master", reactor=reactor,
                                 interface=args.interface, **node_options(args))
        log = StateLog.open(args.log, args.log_bytes)
    except (ConfigError, OSError) as e:
        print(f"{role}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    events = EventLog(log, reactor)
    table.subscribe(events)
    step: Step = (MasterStep(table, events, random.Random(), args.max_objects,
                             args.remove_share)
                  if role == "master" else SenderStep(table))
    rounds = Rounds(reactor, table, role, step, log, args.interval, args.rounds)

    def interrupted() -> Deferred:
        rounds.stop()
        return table.stopService().addBoth(lambda _: log.close())

    # Interrupted (Ctrl-C, SIGTERM): the reactor waits for the node to stop.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    table.startService()
    try:
        await table.when_started()
    except Exception as e:
        print(f"{role}: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    print(f"{role}: listening on {args.interface}:{table.listening_port}, "
          f"logging to {args.log}", flush=True)
    code = await _linked_then_rounds(reactor, table, role, rounds, args)
    if rounds.stopped:
        return
    reactor.removeSystemEventTrigger(trigger)
    await table.stopService()
    log.close()
    if code:
        raise SystemExit(code)
    print(f"{role}: {args.rounds} rounds done, {len(table)} objects", flush=True)


async def _linked_then_rounds(reactor: Any, table: DistributedTable, role: str,
                              rounds: Rounds, args: argparse.Namespace) -> int:
    """
    A node given peers starts its rounds once it is linked to one, so that
    its first rounds do not count as stalled while it connects.
    """
    if args.peer:
        try:
            await wait_for(table, lambda node: bool(node.links), args.link_timeout, reactor)
        except TimeoutError:
            print(f"{role}: no link to {', '.join(map(str, args.peer))} after "
                  f"{args.link_timeout:g} s", file=sys.stderr, flush=True)
            return 1
        print(f"{role}: linked", flush=True)
    return await rounds.run()


# The command line ---------------------------------------------------------------


def _number(kind: type, low: float, high: float | None = None,
            low_inclusive: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low if low_inclusive else value > low) or (
                high is not None and value > high):
            bound = f"at least {low}" if low_inclusive else f"more than {low}"
            upper = f" and at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be {bound}{upper}, not {text}")
        return value

    return parse


def _peer(text: str) -> PeerAddress:
    try:
        return PeerAddress.parse(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_node_arguments(parser: argparse.ArgumentParser, port: int,
                        peer_required: bool) -> None:
    parser.add_argument("--port", type=_number(int, 0, 65535, low_inclusive=True),
                        default=port, help=f"port to listen on; 0 picks one (default {port})")
    parser.add_argument("--interface", default=HOST,
                        help=f"address to listen on (default {HOST})")
    parser.add_argument("--peer", type=_peer, action="append", default=[],
                        required=peer_required, metavar="HOST:PORT",
                        help="a node to link to; the rounds start once linked (repeatable)")
    parser.add_argument("--interval", type=_number(float, 0), default=2.0,
                        metavar="SECONDS", help="seconds between rounds (default 2)")
    parser.add_argument("--rounds", type=_number(int, 0), default=None, metavar="N",
                        help="stop after this many rounds (default: run until stopped)")
    parser.add_argument("--log", required=True, metavar="FILE",
                        help="the state log, one JSON line per round; FILE.1 holds "
                             "the lines before the last rotation")
    parser.add_argument("--log-bytes", type=_number(int, MIN_LOG_BYTES, low_inclusive=True),
                        default=1_000_000, metavar="N",
                        help="rotate the log before it passes N bytes (default 1000000)")
    parser.add_argument("--key-file", type=Path, default=KEY_FILE, metavar="FILE",
                        help="the network key (default: the examples' published key)")
    parser.add_argument("--link-timeout", type=_number(float, 0), default=30.0,
                        metavar="SECONDS",
                        help="give up if no peer is linked after this long (default 30)")
    parser.add_argument("--fast", action="store_true",
                        help="the short intervals of dtable.testing.FAST (for tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Load-test a dtable network: a master that keeps changing its "
                    "table and a sender that keeps broadcasting. Each logs its state "
                    f"every round and exits 1 once its object count stayed the same "
                    f"for {STALL_ROUNDS} rounds.")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    master = roles.add_parser(
        "master", help="add, duplicate and remove objects every round",
        description="Every round add a random object, add it again (which must "
                    "change nothing) and, once the table holds more than "
                    "--max-objects, remove a random share of it.")
    _add_node_arguments(master, 9999, peer_required=False)
    master.add_argument("--max-objects", type=_number(int, 0), default=100, metavar="N",
                        help="remove a share once the table holds more (default 100)")
    master.add_argument("--remove-share", type=_number(float, 0, 1), default=0.3,
                        metavar="FRACTION",
                        help="the share of the table to remove (default 0.3)")
    sender = roles.add_parser("sender", help="broadcast a message every round",
                              description="Link to the master and broadcast a "
                                          "message every round.")
    _add_node_arguments(sender, 10000, peer_required=True)
    return parser


def parse_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, str]:
    """
    The parsed command line and the network key; exits 2 with a message on
    bad input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role == "master" and math.ceil(args.remove_share * (args.max_objects + 1)) < 2:
        # Removing one object right after adding one leaves the count as it
        # was, which would read as a stall.
        parser.error(f"--remove-share {args.remove_share:g} of a table of "
                     f"{args.max_objects + 1} objects removes only one, which leaves "
                     "the count unchanged; raise --remove-share or --max-objects")
    try:
        key = args.key_file.read_text(encoding="utf-8")
        parse_network_key(key)
    except OSError as e:
        parser.error(f"cannot read the key {args.key_file}: {e.strerror}")
    except WeakKeyError as e:
        parser.error(f"{args.key_file}: {e}")
    return args, key


def main(argv: Sequence[str]) -> None:
    args, key = parse_arguments(argv)
    react(run, (args, key))


if __name__ == "__main__":
    main(sys.argv[1:])
