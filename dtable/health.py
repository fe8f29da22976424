"""
The node watching itself: how late its reactor runs, and what its memory
holds.

L{StallProbe} is a timer that measures its own lateness; L{memory_report}
writes, on an operator's request (SIGUSR2 for a daemon), the largest
allocations, object counts by type and the table's size to a file. Neither
knows anything of peers or the wire.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections import Counter
from typing import Any

from twisted.internet.task import LoopingCall


class StallProbe:
    """
    Measures how late the reactor runs: a timer every C{interval} seconds
    notes how much later than due it fired. A node that stalls (a long
    commit, a huge frame) shows it here before its peers call it dead.

    Besides the worst, it counts the stalls over each of L{THRESHOLDS}: the
    worst of a busy minute is one draw from many stalls, and how many went
    over 100 ms says more about how the node answers than the longest.
    """

    #: Seconds over which the recent worst stall is kept.
    RECENT = 60.0
    #: Stalls longer than these (seconds) are counted.
    THRESHOLDS = (0.05, 0.1, 0.25, 1.0)

    def __init__(self, clock: Any, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._due = 0.0
        self.worst = 0.0
        self._recent: list[tuple[float, float]] = []
        #: How many stalls were longer than each of THRESHOLDS, in order.
        self.counts = [0] * len(self.THRESHOLDS)

    def start(self) -> None:
        self._due = self._clock.seconds() + self._interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        now = self._clock.seconds()
        late = max(0.0, now - self._due)
        self._due = now + self._interval
        if late > self.worst:
            self.worst = late
        if late > self.THRESHOLDS[0]:
            for i, threshold in enumerate(self.THRESHOLDS):
                if late > threshold:
                    self.counts[i] += 1
        # Keep a short list: the worst per second, for the last minute.
        second = now - now % 1.0
        if self._recent and self._recent[-1][0] == second:
            if late > self._recent[-1][1]:
                self._recent[-1] = (second, late)
        else:
            self._recent.append((second, late))
            while self._recent and self._recent[0][0] < now - self.RECENT:
                self._recent.pop(0)

    def report(self) -> dict[str, Any]:
        """
        The worst stall since the start and in the last minute, in ms, and
        how many stalls since the start were longer than each threshold
        (keyed by the threshold in ms, as text).
        """
        now = self._clock.seconds()
        recent = max((late for when, late in self._recent if when >= now - self.RECENT),
                     default=0.0)
        return {"worst_stall_ms": round(self.worst * 1000, 3),
                "recent_worst_stall_ms": round(recent * 1000, 3),
                "stalls_over_ms": {f"{threshold * 1000:g}": count
                                   for threshold, count in zip(self.THRESHOLDS, self.counts)},
                "probe_interval_ms": round(self._interval * 1000, 3)}


def rss_bytes() -> int | None:
    """
    The process's resident memory in bytes (Linux), or None where unknown.
    """
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_report(node: Any, directory: str, top: int = 30) -> str:
    """
    Write a memory report of C{node}'s process to a new file in
    C{directory} and return its path.

    The report holds the process's resident memory, the table's size, the
    number of live objects of each type (the C{top} most common), and, when
    tracemalloc is tracing, the C{top} source lines that allocated the most.
    If it was not tracing, tracing starts now (it costs memory and time from
    here on), so the next report can say where memory goes.

    @raise OSError: if the file cannot be written.
    """
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = os.path.join(directory, f"memory-{stamp}-{os.getpid()}.txt")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"memory-{stamp}-{os.getpid()}-{n}.txt")
    gc.collect()
    counts = Counter(type(obj).__qualname__ for obj in gc.get_objects())
    lines = [
        f"dtable memory report, node {node.node_id}, pid {os.getpid()}, {stamp} UTC",
        "",
        f"resident memory: {rss_bytes()} bytes",
        f"objects in the table: {len(node.table)}",
        f"revision: {node.head.rev}",
        f"links: {len(node.links)}",
        f"message ids remembered: {len(node.messages)}",
        f"firewall: {node.firewall.counts()}",
        "",
        f"live objects tracked by the garbage collector, by type (top {top}):",
    ]
    lines += [f"  {count:>12,}  {name}" for name, count in counts.most_common(top)]
    lines.append("")
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__)])
        statistics = snapshot.statistics("lineno")
        total = sum(stat.size for stat in statistics)
        lines.append(f"allocations traced since tracing started: {total:,} bytes; "
                     f"top {top} lines:")
        for stat in statistics[:top]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size:>14,} bytes {stat.count:>10,} blocks  "
                         f"{frame.filename}:{frame.lineno}")
    else:
        tracemalloc.start()
        lines.append("tracemalloc was not tracing; it traces from now on, so the next "
                     "report lists the lines that allocate the most.")
    with open(path, "w", encoding="utf-8") as report:
        report.write("\n".join(lines) + "\n")
    return path
