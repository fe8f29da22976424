"""
The replication benchmark's own HTTP reading: what it measures is only as
good as its parsing of the node's chunked event streams.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import sys
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
