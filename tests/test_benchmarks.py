"""
The replication benchmark's own HTTP reading: what it measures is only as
good as its parsing of the node's chunked event streams.
"""

from __future__ import annotations

import http.client
import http.server
import importlib.util
import json
import os
import sys
import threading
import time
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def replication() -> ModuleType:
    """
    benchmarks/replication.py as a module (it imports its neighbours).
    """
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(
            "replication_benchmark", os.path.join(BENCHMARKS, "replication.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)


BODY = [b"event: a\ndata: 1\n\n", b"x" * 300, b"\n", b"event: b\ndata: {}\n\n"]
STREAM = (b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in BODY[:2])
          + b"%x;name=value\r\n%s\r\n" % (len(BODY[2]), BODY[2])
          + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in BODY[3:])
          + b"0\r\n\r\n")


class DechunkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.Dechunk = replication().Dechunk

    def test_split_anywhere(self) -> None:
        """
        The body comes out whole wherever the reads cut the stream, even
        between a chunk's data and its CRLF, and the end is seen.
        """
        for cut in range(len(STREAM) + 1):
            dechunk = self.Dechunk()
            body = dechunk.feed(STREAM[:cut]) + dechunk.feed(STREAM[cut:])
            self.assertEqual((body, dechunk.done), (b"".join(BODY), True), cut)

    def test_byte_by_byte(self) -> None:
        dechunk = self.Dechunk()
        body = b"".join(dechunk.feed(STREAM[i:i + 1]) for i in range(len(STREAM)))
        self.assertEqual((body, dechunk.done), (b"".join(BODY), True))

    def test_broken_framing(self) -> None:
        for stream in (b"5\r\nhelloXX", b"zz\r\n"):
            with self.assertRaises(http.client.HTTPException):
                self.Dechunk().feed(stream)


class PollIntervalTests(SynchronousTestCase):
    """
    A Watch polls at its interval early in a row, then at a share of the
    time the row has taken.
    """

    def test_interval_then_share(self) -> None:
        bench = replication()
        self.assertEqual(bench.poll_interval(0.025, 0.0), 0.025)
        self.assertEqual(bench.poll_interval(0.025, 4.0), 0.025)
        self.assertAlmostEqual(bench.poll_interval(0.025, 70.0), 70.0 * bench.POLL_SHARE)
        self.assertGreater(bench.poll_interval(0.025, 70.0), 0.025)


class AllocatorEnvironmentTests(SynchronousTestCase):
    """
    A result names the allocator settings the nodes inherited, and no other
    variable of the driver's environment.
    """

    def test_only_allocator_variables(self) -> None:
        environment = replication().allocator_environment({
            "PATH": "/usr/bin", "HOME": "/home/x", "MALLOCATED": "no",
            "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "MALLOC_ARENA_MAX": "2",
            "PYTHONMALLOC": "malloc", "PYTHONPATH": "/src",
        })
        self.assertEqual(environment, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                                       "MALLOC_ARENA_MAX": "2", "PYTHONMALLOC": "malloc"})
        self.assertEqual(list(environment), sorted(environment))

    def test_none_set(self) -> None:
        self.assertEqual(replication().allocator_environment({"PATH": "/usr/bin"}), {})


def _reactor_status(worst: float, recent: float, over: list[int]) -> dict:
    return {"reactor": {"worst_stall_ms": worst, "recent_worst_stall_ms": recent,
                        "stalls_over_ms": dict(zip(("50", "100", "250", "1000"), over))}}


class StallsTests(SynchronousTestCase):
    """
    A row's stalls from the nodes' statuses before and after it: the worst
    (exact if a node's worst since start grew, else a bound) and how many
    went over each threshold, per node and in all.
    """

    def test_worst_and_counts(self) -> None:
        before = {"master": _reactor_status(40.0, 40.0, [3, 1, 0, 0]),
                  "n1": _reactor_status(300.0, 2.0, [9, 5, 1, 0])}
        after = {"master": _reactor_status(120.0, 120.0, [10, 4, 0, 0]),
                 "n1": _reactor_status(300.0, 90.0, [12, 5, 1, 0])}
        stalls = replication().Bench.stalls(before, after)
        self.assertEqual(stalls["nodes"]["master"]["over_ms"],
                         {"50": 7, "100": 3, "250": 0, "1000": 0})
        self.assertEqual(stalls["nodes"]["n1"]["over_ms"],
                         {"50": 3, "100": 0, "250": 0, "1000": 0})
        self.assertEqual(stalls["over_ms"], {"50": 10, "100": 3, "250": 0, "1000": 0})
        # n1's worst since start did not grow: 300 ms is only a bound, and
        # an exact 120 ms does not outrank it.
        self.assertEqual((stalls["worst_ms"], stalls["bound"], stalls["worst_node"]),
                         (300.0, True, "n1"))


class StatusServer(http.server.BaseHTTPRequestHandler):
    """
    Answers GET /status like a node, with one more object each time, over
    persistent HTTP/1.1 connections; the server notes every connection and
    every request's method, path and body.
    """

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        server = self.server
        server.requests.append((self.command, self.path, body))  # type: ignore[attr-defined]
        answer = json.dumps({"objects": len(server.requests)}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


class WatchTests(SynchronousTestCase):
    """
    A Watch polls a node's /status over one persistent connection until its
    condition holds.
    """

    def test_polls_on_one_connection_until_done(self) -> None:
        bench = replication()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusServer)
        server.connections = 0  # type: ignore[attr-defined]
        server.requests = []  # type: ignore[attr-defined]
        serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        serving.start()
        self.addCleanup(serving.join, 10)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        node = bench.Node("n1", "unused", 0, server.server_address[1], [], "token")
        started = time.perf_counter()
        watch = bench.Watch([node], lambda status: status["objects"] >= 5, started,
                            started + 30, 0.001).start()
        watch.join()
        self.assertEqual((watch.errors, watch.objects, watch.polls),
                         ({}, {"n1": 5}, {"n1": 5}))
        self.assertIn("n1", watch.reached)
        self.assertEqual(server.requests, [("GET", "/status", b"")] * 5)  # type: ignore[attr-defined]
        self.assertEqual(server.connections, 1)  # type: ignore[attr-defined]
