"""
A stranger on the network: opens many connections to a dtable node from one
source address and sends garbage or nothing, to exercise its firewall.

It holds no network key and uses plain sockets, so it is a separate process
with its own clock and nothing in common with the node it attacks.

    python benchmarks/attacker.py --port 9999 [--host 127.0.0.1]
        [--source 127.0.0.2] [--garbage 200] [--silent 100]
        [--concurrency 20] [--hold 10]

Garbage connections are opened C{--concurrency} at a time; each sends a few
hundred bytes that are not TLS and waits until the node closes it. Silent
connections are opened first, send nothing, and are held until the node
closes them or C{--hold} seconds pass. It prints one JSON object: how many
connections of each kind were closed by the node, refused outright, or
still open when it gave up, and the time it took.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time

GARBAGE = b"GET / HTTP/1.1\r\nHost: not-a-node\r\n\r\n" * 16
#: Seconds any one connection may wait for the node to close it.
CONNECTION_TIMEOUT = 15.0


class Attack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.selector = selectors.DefaultSelector()
        self.stats = {
            "garbage": {"closed": 0, "refused": 0, "timed_out": 0},
            "silent": {"closed": 0, "refused": 0, "timed_out": 0},
        }
        self.open: dict[socket.socket, tuple[str, float]] = {}
        self.garbage_left = args.garbage

    def connect(self, kind: str) -> None:
        family = socket.AF_INET6 if ":" in self.args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.args.source:
            sock.bind((self.args.source, 0))
        code = sock.connect_ex((self.args.host, self.args.port))
        if code not in (0, errno.EINPROGRESS):
            self.stats[kind]["refused"] += 1
            sock.close()
            return
        self.open[sock] = (kind, time.monotonic())
        self.selector.register(sock, selectors.EVENT_WRITE, "connecting")

    def finish(self, sock: socket.socket, outcome: str) -> None:
        kind, _ = self.open.pop(sock)
        self.stats[kind][outcome] += 1
        self.selector.unregister(sock)
        sock.close()

    def step(self, sock: socket.socket, state: str) -> None:
        kind, _ = self.open[sock]
        if state == "connecting":
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code != 0:
                self.finish(sock, "refused")
                return
            if kind == "garbage":
                try:
                    sock.send(GARBAGE)
                except OSError:
                    self.finish(sock, "closed")
                    return
            self.selector.modify(sock, selectors.EVENT_READ, "reading")
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.finish(sock, "closed")

    def run(self) -> dict:
        started = time.monotonic()
        for _ in range(self.args.silent):
            self.connect("silent")
        while self.open or self.garbage_left:
            in_flight = sum(1 for kind, _ in self.open.values() if kind == "garbage")
            while self.garbage_left and in_flight < self.args.concurrency:
                self.garbage_left -= 1
                in_flight += 1
                self.connect("garbage")
            for key, _ in self.selector.select(timeout=0.1):
                if key.fileobj in self.open:
                    self.step(key.fileobj, key.data)
            now = time.monotonic()
            for sock, (kind, opened) in list(self.open.items()):
                limit = self.args.hold if kind == "silent" else CONNECTION_TIMEOUT
                if now - opened > limit:
                    self.finish(sock, "timed_out")
        return {**self.stats, "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.2",
                        help="local address to connect from")
    parser.add_argument("--garbage", type=int, default=200)
    parser.add_argument("--silent", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds a silent connection is held at most")
    args = parser.parse_args(argv)
    print(json.dumps(Attack(args).run()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
