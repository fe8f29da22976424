"""
Under attack: how many garbage connections a node handles per second before
its firewall blocks the attacker and how many it refuses per second after,
its resident memory before, during and after the attack, how late its
reactor runs, and how an honest replica keeps up meanwhile.

The node under attack is a master in this process, listening with real TLS
on 127.0.0.1 with its SQLite store in a temporary directory and the settings
of dtable.testing.FAST (memory excepted); an honest replica in this process
links to it from 127.0.0.1. benchmarks/attacker.py runs as a child process
and opens connections from 127.0.0.2: C{--silent} that send nothing (the node
closes them at its 5 s handshake timeout), then C{--garbage} that send bytes
that are not TLS, C{--concurrency} at a time. The master adds an object every
20 ms from one second before the attack until the attacker exits. Both
nodes share this process's reactor, so the replica's delays include the
master's stalls.

Each run attacks two fresh pairs of nodes:

  - late block: the node blocks the address only after C{--block-after}
    failed handshakes (its new-connection limit is set out of reach), so
    that there is a measurable stretch of garbage handled before the block;
  - seed defaults: the node's default thresholds (block after 30 failures,
    or 600 unauthenticated connections).

Counters are read on the node: its firewall's entry for 127.0.0.2 (new
connections, failures) and its count of refused connections, every 10 ms
for the edges and every 0.1 s for the samples kept in the JSON; the block
is timed by node.on_block. "Handled before the block" is failures per
second from the node's first connection from the attacker to the block
(with the seed's defaults that is some 30 failures in tens of milliseconds,
so it is a rough figure); "refused/s" counts the stream of refusals from
the block to the last refusal before a lull of 0.25 s. Connections whose
SYN the kernel dropped because the listen backlog (511; the kernel caps it at net.core.somaxconn) was full come back
about a second later; they are counted apart as refused later.

RSS is /proc/self/statm of this process, which holds both nodes: before the
attack and after it (each after gc.collect(), once the attacker exited and
every handshake ended), and the peak sampled every 0.1 s during it. Python
seldom returns freed memory to the system, so each phase starts from the
high-water mark of the ones before it: the first phase of the first run
also pays for warming up, and the growth of the later ones shows what an
attack leaves behind. The nodes' log goes to a file (as twistd's would);
its growth and the warnings by message are reported too.

Medians over C{--runs} runs, with min and max; three runs take about 40
seconds.

    python benchmarks/attack.py [--runs 3] [--garbage 5000] [--silent 200]
        [--concurrency 50] [--block-after 2000] [--json attack.json]
        [--log nodes.log]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.logger import (
    LogLevel, formatEvent, globalLogBeginner, globalLogPublisher, textFileLogObserver,
)

from dtable import DistributedTable, crypto
from dtable.config import Config
from dtable.firewall import FirewallEvent
from dtable.testing import FAST, wait_for

import _common as common

ATTACKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attacker.py")
SETTINGS = {k: v for k, v in FAST.items() if k != "memory"}
DEFAULTS = Config()
STRANGER = "127.0.0.2"

#: Seconds between two objects the master adds.
ADD_INTERVAL = 0.02
#: Seconds of adds, before the attack, that give the quiet baseline.
QUIET = 1.0
#: Seconds between the counters' samples (kept in the JSON, and RSS).
SAMPLE_INTERVAL = 0.1
#: Seconds between the ticks of the stall probe, which also times the edges.
PROBE_INTERVAL = 0.01
#: Seconds without a refusal that end the stream of refusals after the block.
LULL = 0.25
#: Seconds to start the nodes and link them, or to stop them.
START_TIMEOUT = 30.0
#: Seconds for the replica to catch up once the attack is over.
SETTLE_TIMEOUT = 30.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def within(d: Deferred, seconds: float, reactor: Any) -> Deferred:
    """
    C{d}, failed with L{TimeoutError} if it has not fired in C{seconds}.
    """
    return d.addTimeout(seconds, reactor)


async def poll(reactor: Any, predicate: Callable[[], bool], timeout: float,
               interval: float = 0.05) -> bool:
    """
    Wait until C{predicate()} is true, checking every C{interval} seconds;
    False if it is not within C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await deferLater(reactor, interval, lambda: None)
    return True


class Attacker(ProcessProtocol):
    """
    Collects the attacker's output and tells when it has exited.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.ended = False
        self._waiters: list[Deferred] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended = True
        self.exit_code = reason.value.exitCode
        self.signal = getattr(reason.value, "signal", None)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.exit_code)

    def when_ended(self) -> Deferred:
        """
        A fresh Deferred that fires with the exit code once the process ended.
        """
        d: Deferred = Deferred()
        if self.ended:
            d.callback(self.exit_code)
        else:
            self._waiters.append(d)
        return d

    def report(self) -> dict | None:
        try:
            return json.loads(self.out)
        except ValueError:
            return None


class LogCounter:
    """
    Counts what the nodes log at warning level and above, per phase, by
    message template, and keeps the first few errors.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.warnings = 0
        self.errors = 0
        self.templates: dict[str, int] = {}
        self.first_errors: list[str] = []

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level is None or level < LogLevel.warn:
            return
        template = event.get("log_format") or "(no format)"
        self.templates[template] = self.templates.get(template, 0) + 1
        if level >= LogLevel.error or event.get("log_failure") is not None:
            self.errors += 1
            if len(self.first_errors) < 5:
                text = formatEvent(event)
                failure = event.get("log_failure")
                if failure is not None:
                    text += f": {failure.getErrorMessage()}"
                self.first_errors.append(text)
        else:
            self.warnings += 1

    def summary(self) -> dict:
        top = sorted(self.templates.items(), key=lambda item: -item[1])
        return {"warnings": self.warnings, "errors": self.errors,
                "first_errors": self.first_errors,
                "by_template": dict(top[:10])}


class Monitor:
    """
    Watches the node under attack: a timer due every C{PROBE_INTERVAL}
    seconds measures how late the reactor runs it and times the edges (the
    attacker's first connection, the last refusal, the peak of pending
    handshakes); every C{SAMPLE_INTERVAL} seconds the counters and the RSS
    are sampled; node.on_block times the block.
    """

    def __init__(self, reactor: Any, node: DistributedTable, source: str) -> None:
        self.reactor = reactor
        self.node = node
        self.source = source
        self.sampler = LoopingCall(self._sample)
        self.sampler.clock = reactor
        self._call: Any = None
        self._unsubscribe: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.started = 0.0
        self.lateness: list[float] = []
        self.samples: list[dict] = []
        self.first_seen: float | None = None
        self.first_failure: tuple[float, int] | None = None
        #: (time, refused so far) at every tick where the count changed.
        self.refusals: list[tuple[float, int]] = []
        self.refused = 0
        self.peak_pending = 0
        self.peak_rss = 0
        self.block: dict | None = None

    def start(self) -> None:
        self.reset()
        self.started = self.reactor.seconds()
        self._unsubscribe = self.node.on_block(self._blocked)
        self._due = self.started + PROBE_INTERVAL
        self._call = self.reactor.callLater(PROBE_INTERVAL, self._tick)
        self.sampler.start(SAMPLE_INTERVAL, now=True)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.sampler.running:
            self.sampler.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.lateness.append(max(0.0, now - self._due))
        firewall = self.node.firewall
        if self.first_failure is None:
            details = firewall.details(self.source)
            if details is not None:
                if self.first_seen is None:
                    self.first_seen = now
                if details["failures"]:
                    self.first_failure = (now, details["failures"])
        refused = firewall.counts().refused
        if refused != self.refused:
            self.refused = refused
            self.refusals.append((now, refused))
        self.peak_pending = max(self.peak_pending, self.node.pending_handshakes)
        self._due = now + PROBE_INTERVAL
        self._call = self.reactor.callLater(PROBE_INTERVAL, self._tick)

    def _sample(self) -> None:
        details = self.node.firewall.details(self.source) or {}
        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        self.samples.append({
            "t": round(self.reactor.seconds() - self.started, 3),
            "new_connections": details.get("new_connections", 0),
            "failures": details.get("failures", 0),
            "refused": self.node.firewall.counts().refused,
            "refused_busy": self.node.refused_busy,
            "pending_handshakes": self.node.pending_handshakes,
            "rss": rss,
        })

    def _blocked(self, event: FirewallEvent) -> None:
        if self.block is None and event.kind == "address" and event.address == self.source:
            details = self.node.firewall.details(self.source) or {}
            self.block = {"at": self.reactor.seconds(), "reason": event.reason,
                          "failures": details.get("failures", 0),
                          "new_connections": details.get("new_connections", 0),
                          "refused": self.node.firewall.counts().refused}

    def refusal_stream(self) -> tuple[float, int] | None:
        """
        The end of the stream of refusals that follows the block, and the
        refusals counted by then: the stream ends at the last refusal before
        a lull of C{LULL} seconds. None if there was no block.
        """
        if self.block is None:
            return None
        end, count = self.block["at"], self.block["refused"]
        for at, refused in self.refusals:
            if at < end:
                continue
            if at - end > LULL:
                break
            end, count = at, refused
        return end, count

    def worst_lateness(self) -> float | None:
        return max(self.lateness) if self.lateness else None


class Replication:
    """
    The master adds an object every C{ADD_INTERVAL} seconds; the replica's
    object_added events tell when each arrived.
    """

    def __init__(self, reactor: Any, master: DistributedTable,
                 replica: DistributedTable) -> None:
        self.reactor = reactor
        self.master = master
        self.adder = LoopingCall(self._add)
        self.adder.clock = reactor
        self.added: dict[int, float] = {}
        self.arrived: dict[int, float] = {}
        self._numbers = itertools.count()
        self._unsubscribe = replica.on("object_added", self._arrived)

    def start(self) -> None:
        self.adder.start(ADD_INTERVAL, now=True)

    def stop_adding(self) -> None:
        if self.adder.running:
            self.adder.stop()

    def stop(self) -> None:
        self.stop_adding()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _add(self) -> None:
        n = next(self._numbers)
        self.added[n] = self.reactor.seconds()
        self.master.add_object({"n": n, "note": "added while under attack"})

    def _arrived(self, obj: dict) -> None:
        n = obj.get("n")
        if isinstance(n, int) and n not in self.arrived:
            self.arrived[n] = self.reactor.seconds()

    def between(self, start: float, end: float) -> dict:
        """
        Of the objects added from C{start} to C{end}: how many, how many
        arrived by C{end}, the worst delay of those, and the worst delay of
        all of them whenever they arrived (None if one never did).
        """
        added = {n: at for n, at in self.added.items() if start <= at < end}
        delays = {n: self.arrived[n] - at for n, at in added.items() if n in self.arrived}
        on_time = [d for n, d in delays.items() if self.arrived[n] <= end]
        return {
            "added": len(added),
            "arrived": len(on_time),
            "worst_delay_s": max(on_time) if on_time else None,
            "worst_delay_eventually_s": (max(delays.values())
                                         if delays and len(delays) == len(added) else None),
            "never_arrived": len(added) - len(delays),
        }


class Bench:
    def __init__(self, reactor: Any, args: argparse.Namespace, workdir: str,
                 log: LogCounter, log_path: str) -> None:
        self.reactor = reactor
        self.args = args
        self.workdir = workdir
        self.log = log
        self.log_path = log_path
        self.key = crypto.generate_network_key()
        self.count = itertools.count()

    def node(self, name: str, **options: Any) -> DistributedTable:
        return DistributedTable(port=0, key=self.key, reactor=self.reactor,
                                interface="127.0.0.1",
                                data_dir=os.path.join(self.workdir, name),
                                **{**SETTINGS, **options})

    def attacker_argv(self, port: int) -> list[str]:
        args = self.args
        return [sys.executable, ATTACKER, "--host", "127.0.0.1", "--port", str(port),
                "--source", STRANGER, "--garbage", str(args.garbage),
                "--silent", str(args.silent), "--concurrency", str(args.concurrency),
                # The node closes silent connections at its handshake timeout.
                "--hold", str(SETTINGS["handshake_timeout"] + 10)]

    async def phase(self, name: str, firewall: dict) -> dict:
        reactor = self.reactor
        label = f"{name}-{next(self.count)}"
        master = self.node(f"{label}-master", master=True, **firewall)
        replica: DistributedTable | None = None
        monitor = Monitor(reactor, master, STRANGER)
        replication: Replication | None = None
        attacker = Attacker()
        process: Any = None
        result: dict = {"phase": name, "firewall": firewall}
        began = time.perf_counter()
        try:
            master.startService()
            await within(master.when_started(), START_TIMEOUT, reactor)
            replica = self.node(f"{label}-replica",
                                peers=[f"127.0.0.1:{master.listening_port}"])
            replica.startService()
            await within(replica.when_started(), START_TIMEOUT, reactor)
            await wait_for(replica, lambda n: len(n.links) == 1, timeout=START_TIMEOUT)
            await wait_for(master, lambda n: len(n.links) == 1, timeout=START_TIMEOUT)

            replication = Replication(reactor, master, replica)
            quiet_start = reactor.seconds()
            replication.start()
            monitor.start()
            await deferLater(reactor, QUIET, lambda: None)
            monitor.stop()
            result["quiet_stall_s"] = monitor.worst_lateness()

            gc.collect()
            rss_before = rss_bytes()
            log_before = os.path.getsize(self.log_path)
            self.log.reset()
            monitor.start()
            cpu_before = resource.getrusage(resource.RUSAGE_SELF)
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = reactor.seconds()
            process = reactor.spawnProcess(attacker, sys.executable,
                                           self.attacker_argv(master.listening_port),
                                           env=os.environ)
            try:
                await within(attacker.when_ended(), self.args.timeout, reactor)
            except TimeoutError:
                result["failed"] = f"the attacker ran longer than {self.args.timeout:g} s"
                await self.kill(process, attacker, result)
            ended = reactor.seconds()
            monitor.stop()
            cpu = _cpu(cpu_before, resource.getrusage(resource.RUSAGE_SELF))
            attacker_cpu = _cpu(children_before, resource.getrusage(resource.RUSAGE_CHILDREN))
            replication.stop_adding()

            # After: the attacker is gone and every handshake has timed out.
            result["handshakes_ended"] = await poll(
                reactor, lambda: master.pending_handshakes == 0,
                SETTINGS["handshake_timeout"] + 5)
            await within(master.flush(), SETTLE_TIMEOUT, reactor)
            result["caught_up"] = await poll(
                reactor, lambda: replica.head == master.head, SETTLE_TIMEOUT)
            gc.collect()
            rss_after = rss_bytes()

            counts = master.firewall.counts()
            details = master.firewall.details(STRANGER) or {}
            block = monitor.block
            first = monitor.first_seen
            result.update({
                "attacker": attacker.report(),
                "attacker_exit": attacker.exit_code,
                "attacker_stderr": attacker.err.decode(errors="replace")[-2000:],
                "attack_s": ended - started,
                "node_cpu_s": cpu,
                "attacker_cpu_s": attacker_cpu if attacker.ended else None,
                "first_connection_s": None if first is None else first - started,
                "first_failure_s": (None if monitor.first_failure is None
                                    else monitor.first_failure[0] - started),
                "block": None if block is None else {**block, "at": block["at"] - started},
                "new_connections": details.get("new_connections"),
                "failures": details.get("failures"),
                "refused": counts.refused,
                "refused_busy": master.refused_busy,
                "peak_pending_handshakes": monitor.peak_pending,
                "pending_handshakes_after": master.pending_handshakes,
                "blocked": master.firewall.is_blocked(STRANGER),
                "honest_blocked": master.firewall.is_blocked("127.0.0.1"),
                "tracked_addresses": counts.total,
                "links_after": len(master.links),
                "rss_before": rss_before,
                "rss_peak": max(monitor.peak_rss, rss_before),
                "rss_after": rss_after,
                "stall_s": monitor.worst_lateness(),
                "quiet": replication.between(quiet_start, started),
                "during": replication.between(started, ended),
                "log": {**self.log.summary(),
                        "bytes": os.path.getsize(self.log_path) - log_before},
                "samples": monitor.samples,
            })
            if block is not None and first is not None:
                before = block["at"] - first
                result["handled_per_s"] = block["failures"] / before if before > 0 else None
                if monitor.first_failure is not None:
                    at, failures = monitor.first_failure
                    if block["at"] > at:
                        result["handled_per_s_from_first_failure"] = (
                            (block["failures"] - failures) / (block["at"] - at))
                end, refused = monitor.refusal_stream()
                if end > block["at"]:
                    result["refused_per_s"] = (refused - block["refused"]) / (end - block["at"])
                result["refusing_s"] = end - block["at"]
                result["refused_in_stream"] = refused - block["refused"]
                result["refused_later"] = counts.refused - refused
            if attacker.exit_code != 0 and "failed" not in result:
                result["failed"] = f"the attacker exited with {attacker.exit_code}"
        except Exception as e:
            result["failed"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
        finally:
            monitor.stop()
            if replication is not None:
                replication.stop()
            if process is not None:
                await self.kill(process, attacker, result)
            for node in (replica, master):
                if node is not None:
                    try:
                        await within(node.stopService(), START_TIMEOUT, reactor)
                    except TimeoutError:
                        result.setdefault("failed", f"a node took over {START_TIMEOUT:g} s "
                                                    "to stop")
        result["wall_s"] = time.perf_counter() - began
        return result

    async def kill(self, process: Any, attacker: Attacker, result: dict) -> None:
        """
        Kill the attacker by its PID unless it has exited, and wait for it.
        """
        if attacker.ended:
            return
        os.kill(process.pid, signal.SIGKILL)
        try:
            await within(attacker.when_ended(), 10, self.reactor)
        except TimeoutError:
            result.setdefault("failed", f"the attacker {process.pid} did not die")

    async def run(self) -> dict[str, dict]:
        args = self.args
        phases = {}
        if args.phase in ("both", "late"):
            phases["late"] = await self.phase("late", {
                "block_after_failures": args.block_after,
                # Out of reach: the failures decide.
                "block_after_new_connections": args.garbage + args.silent + 1,
            })
        if args.phase in ("both", "seed"):
            phases["seed"] = await self.phase("seed", {})
        return phases


def _cpu(before: Any, after: Any) -> float:
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)








def _since_first(key: str) -> Callable[[dict], Any]:
    def get(result: dict) -> Any:
        at = common.get(*key.split("."))(result)
        first = result.get("first_connection_s")
        return None if at is None or first is None else at - first
    return get


ROWS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("attacker seen -> first failure (s)", _since_first("first_failure_s"), "{:.2f}"),
    ("attacker seen -> blocked (s)", _since_first("block.at"), "{:.2f}"),
    ("failures when blocked", common.get("block", "failures"), "{:,.0f}"),
    ("garbage handled/s before the block", common.get("handled_per_s"), "{:,.0f}"),
    ("  counting from the first failure", common.get("handled_per_s_from_first_failure"),
     "{:,.0f}"),
    ("refused after the block, in a stream", common.get("refused_in_stream"), "{:,.0f}"),
    ("  for (s)", common.get("refusing_s"), "{:.2f}"),
    ("  refused/s", common.get("refused_per_s"), "{:,.0f}"),
    ("  refused later (SYN retries)", common.get("refused_later"), "{:,.0f}"),
    ("refused: handshakes busy", common.get("refused_busy"), "{:,.0f}"),
    ("peak pending handshakes", common.get("peak_pending_handshakes"), "{:,.0f}"),
    ("attacker run (s)", common.get("attack_s"), "{:.2f}"),
    ("  node CPU in it (s)", common.get("node_cpu_s"), "{:.2f}"),
    ("  attacker CPU (s)", common.get("attacker_cpu_s"), "{:.2f}"),
    ("RSS before (MiB)", common.get("rss_before", scale=common.mib), "{:.1f}"),
    ("RSS peak (MiB)", common.get("rss_peak", scale=common.mib), "{:.1f}"),
    ("RSS after (MiB)", common.get("rss_after", scale=common.mib), "{:.1f}"),
    ("RSS growth, after - before (MiB)",
     lambda r: None if r.get("rss_after") is None
     else common.mib(r["rss_after"] - r["rss_before"]), "{:+.1f}"),
    ("worst reactor stall, quiet (ms)", common.get("quiet_stall_s", scale=common.ms), "{:.1f}"),
    ("worst reactor stall, attack (ms)", common.get("stall_s", scale=common.ms), "{:.1f}"),
    ("adds during the attack", common.get("during", "added"), "{:,.0f}"),
    ("  reached the replica during it", common.get("during", "arrived"), "{:,.0f}"),
    ("  worst add->replica delay (ms)", common.get("during", "worst_delay_s", scale=common.ms),
     "{:.1f}"),
    ("  same, counting late ones (ms)",
     common.get("during", "worst_delay_eventually_s", scale=common.ms), "{:.1f}"),
    ("  worst delay, quiet second (ms)", common.get("quiet", "worst_delay_s", scale=common.ms),
     "{:.1f}"),
    ("warnings logged", common.get("log", "warnings"), "{:,.0f}"),
    ("errors logged", common.get("log", "errors"), "{:,.0f}"),
    ("log written (KiB)", common.get("log", "bytes", scale=lambda v: v / 1024), "{:,.0f}"),
]




def summarize(runs: list[dict[str, dict]]) -> dict[str, dict[str, dict]]:
    summary: dict[str, dict[str, dict]] = {}
    for phase in runs[0]:
        summary[phase] = {}
        for label, get, _ in ROWS:
            values = [v for v in (get(run[phase]) for run in runs) if v is not None]
            if values:
                summary[phase][label.strip()] = {"median": statistics.median(values),
                                                 "min": min(values), "max": max(values)}
    return summary


def report(runs: list[dict[str, dict]], args: argparse.Namespace) -> None:
    phases = list(runs[0])
    titles = {
        "late": f"late block ({args.block_after} failures)",
        "seed": (f"seed defaults ({DEFAULTS.block_after_failures} failures / "
                 f"{DEFAULTS.block_after_new_connections} conn.)"),
    }
    print(f"\nattack on a master over TLS on 127.0.0.1 (SQLite store) from {STRANGER}: "
          f"{args.garbage} garbage connections, {args.concurrency} at a time, and "
          f"{args.silent} silent ones; handshake timeout "
          f"{SETTINGS['handshake_timeout']:g} s; an honest replica on 127.0.0.1; "
          f"an add every {ADD_INTERVAL * 1000:g} ms")
    print(f"{'median (min..max)' if len(runs) > 1 else 'one run'} over {len(runs)} "
          f"run{'s' if len(runs) > 1 else ''}; node-side counters\n")
    cells = [[common.cell([get(run[p]) for run in runs], fmt) for p in phases]
             for _, get, fmt in ROWS]
    width = max(len(label) for label, _, _ in ROWS) + 2
    columns = [max(len(titles[p]), *(len(row[i]) for row in cells)) + 2
               for i, p in enumerate(phases)]
    print(" " * width + "".join(f"{titles[p]:>{w}}" for p, w in zip(phases, columns)))
    for (label, _, _), row in zip(ROWS, cells):
        print(f"{label:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(row, columns)))
    for k, run in enumerate(runs, start=1):
        for p in phases:
            r = run[p]
            notes = []
            if r.get("failed"):
                notes.append(f"FAILED: {r['failed']}")
            attack = r.get("attacker") or {}
            for kind in ("garbage", "silent"):
                stats = attack.get(kind) or {}
                if stats.get("timed_out") or stats.get("refused"):
                    notes.append(f"attacker's {kind}: {stats}")
            if r.get("block") is None and "failed" not in r:
                notes.append("the attacker was never blocked")
            if r.get("handshakes_ended") is False:
                notes.append(f"{r.get('pending_handshakes_after')} handshakes still pending")
            if r.get("caught_up") is False:
                notes.append("the replica did not catch up after the attack")
            if r.get("honest_blocked"):
                notes.append("the honest replica's address was blocked")
            if r.get("links_after") not in (None, 1):
                notes.append(f"{r['links_after']} links after the attack")
            if r.get("during", {}).get("never_arrived"):
                notes.append(f"{r['during']['never_arrived']} adds never reached the replica")
            log = r.get("log") or {}
            if log.get("errors"):
                notes.append(f"{log['errors']} errors logged; first: {log['first_errors'][0]}")
            for note in notes:
                print(f"run {k}, {p}: {note}")
    for p in phases:
        reasons = sorted({run[p]["block"]["reason"] for run in runs if run[p].get("block")})
        if reasons:
            print(f"{p}: blocked for {' / '.join(reasons)}")
    if len(runs) > 1:
        growth = "; ".join(
            f"{p} " + ", ".join(f"{common.mib(run[p]['rss_after'] - run[p]['rss_before']):+.1f}"
                                if run[p].get("rss_after") is not None else "-"
                                for run in runs)
            for p in phases)
        print(f"RSS growth by run, in the order they ran (MiB): {growth}")
    logged = runs[-1][phases[-1]].get("log", {}).get("by_template", {})
    if logged:
        print(f"\nwarnings by message, last run, {phases[-1]}:")
        for template, count in logged.items():
            print(f"  {count:>7,}  {template}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--garbage", type=int, default=5000)
    parser.add_argument("--silent", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--block-after", type=int, default=2000,
                        help="failures before the block in the late-block phase")
    parser.add_argument("--phase", choices=("both", "late", "seed"), default="both")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the attacker may run before it is killed")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--log", default=None,
                        help="keep the nodes' log in this file (by default it is "
                             "written to the temporary directory and removed)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0 < args.block_after < args.garbage:
        parser.error("--block-after must be positive and below --garbage, or the "
                     "late-block phase never blocks")
    counter = LogCounter()
    runs: list[dict[str, dict]] = []

    async def go(reactor: Any) -> None:
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dtable-attack-") as workdir:
            log_path = args.log or os.path.join(workdir, "nodes.log")
            log_file = open(log_path, "w")
            to_file = textFileLogObserver(log_file)
            globalLogBeginner.beginLoggingTo([to_file, counter], discardBuffer=True,
                                             redirectStandardIO=False)
            try:
                bench = Bench(reactor, args, workdir, counter, log_path)
                for k in range(args.runs):
                    run = await bench.run()
                    runs.append(run)
                    print(f"run {k + 1}/{args.runs}: "
                          + ", ".join(f"{p} {r['wall_s']:.1f} s"
                                      + (f" (FAILED: {r['failed']})" if r.get("failed")
                                         else "")
                                      for p, r in run.items()), flush=True)
            finally:
                globalLogPublisher.removeObserver(to_file)
                log_file.close()
        report(runs, args)
        total = time.perf_counter() - began
        print(f"\ntotal {total:.1f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "settings": SETTINGS,
                           "add_interval_s": ADD_INTERVAL, "runs": runs,
                           "summary": summarize(runs), "total_s": total}, f, indent=2)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
