"""
Replication performance: how fast the master's adds and removes reach every
node, how fast and how reliably messages are broadcast, how long a large
message or object takes, how late the nodes' reactors run meanwhile, and
how much memory a node holds per object.

Every node is a C{twistd -n dtable} child process on 127.0.0.1 with real
TLS, its SQLite store in a directory of its own (C{--data-dir} in a
temporary directory), its log in C{node.log} beside it, and the control API
on a free loopback port with a token file. The driver (this process, plain
synchronous Python with threads) talks to the nodes only through their APIs:
L{dtable.client.ApiClient}, and a persistent HTTP/1.1 connection where
requests go back to back (C{DELETE /objects} lists, the message flood).
The nodes run with C{--stall-probe-interval 0.01} (a stall is how late a
10 ms timer fired), C{--batch-window 0} unless C{--batch-window} says
otherwise, short clean, master-sync and reconnect intervals (they only
speed up forming the network), and C{--static-peers}, so that the links stay
as laid out rather than being rewired by the overlay. The ping interval
stays the node's own (C{--ping-interval} changes it): twice it is also how
long a link may go without a whole frame before it is closed as dead, and a
frame of many megabytes takes longer than a second to arrive.

  - star: n1..n4 each C{--peer} the master;
  - chain: master <- n1 <- n2 <- n3 <- n4 (each C{--peer} the one before).

A fresh network is started for every measurement below (each size of row
1, the messages, the large message, the large object) and stopped after it,
so that each reads the nodes' stall probes and memory from a known start.
The driver waits (within C{--start-timeout}) until every node holds exactly
the intended links, at one head, with the master ready.

1. Replication: the master adds N distinct objects of about 150 bytes of
   canonical JSON (POST /objects with lists of C{--chunk} objects, back to
   back from one client). "API calls" is the time those POSTs took, added
   up (the node answers once the objects are in its batch window, before
   they are published); "holds N" is the time from the first POST until a
   node's /status showed N objects. Each node's /status is polled by a
   thread of its own on a persistent connection, every C{--poll} seconds or
   every 0.5% of the time since the row started if that is longer
   (L{poll_interval}); a time is when the answer that showed it arrived, so
   it is late by up to a poll interval plus that answer's own delay. "all
   replicas" is the slowest of n1..n4; objects/s is N over it.
2. Removal: then half of them are removed (DELETE /objects with lists of
   C{--chunk} hashes) and timed the same way, until every node holds
   exactly N - N/2.
3. Messages: n1 sends C{--messages} messages C{--message-interval} apart
   (POST /messages on one persistent connection, the body holding a
   sequence number); threads of the driver read the /events streams of
   the other four nodes. Latency is from time.time() just before the
   request is written to the time the kernel received the event on the
   driver's side of the stream (SO_TIMESTAMPNS; one machine, one clock),
   over every (message, node) pair delivered: the node's parsing and
   answering of the POST, its flooding over TLS, each node's delivery and
   the SSE hop to the driver, but not the driver's building of the request
   nor its threads waiting for a core or the GIL. The flood then sends
   C{--flood} messages back to back from C{--flood-threads} threads, each
   with a persistent connection to n1's API; "sent/s" is what the API took,
   and "delivered to all/s" is C{--flood} over the time from the first send
   to the last arrival at the last node. Each request carries
   C{--flood-list} messages (POST /messages?list=1).
4. Large payloads: a C{--large-message}-byte message (a JSON string) sent by
   n1, timed from the API call to its SSE arrival at each of the other four;
   and one object with a C{--large-object}-byte string field added on the
   master, timed from the API call until each of n1..n4 shows it in
   /status. These networks run with C{--max-frame} and
   C{--send-queue-limit} raised (268435456 by default) since the API takes
   bodies of up to max-frame / 2.
5. Responsiveness: the worst reactor stall of every node during row 1
   (the target's row), and during row 2.
6. Memory: each node's RSS (/status rss_bytes) at 0 objects, just before
   row 1, and right after it (once every node held N): bytes per object
   above that baseline, against the raw canonical JSON bytes per object.
   The master's figure includes what the API's request bodies left behind
   (Python seldom returns freed memory to the system).
7. Resync is measured by benchmarks/resync.py.

Stalls: the stall probe of a node keeps the worst lateness since the node
started (reactor.worst_stall_ms) and per second for the last minute
(recent_worst_stall_ms). Since every measurement has fresh nodes, the driver
reads worst_stall_ms just before the row and again right after it: if it
grew, the new value is the worst stall of the row, exactly; if not, the
row's worst stall was at most the value before (which covers the node's
start and the network's forming), and the table marks it with "<=". A row's
figure is the worst over the five nodes; the JSON has every node's. The
probe also counts stalls over 50, 100, 250 and 1,000 ms
(reactor.stalls_over_ms), so the count of a row's stalls over 100 ms, summed
over the nodes, is exact: the worst of five nodes over a minute is one draw
from hundreds of stalls, and the count moves less from run to run.

CPU: to show where the time goes, rows 1, 2, 3 (the flood) and 4 also
report the CPU seconds each node used meanwhile, read from the child's
/proc/PID/stat (not through the API), and the driver's own (all its
threads), and "cores busy": all of it over the row's wall time. Five nodes
and the driver share the machine's cores, so a figure near the core count
means the row measured the machine's total CPU rather than one node's
latency, and a node's stall then includes time it waited for a core.

Medians over C{--runs} runs, with min and max; the targets of the issue
follow the table, judged on the medians. A row that does not finish within
C{--timeout} seconds is recorded as failed with what each node had reached,
the tail of the lagging nodes' logs is printed, and the run goes on; a
failed row costs its whole timeout. Every node is stopped by its PID
(SIGTERM, then SIGKILL after 15 s), and the temporary directory is removed
at the end (C{--keep-logs DIR} copies the node logs there first). With the
defaults (sizes 10,000 and 100,000, both topologies, all rows) a run takes
some minutes on two cores. C{--sizes 1000000} takes minutes for that row
alone and needs a longer C{--timeout}; C{--rows objects} leaves out rows 3
and 4.

    python benchmarks/replication.py [--runs 3] [--sizes 10000,100000]
        [--topologies star,chain] [--rows objects,messages,large]
        [--chunk 5000] [--timeout 120] [--batch-window 0]
        [--flood-threads 4] [--json replication.json] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

from dtable import crypto
from dtable.canonical import canonical_bytes
from dtable.client import ApiClient, ApiClientError, read_events
from dtable.testing import free_ports, twistd_command

import _common as common

NAMES = ["master", "n1", "n2", "n3", "n4"]
REPLICAS = NAMES[1:]
#: Who dials whom: node -> the node it --peers.
TOPOLOGIES = {
    "star": {"n1": "master", "n2": "master", "n3": "master", "n4": "master"},
    "chain": {"n1": "master", "n2": "n1", "n3": "n2", "n4": "n3"},
}
#: Every node's options: short intervals, so that the links and the
#: master's start take fractions of a second; a stall probe every 10 ms;
#: the links as laid out.
FAST_OPTIONS = ["--clean-interval", "0.5",
                "--master-sync-timeout", "0.2", "--reconnect-initial-delay", "0.05",
                "--reconnect-max-delay", "0.5", "--stall-probe-interval", "0.01",
                "--static-peers"]
#: Seconds a node has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0
#: Seconds one /status request may take.
STATUS_TIMEOUT = 10.0
#: Seconds without a new arrival, once everything was sent, after which
#: the messages still missing count as lost.
QUIET = 5.0
#: Lines of a node's log printed when its row failed.
TAIL_LINES = 25

TARGETS_NOTE = "targets from the issue"

#: Environment variables, inherited by the nodes, that change how they
#: allocate memory; a result is reported with the ones that were set.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "PYTHONMALLOC")
ALLOCATOR_PREFIXES = ("MALLOC_",)


def allocator_environment(environ: dict[str, str]) -> dict[str, str]:
    """
    The variables of C{environ} that change how the nodes allocate memory
    (the nodes inherit the driver's environment). glibc's
    C{glibc.malloc.hugetlb=1} tunable, for one, makes the copies of a
    64 MB frame several times cheaper (docs/design-notes.rst).
    """
    return {name: value for name, value in sorted(environ.items())
            if name in ALLOCATOR_VARIABLES or name.startswith(ALLOCATOR_PREFIXES)}






def payload(i: int, rng: random.Random) -> dict:
    # About 150 bytes of canonical JSON, distinct by name.
    return {"name": f"object-{i:08d}", "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "pad": f"{rng.getrandbits(400):0100x}"}


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class NodeFailed(Exception):
    """
    A node exited, or the network did not form in time.
    """


class Node:
    """
    One C{twistd -n dtable} child process in a directory of its own.
    """

    def __init__(self, name: str, directory: str, port: int, api_port: int,
                 arguments: list[str], token: str, profile: bool = False) -> None:
        self.name = name
        self.profile = profile
        self.directory = directory
        self.port = port
        self.api_port = api_port
        self.arguments = arguments
        self.token = token
        self.process: subprocess.Popen | None = None
        self.node_id: str | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = STATUS_TIMEOUT) -> ApiClient:
        # One per thread: an ApiClient is one request at a time.
        return ApiClient(self.api, self.token, timeout=timeout)

    def start(self, key_file: str, token_file: str) -> None:
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "twistd.out"), "wb") as output:
            self.process = subprocess.Popen(
                [*twistd_command(), "-n", "--pidfile=", "--logfile=node.log",
                 *(["--profile=node.prof", "--profiler=cprofile", "--savestats"]
                   if self.profile else []),
                 "dtable",
                 "--interface", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", os.path.join(self.directory, "data"),
                 "--key-file", key_file, "--api", str(self.api_port),
                 "--api-token-file", token_file, *FAST_OPTIONS, *self.arguments],
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def cpu(self) -> tuple[float, float] | None:
        """
        User and system CPU seconds the process has used (Linux /proc).
        """
        if self.process is None:
            return None
        try:
            with open(f"/proc/{self.process.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> str:
        """
        Wait for the SIGTERM'd process, SIGKILL it if it has not exited by
        C{deadline} (time.monotonic()); how it ended.
        """
        if self.process is None:
            return "not started"
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            return "killed"
        code = self.process.returncode
        return "stopped" if code == -signal.SIGTERM else f"exited with {code}"

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        texts = []
        for name in ("twistd.out", "node.log"):
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8", errors="replace") as log_file:
                    content = log_file.read().splitlines()
            except OSError:
                continue
            if content:
                texts.append(f"----- {self.name} {name}: last {min(lines, len(content))} of "
                             f"{len(content)} lines -----")
                texts.extend(content[-lines:])
        return "\n".join(texts)


class Dechunk:
    """
    The body of a chunked HTTP/1.1 response, from its bytes as they come.
    """

    def __init__(self) -> None:
        self._buffer = b""
        #: Bytes of the current chunk still to come; -2 once they came and
        #: its CRLF has not; 0 between chunks.
        self._left = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """
        The body bytes in C{data} (after what earlier calls had).

        @raise http.client.HTTPException: if the framing is broken.
        """
        out: list[bytes] = []
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        while not self.done:
            if self._left > 0:
                take = min(self._left, len(buffer) - pos)
                if take == 0:
                    break
                out.append(buffer[pos:pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._left = -2
            if self._left == -2:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos:pos + 2] != b"\r\n":
                    raise http.client.HTTPException("a chunk does not end with CRLF")
                pos += 2
                self._left = 0
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                break
            try:
                size = int(buffer[pos:end].split(b";")[0], 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size {buffer[pos:end][:20]!r}")
            pos = end + 2
            if size == 0:
                self.done = True
                break
            self._left = size
        self._buffer = buffer[pos:]
        return b"".join(out)


def _connect(node: Node, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.api_port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_head(sock: socket.socket, data: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """
    Read a response's status and headers: (status, headers by lower-case
    name, the bytes read past them).
    """
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise http.client.RemoteDisconnected("the node closed the connection")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


_NO_BODY = object()
"""What L{KeepAlive.request} sends as the body of a request without one."""


class KeepAlive:
    """
    Requests on one persistent HTTP/1.1 connection to a node's API, for
    requests sent back to back (L{ApiClient} opens a connection for each).
    It writes each request whole and reads the answer with little parsing
    (http.client's took 0.2 ms a call, in the driver that shares the cores
    with the nodes), and notes in L{sent} the time.time() just before the
    request went out.
    """

    def __init__(self, node: Node, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self._head = (f"Host: 127.0.0.1:{node.api_port}\r\n"
                      f"Authorization: Bearer {node.token}\r\n"
                      "Content-Type: application/json\r\nAccept: application/json\r\n")
        self._sock: socket.socket | None = None
        self.sent = 0.0

    def request(self, method: str, path: str, value: Any) -> Any:
        body = b"" if value is _NO_BODY else json.dumps(value, separators=(",", ":")).encode("utf-8")
        message = (f"{method} {path} HTTP/1.1\r\n{self._head}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            if self._sock is None:
                self._sock = _connect(self.node, self.timeout)
            try:
                self.sent = time.time()
                self._sock.sendall(message)
                status, headers, data = _read_head(self._sock)
                data = self._read_body(headers, data)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The node closed an idle connection: once more, on a new one.
                self.close()
                if attempt == 2:
                    raise
                continue
            if headers.get("connection", "").lower() == "close":
                self.close()
            if status >= 300:
                raise ApiClientError(f"{method} {path} on {self.node.name}: HTTP "
                                     f"{status}: {data[:200]!r}")
            return json.loads(data)

    def get(self, path: str) -> Any:
        """
        GET C{path}: its JSON answer.
        """
        return self.request("GET", path, _NO_BODY)

    def _read_body(self, headers: dict[str, str], data: bytes) -> bytes:
        assert self._sock is not None
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(data) < length:
                more = self._sock.recv(max(65536, length - len(data)))
                if not more:
                    raise http.client.IncompleteRead(data, length - len(data))
                data += more
            return data[:length]
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, chunks = [], Dechunk()
            body.append(chunks.feed(data))
            while not chunks.done:
                more = self._sock.recv(65536)
                if not more:
                    raise http.client.IncompleteRead(b"".join(body))
                body.append(chunks.feed(more))
            return b"".join(body)
        raise http.client.HTTPException("an answer with neither a length nor chunks")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Cpu:
    """
    CPU time of the nodes (from /proc) and of the driver (all its threads)
    from now until L{stop}.
    """

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.started = time.perf_counter()
        self.driver = time.process_time()
        self.before = {node.name: node.cpu() for node in nodes}

    def stop(self) -> dict:
        wall = time.perf_counter() - self.started
        driver = time.process_time() - self.driver
        nodes = {}
        for node in self.nodes:
            was, now = self.before[node.name], node.cpu()
            if was is not None and now is not None:
                nodes[node.name] = {"user_s": now[0] - was[0], "system_s": now[1] - was[1]}
        total = sum(n["user_s"] + n["system_s"] for n in nodes.values())
        return {"wall_s": wall, "driver_s": driver, "nodes": nodes, "nodes_s": total,
                "system_s": sum(n["system_s"] for n in nodes.values()),
                "cores_busy": (total + driver) / wall if wall > 0 else None}


POLL_SHARE = 0.005
"""How long a L{Watch} waits between two polls of a node, at most, as a share
of the time since its row started (and at least its interval)."""


def poll_interval(least: float, elapsed: float) -> float:
    """
    How long a L{Watch} waits before its next poll of a node, C{elapsed}
    seconds after its row started: C{least}, or L{POLL_SHARE} of
    C{elapsed} when that is longer. A time it notes is then late by at most
    that share of itself (plus an answer's delay), and a long row does not
    spend the cores it measures on polls: at every 25 ms, the polls of a
    row of a million objects took about 7% of the machine (0.4 ms of a
    node's CPU and 0.3 ms of the driver's each, on a new connection each).
    """
    return max(least, elapsed * POLL_SHARE)


class Watch:
    """
    Polls every node's /status from a thread each, on a persistent
    connection, every L{poll_interval} seconds, until C{done(status)} holds
    for that node or C{deadline} (time.perf_counter()) passes.
    C{reached[name]} is the time since C{started} of the answer that first
    satisfied C{done}.
    """

    def __init__(self, nodes: list[Node], done: Callable[[dict], bool], started: float,
                 deadline: float, interval: float) -> None:
        self.nodes = nodes
        self.done = done
        self.started = started
        self.deadline = deadline
        self.interval = interval
        self.reached: dict[str, float] = {}
        self.objects: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.polls: dict[str, int] = {node.name: 0 for node in nodes}
        self._threads = [threading.Thread(target=self._poll, args=(node,), daemon=True,
                                          name=f"watch-{node.name}") for node in nodes]

    def start(self) -> "Watch":
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join(max(0.0, self.deadline - time.perf_counter()) + STATUS_TIMEOUT + 1)

    def lagging(self) -> list[str]:
        return [node.name for node in self.nodes if node.name not in self.reached]

    def _poll(self, node: Node) -> None:
        client = KeepAlive(node, STATUS_TIMEOUT)
        try:
            while time.perf_counter() < self.deadline:
                if node.exited() is not None:
                    self.errors[node.name] = f"exited with {node.exited()}"
                    return
                try:
                    status = client.get("/status")
                except (ApiClientError, OSError, http.client.HTTPException) as e:
                    self.errors[node.name] = str(e)
                    client.close()
                    time.sleep(self.interval)
                    continue
                now = time.perf_counter()
                self.polls[node.name] += 1
                self.objects[node.name] = status["objects"]
                if self.done(status):
                    self.reached[node.name] = now - self.started
                    return
                time.sleep(poll_interval(self.interval, now - self.started))
        finally:
            client.close()


#: Linux's socket option that stamps received data with the time the
#: kernel got it (not in Python's socket module).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)


class EventReader:
    """
    Reads one node's /events stream in a thread, and stamps every message
    it delivers with its arrival: C{arrivals[key]}, the key being
    C{(kind, seq)} for a dict body and C{("string", prefix)} for a string
    body. The stream is open (the node subscribed) once the constructor
    returns; it ends when the node stops.

    The arrival is the time the kernel received the bytes that completed
    the event (SO_TIMESTAMPNS, on the time.time() clock), so it does not
    include how long this thread waited for a core or for the interpreter
    lock; where the option is missing, it is time.time() after the read.

    The driver shares the machine with the nodes, so the reader is cheap:
    it takes what one read gives, up to its last whole event, finds the
    C{{"kind": ..., "seq": ...}} bodies in it with one regular expression,
    and parses the events of that block one by one only if some message
    in it is not of that form. Every event of a block gets the block's
    arrival time. Parsing each event took the driver 0.8 of the 2 cores
    in a flood of 19,000 messages per second.
    """

    _MESSAGE = b"event: message_received\n"
    _SEQUENCED = re.compile(
        rb'event: message_received\ndata: \{"body":\{"kind":"([0-9a-z_]+)","seq":([0-9]+)[,}]')

    def __init__(self, node: Node, idle_timeout: float) -> None:
        self.node = node
        self.arrivals: dict[tuple, float] = {}
        self._counts: dict[Any, int] = {}
        self.error: str | None = None
        self._sock = _connect(node, idle_timeout)
        self._stamped = False
        if SO_TIMESTAMPNS is not None:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self._stamped = True
            except OSError:
                pass
        self._sock.sendall(
            (f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{node.api_port}\r\n"
             f"Authorization: Bearer {node.token}\r\nAccept: text/event-stream\r\n\r\n")
            .encode("latin-1"))
        status, headers, self._early = _read_head(self._sock)
        if status != 200 or headers.get("transfer-encoding", "").lower() != "chunked":
            self._sock.close()
            raise ApiClientError(f"GET /events on {node.name}: HTTP {status}, "
                                 f"{headers.get('transfer-encoding', 'not chunked')}")
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name=f"events-{node.name}")
        self._thread.start()

    def _receive(self) -> tuple[bytes, float]:
        if not self._stamped:
            data = self._sock.recv(65536)
            return data, time.time()
        data, ancillary, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(16))
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                return data, seconds + nanoseconds / 1e9
        return data, time.time()

    def _read(self) -> None:
        # The unfinished event at the end of what was read, in pieces: a
        # large message is joined once, not once per read.
        pending: list[bytes] = []
        chunks = Dechunk()
        try:
            raw, now = self._early, time.time()
            while True:
                data = chunks.feed(raw)
                if chunks.done:
                    return
                if data:
                    # Where the last whole event ends, even if its blank
                    # line began in the previous read.
                    carried = pending[-1][-1:] if pending else b""
                    cut = (carried + data).rfind(b"\n\n") - len(carried) + 2
                    if cut < 2 - len(carried):
                        pending.append(data)
                    else:
                        block = b"".join([*pending, data[:cut]])
                        pending = [data[cut:]] if cut < len(data) else []
                        self._block(block, now)
                raw, now = self._receive()
                if not raw:
                    return
        except (OSError, http.client.HTTPException) as e:
            self.error = f"the event stream of {self.node.name} failed: {e}"
        finally:
            self._sock.close()

    def _block(self, block: bytes, now: float) -> None:
        arrivals, counts = self.arrivals, self._counts
        found = self._SEQUENCED.findall(block)
        if len(found) == block.count(self._MESSAGE):
            for kind, seq in found:
                key = (kind.decode(), int(seq))
                if key not in arrivals:
                    arrivals[key] = now
                    counts[key[0]] = counts.get(key[0], 0) + 1
            return
        lines = block.decode("utf-8", "replace").split("\n")
        for event, data in read_events(lines):
            if event != "message_received":
                continue
            body = json.loads(data).get("body")
            if isinstance(body, dict):
                key = (body.get("kind"), body.get("seq"))
            elif isinstance(body, str):
                key = ("string", body[:40])
            else:
                continue
            if key not in arrivals:
                arrivals[key] = now
                counts[key[0]] = counts.get(key[0], 0) + 1

    def count(self, kind: str) -> int:
        # Kept as they arrive: wait_arrivals asks every 10 ms, and counting
        # the arrivals each time took the driver about 0.4 cores in a flood.
        return self._counts.get(kind, 0)


def wait_arrivals(readers: list[EventReader], keys: Callable[[EventReader], int],
                  expected: int, deadline: float, sent_by: Callable[[], float | None]) -> None:
    """
    Wait until every reader has C{expected} arrivals (C{keys(reader)}), or
    C{deadline} (time.perf_counter()) passes, or nothing new arrived for
    L{QUIET} seconds once everything was sent (C{sent_by()} not None).
    """
    last_total, last_change = -1, time.perf_counter()
    while time.perf_counter() < deadline:
        counts = [keys(reader) for reader in readers]
        if all(count >= expected for count in counts):
            return
        total = sum(counts)
        now = time.perf_counter()
        if total != last_total:
            last_total, last_change = total, now
        elif sent_by() is not None and now - max(last_change, sent_by()) > QUIET:
            return
        time.sleep(0.01)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.key_file = os.path.join(workdir, "net.key")
        self.token_file = os.path.join(workdir, "api.token")
        with open(self.key_file, "w") as f:
            f.write(crypto.generate_network_key() + "\n")
        self.token = secrets.token_urlsafe(32)
        with open(self.token_file, "w") as f:
            f.write(self.token + "\n")
        os.chmod(self.key_file, 0o600)
        os.chmod(self.token_file, 0o600)
        self.networks = 0
        self.running: list[Node] = []
        self.rng = random.Random(1)

    # The network ------------------------------------------------------------------

    def start_network(self, label: str, topology: str, extra: list[str]) -> list[Node]:
        self.networks += 1
        base = os.path.join(self.workdir, f"{self.networks:03d}-{label}")
        ports = free_ports(2 * len(NAMES))
        common = ["--batch-window", str(self.args.batch_window)]
        if self.args.ping_interval is not None:
            common += ["--ping-interval", str(self.args.ping_interval)]
        if self.args.batch_max_ops is not None:
            common += ["--batch-max-ops", str(self.args.batch_max_ops)]
        nodes: dict[str, Node] = {}
        for k, name in enumerate(NAMES):
            arguments = [*common, *extra, *shlex.split(self.args.node_args)]
            if name == "master":
                arguments.append("--master")
            else:
                arguments += ["--peer", nodes[TOPOLOGIES[topology][name]].address]
            nodes[name] = Node(name, os.path.join(base, name), ports[2 * k],
                               ports[2 * k + 1], arguments, self.token,
                               profile=name in self.args.profile)
        for node in nodes.values():
            self.running.append(node)
            node.start(self.key_file, self.token_file)
        return list(nodes.values())

    def wait_formed(self, nodes: list[Node], topology: str) -> float:
        """
        Wait until every node holds exactly its intended links, all at one
        head, the master ready; the seconds it took.
        """
        started = time.perf_counter()
        deadline = started + self.args.start_timeout
        clients = {node.name: node.client(timeout=5) for node in nodes}
        by_name = {node.name: node for node in nodes}
        neighbours: dict[str, set[str]] = {name: set() for name in NAMES}
        for name, peer in TOPOLOGIES[topology].items():
            neighbours[name].add(peer)
            neighbours[peer].add(name)
        last = "no answer yet"
        while True:
            for node in nodes:
                if node.exited() is not None:
                    raise NodeFailed(f"{node.name} exited with {node.exited()} while the "
                                     "network formed")
            try:
                statuses = {name: client.status() for name, client in clients.items()}
                for name, status in statuses.items():
                    by_name[name].node_id = status["node_id"]
                ids = {by_name[name].node_id: name for name in NAMES}
                linked = {name: sorted(ids.get(link["node_id"], link["node_id"][:8])
                                       for link in status["links"])
                          for name, status in statuses.items()}
                heads = {json.dumps(status["head"], sort_keys=True)
                         for status in statuses.values()}
                if (statuses["master"]["ready"] and len(heads) == 1
                        and all(linked[name] == sorted(neighbours[name]) for name in NAMES)):
                    return time.perf_counter() - started
                last = f"links {linked}, {len(heads)} heads, master ready: " \
                       f"{statuses['master']['ready']}"
            except ApiClientError as e:
                last = str(e)
            if time.perf_counter() > deadline:
                raise NodeFailed(f"the {topology} did not form in "
                                 f"{self.args.start_timeout:g} s: {last}")
            time.sleep(0.1)

    def stop(self, nodes: list[Node]) -> dict[str, str]:
        for node in nodes:
            node.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        ended = {node.name: node.wait_stopped(deadline) for node in nodes}
        for node in nodes:
            if node in self.running:
                self.running.remove(node)
        return ended

    def stop_all(self) -> None:
        self.stop(list(self.running))

    def archive(self, nodes: list[Node], label: str) -> None:
        if not self.args.keep_logs:
            return
        for node in nodes:
            target = os.path.join(self.args.keep_logs,
                                  f"{os.path.basename(os.path.dirname(node.directory))}"
                                  f"-{node.name}.log")
            try:
                shutil.copyfile(os.path.join(node.directory, "node.log"), target)
                if node.profile:
                    shutil.copyfile(os.path.join(node.directory, "node.prof"),
                                    target[:-len(".log")] + ".prof")
            except OSError:
                pass

    def section(self, label: str, topology: str, extra: list[str],
                body: Callable[[list[Node], dict], None]) -> dict:
        """
        Start a network, run C{body(nodes, result)}, stop the network; a
        failure anywhere is recorded in C{result["failed"]} (a row that
        failed records it in its own dict), and the lagging nodes' log
        tails are printed.
        """
        began = time.perf_counter()
        result: dict[str, Any] = {}
        nodes: list[Node] = []
        try:
            nodes = self.start_network(label, topology, extra)
            result["formed_s"] = self.wait_formed(nodes, topology)
            body(nodes, result)
        except Exception as e:
            result["failed"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
        finally:
            # One network at a time: whatever runs is this one's, even if
            # start_network failed half-way.
            result["stopped"] = self.stop(list(self.running))
        killed = [name for name, how in result["stopped"].items() if how != "stopped"]
        if killed:
            result.setdefault("notes", []).append(
                "; ".join(f"{name} {result['stopped'][name]}" for name in killed))
        failures = _failures(result)
        if failures:
            print(f"  {topology} {label}: FAILED: " + "; ".join(
                f"{where}: {why}" for where, why, _ in failures), flush=True)
            lagging = sorted({name for _, _, names in failures for name in names}) or NAMES
            for node in nodes:
                if node.name in lagging:
                    print(node.log_tail(), flush=True)
        self.archive(nodes, label)
        result["wall_s"] = time.perf_counter() - began
        return result

    # Reading the nodes --------------------------------------------------------------

    def statuses(self, nodes: list[Node]) -> dict[str, dict]:
        return {node.name: node.client(timeout=self.args.timeout).status() for node in nodes}

    @staticmethod
    def stalls(before: dict[str, dict], after: dict[str, dict]) -> dict:
        """
        The worst stall of each node between the two statuses (exact when
        the node's worst since start grew, otherwise an upper bound), and
        of all of them; and how many stalls of each node, and of all, went
        over each threshold the nodes count by (exact).
        """
        per_node = {}
        for name, status in after.items():
            was = before[name]["reactor"]["worst_stall_ms"]
            now = status["reactor"]["worst_stall_ms"]
            grew = now > was
            counted = before[name]["reactor"]["stalls_over_ms"]
            over = {threshold: count - counted[threshold]
                    for threshold, count in status["reactor"]["stalls_over_ms"].items()}
            per_node[name] = {"ms": now if grew else was, "bound": not grew,
                              "before_ms": was, "after_ms": now,
                              "recent_after_ms": status["reactor"]["recent_worst_stall_ms"],
                              "over_ms": over}
        worst = max(per_node, key=lambda name: (per_node[name]["ms"],
                                                per_node[name]["bound"]))
        totals = {threshold: sum(node["over_ms"][threshold] for node in per_node.values())
                  for threshold in per_node[worst]["over_ms"]}
        return {"worst_ms": per_node[worst]["ms"], "bound": per_node[worst]["bound"],
                "worst_node": worst, "over_ms": totals, "nodes": per_node}

    # The rows -----------------------------------------------------------------------

    def objects(self, topology: str, n: int) -> dict:
        args = self.args
        objects = [payload(i, self.rng) for i in range(n)]
        raw = sum(len(canonical_bytes(obj)) for obj in objects[:1000]) / min(n, 1000)
        chunks = [objects[i:i + args.chunk] for i in range(0, n, args.chunk)]

        def body(nodes: list[Node], result: dict) -> None:
            master = nodes[0]
            result["raw_bytes_per_object"] = raw
            before = self.statuses(nodes)
            # Row 1: adds.
            row1 = result["row1"] = {}
            client = master.client(timeout=args.timeout)
            hashes: list[str] = []
            started = time.perf_counter()
            deadline = started + args.timeout
            cpu = Cpu(nodes)
            watch = Watch(nodes, lambda status: status["objects"] >= n, started, deadline,
                          args.poll).start()
            api = 0.0
            try:
                for chunk in chunks:
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"only {len(hashes)} of {n} objects added in "
                                           f"{args.timeout:g} s")
                    call = time.perf_counter()
                    hashes += client.add(chunk)["hashes"]
                    api += time.perf_counter() - call
                row1["api_s"] = api
                row1["api_wall_s"] = time.perf_counter() - started
            except (ApiClientError, TimeoutError) as e:
                row1["failed"] = f"adding: {e}"
            watch.join()
            row1["cpu"] = cpu.stop()
            self._times(row1, watch, n)
            # Right after row 1: the stall probes and the memory.
            after = self.statuses(nodes)
            result["stall"] = self.stalls(before, after)
            result["memory"] = _memory(before, after, n, raw)
            if "failed" in row1:
                result["row2"] = {"failed": "skipped: row 1 failed"}
                return
            # Row 2: removals.
            row2 = result["row2"] = {}
            doomed = hashes[:n // 2]
            left = n - len(doomed)
            connection = KeepAlive(master, args.timeout)
            started = time.perf_counter()
            deadline = started + args.timeout
            cpu = Cpu(nodes)
            watch = Watch(nodes, lambda status: status["objects"] == left, started, deadline,
                          args.poll).start()
            api = 0.0
            try:
                for i in range(0, len(doomed), args.chunk):
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"only {i} of {len(doomed)} removals sent in "
                                           f"{args.timeout:g} s")
                    call = time.perf_counter()
                    connection.request("DELETE", "/objects", doomed[i:i + args.chunk])
                    api += time.perf_counter() - call
                row2["api_s"] = api
                row2["api_wall_s"] = time.perf_counter() - started
            except (ApiClientError, OSError, http.client.HTTPException, TimeoutError) as e:
                row2["failed"] = f"removing: {e}"
            finally:
                connection.close()
            watch.join()
            row2["cpu"] = cpu.stop()
            self._times(row2, watch, len(doomed), target=left)
            row2["stall"] = self.stalls(after, self.statuses(nodes))

        return self.section(f"objects-{n}", topology, [], body)

    def _times(self, row: dict, watch: Watch, count: int, target: int | None = None) -> None:
        row["reached_s"] = dict(watch.reached)
        row["objects"] = dict(watch.objects)
        row["polls"] = dict(watch.polls)
        if watch.errors:
            row["errors"] = dict(watch.errors)
        lagging = watch.lagging()
        if lagging:
            row.setdefault("failed", f"not reached in {self.args.timeout:g} s: " + ", ".join(
                f"{name} at {watch.objects.get(name, '?')} objects" for name in lagging)
                + f" (want {count if target is None else target})")
            row["lagging"] = lagging
            return
        row["all_s"] = max(watch.reached[name] for name in REPLICAS)
        row["slowest"] = max(REPLICAS, key=lambda name: watch.reached[name])
        row["per_s"] = count / row["all_s"] if row["all_s"] > 0 else None

    def messages(self, topology: str) -> dict:
        args = self.args

        def body(nodes: list[Node], result: dict) -> None:
            sender, others = nodes[1], [nodes[0], *nodes[2:]]
            before = self.statuses(nodes)
            readers = [EventReader(node, args.timeout + 60) for node in others]
            result["latency"] = self._latency(sender, readers)
            cpu = Cpu(nodes)
            result["flood"] = self._flood(sender, readers)
            result["flood"]["cpu"] = cpu.stop()
            result["stall"] = self.stalls(before, self.statuses(nodes))
            result["reader_errors"] = {reader.node.name: reader.error for reader in readers
                                       if reader.error}

        return self.section("messages", topology, [], body)

    def _latency(self, sender: Node, readers: list[EventReader]) -> dict:
        args = self.args
        row: dict[str, Any] = {"expected": args.messages * len(readers)}
        # One persistent connection, as a program that sends messages keeps
        # (ApiClient connects for every call, which the node then accepts,
        # answers and closes: a third of the call's time).
        connection = KeepAlive(sender, args.timeout)
        sent: dict[int, float] = {}
        calls: list[float] = []
        done: list[float] = []
        started = time.perf_counter()
        deadline = started + args.timeout
        try:
            for i in range(args.messages):
                delay = started + i * args.message_interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"only {i} messages sent in {args.timeout:g} s")
                at = time.time()
                call = time.perf_counter()
                connection.request("POST", "/messages",
                                   {"kind": "latency", "seq": i, "sent": at})
                calls.append(time.perf_counter() - call)
                sent[i] = connection.sent
        except (ApiClientError, TimeoutError, OSError, http.client.HTTPException) as e:
            row["failed"] = f"sending: {e}"
        finally:
            connection.close()
        done.append(time.perf_counter())
        wait_arrivals(readers, lambda reader: reader.count("latency"), len(sent), deadline,
                      lambda: done[0])
        latencies = []
        per_node = {}
        for reader in readers:
            mine = [at - sent[seq] for (kind, seq), at in list(reader.arrivals.items())
                    if kind == "latency" and seq in sent]
            latencies += mine
            per_node[reader.node.name] = {
                "delivered": len(mine), "p50_ms": common.ms(percentile(mine, 50)),
                "p99_ms": common.ms(percentile(mine, 99)), "max_ms": common.ms(max(mine, default=None))}
        row.update({"sent": len(sent), "delivered": len(latencies),
                    "fraction": len(latencies) / row["expected"],
                    "p50_ms": common.ms(percentile(latencies, 50)),
                    "p99_ms": common.ms(percentile(latencies, 99)),
                    "max_ms": common.ms(max(latencies, default=None)),
                    "api_p50_ms": common.ms(percentile(calls, 50)),
                    "api_p99_ms": common.ms(percentile(calls, 99)), "nodes": per_node})
        missing = [name for name, stats in per_node.items()
                   if stats["delivered"] < args.messages]
        if missing and "failed" not in row:
            row["failed"] = "not every message delivered: " + ", ".join(
                f"{name} {per_node[name]['delivered']}/{args.messages}" for name in missing)
            row["lagging"] = missing
        return row

    def _flood(self, sender: Node, readers: list[EventReader]) -> dict:
        args = self.args
        count, threads = args.flood, args.flood_threads
        row: dict[str, Any] = {"expected": count * len(readers), "threads": threads}
        sent_at: dict[int, float] = {}
        errors: list[str] = []
        finished: list[float] = []
        started_wall = time.time()
        started = time.perf_counter()
        deadline = started + args.timeout

        def send(first: int) -> None:
            connection = KeepAlive(sender, args.timeout)
            step = args.flood_list
            try:
                for start in range(first * step, count, threads * step):
                    if time.perf_counter() > deadline or errors:
                        return
                    at = time.time()
                    seqs = range(start, min(start + step, count))
                    connection.request("POST", "/messages?list=1",
                                       [{"kind": "flood", "seq": i, "sent": at} for i in seqs])
                    for i in seqs:
                        sent_at[i] = connection.sent
            except (ApiClientError, OSError, http.client.HTTPException) as e:
                errors.append(str(e))
            finally:
                connection.close()

        senders = [threading.Thread(target=send, args=(k,), daemon=True)
                   for k in range(threads)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(max(0.0, deadline - time.perf_counter()) + args.timeout)
        finished.append(time.perf_counter())
        row["sent"] = len(sent_at)
        row["send_s"] = finished[0] - started
        row["sent_per_s"] = len(sent_at) / row["send_s"] if row["send_s"] > 0 else None
        if errors:
            row["failed"] = f"sending: {errors[0]}"
        wait_arrivals(readers, lambda reader: reader.count("flood"), len(sent_at), deadline,
                      lambda: finished[0])
        latencies, last = [], []
        per_node = {}
        for reader in readers:
            mine = {seq: at for (kind, seq), at in list(reader.arrivals.items())
                    if kind == "flood" and seq in sent_at}
            latencies += [at - sent_at[seq] for seq, at in mine.items()]
            if mine:
                last.append(max(mine.values()))
            per_node[reader.node.name] = {"delivered": len(mine)}
        delivered = len(latencies)
        row.update({"delivered": delivered, "fraction": delivered / row["expected"],
                    "p50_ms": common.ms(percentile(latencies, 50)),
                    "p99_ms": common.ms(percentile(latencies, 99)), "nodes": per_node})
        if last:
            span = max(last) - started_wall
            row["all_s"] = span
            # Messages that reached every node, per second of the whole flood.
            to_all = min(stats["delivered"] for stats in per_node.values())
            row["delivered_per_s"] = to_all / span if span > 0 else None
        missing = [name for name, stats in per_node.items() if stats["delivered"] < count]
        if missing and "failed" not in row:
            row["failed"] = "not every message delivered: " + ", ".join(
                f"{name} {per_node[name]['delivered']}/{count}" for name in missing)
            row["lagging"] = missing
        return row

    def large_message(self, topology: str) -> dict:
        args = self.args
        size = args.large_message

        def body(nodes: list[Node], result: dict) -> None:
            sender, others = nodes[1], [nodes[0], *nodes[2:]]
            before = self.statuses(nodes)
            readers = [EventReader(node, args.timeout + 60) for node in others]
            prefix = f"large-{secrets.token_hex(8)}-"
            text = prefix + "x" * (size - len(prefix))
            key = ("string", text[:40])
            row = result["row"] = {"bytes": size}
            client = sender.client(timeout=args.timeout)
            cpu = Cpu(nodes)
            started = time.perf_counter()
            sent = time.time()
            try:
                client.send(text)
                row["api_s"] = time.perf_counter() - started
            except ApiClientError as e:
                row["failed"] = f"sending: {e}"
            del text
            # No quiet period: a large message arrives all at once, or not.
            wait_arrivals(readers, lambda reader: int(key in reader.arrivals), 1,
                          started + args.timeout, lambda: None)
            row["cpu"] = cpu.stop()
            row["reached_s"] = {reader.node.name: reader.arrivals[key] - sent
                                for reader in readers if key in reader.arrivals}
            lagging = [reader.node.name for reader in readers if key not in reader.arrivals]
            if lagging:
                row.setdefault("failed", "not delivered to " + ", ".join(lagging))
                row["lagging"] = lagging
            else:
                row["all_s"] = max(row["reached_s"].values())
                row["slowest"] = max(row["reached_s"], key=row["reached_s"].get)
            result["stall"] = self.stalls(before, self.statuses(nodes))

        return self.section("large-message", topology, self._large_options(), body)

    def large_object(self, topology: str) -> dict:
        args = self.args
        size = args.large_object

        def body(nodes: list[Node], result: dict) -> None:
            master = nodes[0]
            before = self.statuses(nodes)
            row = result["row"] = {"bytes": size}
            obj = {"name": "large", "blob": "x" * size}
            client = master.client(timeout=args.timeout)
            cpu = Cpu(nodes)
            started = time.perf_counter()
            deadline = started + args.timeout
            watch = Watch(nodes, lambda status: status["objects"] >= 1, started, deadline,
                          args.poll).start()
            try:
                client.add(obj)
                row["api_s"] = time.perf_counter() - started
            except ApiClientError as e:
                row["failed"] = f"adding: {e}"
            del obj
            watch.join()
            row["cpu"] = cpu.stop()
            self._times(row, watch, 1)
            row.pop("per_s", None)
            result["stall"] = self.stalls(before, self.statuses(nodes))

        return self.section("large-object", topology, self._large_options(), body)

    def _large_options(self) -> list[str]:
        return ["--max-frame", str(self.args.max_frame),
                "--send-queue-limit", str(self.args.send_queue_limit)]

    def run(self, number: int) -> dict[str, dict]:
        args = self.args
        run: dict[str, dict] = {}
        for topology in args.topologies:
            t: dict[str, Any] = {}
            run[topology] = t
            if "objects" in args.rows:
                t["objects"] = {}
                for n in args.sizes:
                    t["objects"][str(n)] = section = self.objects(topology, n)
                    _progress(number, topology, f"{n:,} objects", section,
                              lambda s: common.get("row1", "all_s")(s), "to all replicas")
            if "messages" in args.rows:
                t["messages"] = section = self.messages(topology)
                _progress(number, topology, "messages", section,
                          common.get("latency", "p50_ms"), "ms p50", scale=1)
            if "large" in args.rows:
                t["large_message"] = section = self.large_message(topology)
                _progress(number, topology, "large message", section,
                          common.get("row", "all_s"), "to all four")
                t["large_object"] = section = self.large_object(topology)
                _progress(number, topology, "large object", section,
                          common.get("row", "all_s"), "to all four")
        return run


def _memory(before: dict[str, dict], after: dict[str, dict], n: int, raw: float) -> dict:
    nodes = {}
    for name in NAMES:
        rss0, rss = before[name]["rss_bytes"], after[name]["rss_bytes"]
        nodes[name] = {"rss0": rss0, "rss": rss, "objects": after[name]["objects"],
                       "per_object": (None if rss0 is None or rss is None
                                      else (rss - rss0) / n)}
    replicas = [nodes[name]["per_object"] for name in REPLICAS
                if nodes[name]["per_object"] is not None]
    return {"nodes": nodes, "raw_per_object": raw,
            "master_per_object": nodes["master"]["per_object"],
            "replicas_max_per_object": max(replicas, default=None),
            "rss0_master": nodes["master"]["rss0"],
            "rss0_replicas_max": max((nodes[name]["rss0"] or 0) for name in REPLICAS),
            "rss_master": nodes["master"]["rss"],
            "rss_replicas_max": max((nodes[name]["rss"] or 0) for name in REPLICAS)}


def _failures(result: dict) -> list[tuple[str, str, list[str]]]:
    """
    (where, why, lagging nodes) of every failure in a section's result.
    """
    found = []
    if result.get("failed"):
        found.append(("network", result["failed"], []))
    for key, value in result.items():
        if isinstance(value, dict) and value.get("failed"):
            if not value["failed"].startswith("skipped"):
                found.append((key, value["failed"], value.get("lagging", [])))
    return found


def _progress(number: int, topology: str, what: str, section: dict,
              get: Callable[[dict], Any], unit: str, scale: float = 1) -> None:
    value = get(section)
    text = "-" if value is None else f"{value * scale:.3f} {unit}"
    failed = "; FAILED" if _failures(section) else ""
    print(f"run {number}: {topology} {what}: {text} (section {section['wall_s']:.1f} s, "
          f"forming {section.get('formed_s', 0):.1f} s){failed}", flush=True)








# The table ---------------------------------------------------------------------------


Row = tuple[str, Callable[[dict], Any], str]


def rows(args: argparse.Namespace) -> list[Row]:
    """
    The table's rows: a label, how to read the value from one run of one
    topology, and its format.
    """
    table: list[Row] = []
    if "objects" in args.rows:
        for n in args.sizes:
            def at(*keys: str, n: int = n, **kw: Any) -> Callable[[dict], Any]:
                return common.get("objects", str(n), *keys, **kw)
            table += [
                (f"1. add {n:,}: API calls (s)", at("row1", "api_s"), "{:.2f}"),
                ("   API objects/s", lambda t, at=at, n=n: _rate(n, at("row1", "api_s")(t)),
                 "{:,.0f}"),
                *[(f"   {name} holds N (s)", at("row1", "reached_s", name), "{:.2f}")
                  for name in NAMES],
                ("   all replicas hold N (s)", at("row1", "all_s"), "{:.2f}"),
                ("   objects/s end to end", at("row1", "per_s"), "{:,.0f}"),
                ("   CPU: master (s)", _node_cpu(at("row1", "cpu"), ["master"]), "{:.2f}"),
                ("   CPU: replicas, sum (s)", _node_cpu(at("row1", "cpu"), REPLICAS),
                 "{:.2f}"),
                ("   CPU: driver (s)", at("row1", "cpu", "driver_s"), "{:.2f}"),
                (f"   cores busy (of {os.cpu_count()})", at("row1", "cpu", "cores_busy"),
                 "{:.2f}"),
                (f"2. remove {n // 2:,}: API calls (s)", at("row2", "api_s"), "{:.2f}"),
                ("   all nodes hold N/2 (s)", at("row2", "all_s"), "{:.2f}"),
                ("   removals/s end to end", at("row2", "per_s"), "{:,.0f}"),
                (f"   cores busy (of {os.cpu_count()})", at("row2", "cpu", "cores_busy"),
                 "{:.2f}"),
                ("5. worst stall in row 1 (ms)", _stall("objects", str(n), "stall"), "{:.1f}"),
                ("   stalls over 100 ms in row 1, all nodes",
                 at("stall", "over_ms", "100"), "{:,.0f}"),
                ("   worst stall in row 2 (ms)", _stall("objects", str(n), "row2", "stall"),
                 "{:.1f}"),
                ("6. RSS at 0 objects, master (MiB)",
                 at("memory", "rss0_master", scale=common.mib), "{:.1f}"),
                ("   RSS at 0, replicas max (MiB)",
                 at("memory", "rss0_replicas_max", scale=common.mib), "{:.1f}"),
                ("   RSS at N, master (MiB)", at("memory", "rss_master", scale=common.mib), "{:.1f}"),
                ("   RSS at N, replicas max (MiB)",
                 at("memory", "rss_replicas_max", scale=common.mib), "{:.1f}"),
                ("   RSS/object over 0, master (B)", at("memory", "master_per_object"),
                 "{:,.0f}"),
                ("   RSS/object, replicas max (B)", at("memory", "replicas_max_per_object"),
                 "{:,.0f}"),
                ("   raw object bytes/object (B)", at("memory", "raw_per_object"), "{:,.0f}"),
            ]
    if "messages" in args.rows:
        table += [
            (f"3. {args.messages:,} messages: p50 (ms)", common.get("messages", "latency", "p50_ms"),
             "{:.2f}"),
            ("   p99 (ms)", common.get("messages", "latency", "p99_ms"), "{:.2f}"),
            ("   max (ms)", common.get("messages", "latency", "max_ms"), "{:.2f}"),
            ("   delivered (fraction)", common.get("messages", "latency", "fraction"), "{:.4f}"),
            ("   the POST itself, p50 (ms)", common.get("messages", "latency", "api_p50_ms"),
             "{:.2f}"),
            ("   the POST itself, p99 (ms)", common.get("messages", "latency", "api_p99_ms"),
             "{:.2f}"),
            (f"   flood {args.flood:,}: sent/s (API)", common.get("messages", "flood", "sent_per_s"),
             "{:,.0f}"),
            ("   flood delivered to all/s", common.get("messages", "flood", "delivered_per_s"),
             "{:,.0f}"),
            ("   flood delivered (fraction)", common.get("messages", "flood", "fraction"), "{:.4f}"),
            ("   flood p50 latency (ms)", common.get("messages", "flood", "p50_ms"), "{:.1f}"),
            ("   flood p99 latency (ms)", common.get("messages", "flood", "p99_ms"), "{:.1f}"),
            ("   flood: n1 CPU / wall (cores)",
             lambda t: _rate(_node_cpu(common.get("messages", "flood", "cpu"), ["n1"])(t) or 0,
                             common.get("messages", "flood", "cpu", "wall_s")(t)), "{:.2f}"),
            ("   flood: driver CPU / wall (cores)",
             lambda t: _rate(common.get("messages", "flood", "cpu", "driver_s")(t) or 0,
                             common.get("messages", "flood", "cpu", "wall_s")(t)), "{:.2f}"),
            (f"   flood: cores busy (of {os.cpu_count()})",
             common.get("messages", "flood", "cpu", "cores_busy"), "{:.2f}"),
            ("   worst stall in row 3 (ms)", _stall("messages", "stall"), "{:.1f}"),
            ("   stalls over 100 ms in row 3, all nodes",
             common.get("messages", "stall", "over_ms", "100"), "{:,.0f}"),
        ]
    if "large" in args.rows:
        message, obj = _size(args.large_message), _size(args.large_object)
        table += [
            (f"4. {message} message: API call (s)", common.get("large_message", "row", "api_s"),
             "{:.3f}"),
            ("   to all four (s)", common.get("large_message", "row", "all_s"), "{:.3f}"),
            ("   worst stall (ms)", _stall("large_message", "stall"), "{:.1f}"),
            (f"   {obj} object: API call (s)", common.get("large_object", "row", "api_s"), "{:.3f}"),
            ("   to all four (s)", common.get("large_object", "row", "all_s"), "{:.3f}"),
            ("   worst stall (ms)", _stall("large_object", "stall"), "{:.1f}"),
            ("   stalls over 100 ms, all nodes",
             common.get("large_object", "stall", "over_ms", "100"), "{:,.0f}"),
            ("   CPU, all nodes (s)", common.get("large_object", "row", "cpu", "nodes_s"), "{:.1f}"),
            ("   of it in the kernel (s)", common.get("large_object", "row", "cpu", "system_s"),
             "{:.1f}"),
        ]
    return table


def _stall(*keys: str) -> Callable[[dict], Any]:
    """
    The worst stall of a section; its C{bound} tells whether that is an
    upper bound.
    """
    get: Any = common.get(*keys, "worst_ms")
    get.bound = common.get(*keys, "bound")
    return get


def _node_cpu(get: Callable[[dict], Any], names: list[str]) -> Callable[[dict], Any]:
    """
    User + system CPU seconds of the nodes C{names} in a row's C{cpu}.
    """
    def cpu(t: dict) -> float | None:
        measured = get(t)
        if not measured or any(name not in measured["nodes"] for name in names):
            return None
        return sum(measured["nodes"][name]["user_s"] + measured["nodes"][name]["system_s"]
                   for name in names)
    return cpu


def _rate(count: int, seconds: float | None) -> float | None:
    return None if not seconds else count / seconds


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} B"




def _median(runs: list[dict], topology: str, get: Callable[[dict], Any]) -> float | None:
    values = [v for v in (get(run.get(topology, {})) for run in runs) if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    summary: dict[str, dict] = {}
    for topology in args.topologies:
        summary[topology] = {}
        for label, get, _ in rows(args):
            values = [v for v in (get(run.get(topology, {})) for run in runs) if v is not None]
            if values:
                summary[topology][label.strip()] = {
                    "median": statistics.median(values), "min": min(values),
                    "max": max(values), "runs": len(values)}
    return summary


def targets(runs: list[dict], args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """
    (target, unit, {topology: (median, met)}) for every target the runs
    measured; a median of None (no run finished the row) is not met.
    """
    found = []

    def add(name: str, unit: str, get: Callable[[dict], Any],
            ok: Callable[[float], bool]) -> None:
        results = {}
        for topology in args.topologies:
            value = _median(runs, topology, get)
            results[topology] = (value, value is not None and ok(value))
        found.append((name, unit, results))

    def worst_stall(t: dict, *sections: tuple[str, ...]) -> float | None:
        values = [common.get(*keys, "worst_ms")(t) for keys in sections]
        return None if any(v is None for v in values) else max(values)

    if "objects" in args.rows:
        for n, limit in ((100_000, 5.0), (1_000_000, 60.0)):
            if n in args.sizes:
                add(f"row 1: {n:,} objects on all four replicas <= {limit:g} s", "s",
                    common.get("objects", str(n), "row1", "all_s"), lambda v, limit=limit: v <= limit)
        add("row 5: worst stall during row 1 <= 100 ms (every size)", "ms",
            lambda t: worst_stall(t, *[("objects", str(n), "stall") for n in args.sizes]),
            lambda v: v <= 100)
        largest = max(args.sizes)
        raw = _median(runs, args.topologies[0],
                      common.get("objects", str(largest), "memory", "raw_per_object"))
        if raw is not None:
            limit = 2 * raw + 100
            add(f"row 6: RSS/object at {largest:,} <= 2 x raw + 100 = {limit:.0f} B "
                "(worst node)", "B", lambda t: _memory_worst(t, largest),
                lambda v: v <= limit)
    if "messages" in args.rows:
        add("row 3: message p50 <= 1 ms", "ms", common.get("messages", "latency", "p50_ms"),
            lambda v: v <= 1)
        add("row 3: message p99 <= 10 ms", "ms", common.get("messages", "latency", "p99_ms"),
            lambda v: v <= 10)
        add("row 3: every message delivered (latency and flood)", "delivered",
            lambda t: _min(common.get("messages", "latency", "fraction")(t),
                           common.get("messages", "flood", "fraction")(t)),
            lambda v: v >= 1)
        add("row 3: flood >= 20,000 msg/s delivered to all", "msg/s",
            common.get("messages", "flood", "delivered_per_s"), lambda v: v >= 20_000)
    if "large" in args.rows:
        add(f"row 4: {_size(args.large_message)} message to all four <= 1 s", "s",
            common.get("large_message", "row", "all_s"), lambda v: v <= 1)
        add(f"row 4: {_size(args.large_object)} object to all four <= 5 s", "s",
            common.get("large_object", "row", "all_s"), lambda v: v <= 5)
        add("row 4: no stall > 100 ms during either", "ms",
            lambda t: worst_stall(t, ("large_message", "stall"), ("large_object", "stall")),
            lambda v: v <= 100)
    return found


def _min(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else min(values)


def _memory_worst(t: dict, n: int) -> float | None:
    """
    The worst node's RSS per object over its baseline.
    """
    memory = common.get("objects", str(n), "memory")(t)
    if not memory or memory.get("master_per_object") is None:
        return None
    return max(memory["master_per_object"], memory["replicas_max_per_object"] or 0)


def report(runs: list[dict], args: argparse.Namespace) -> None:
    print(f"\nreplication over TLS on 127.0.0.1: five twistd nodes, SQLite stores, "
          f"batch window {args.batch_window:g} s, objects of ~150 B added in lists of "
          f"{args.chunk:,}; "
          + (f"median (min..max) over {len(runs)} runs" if len(runs) > 1 else "one run"))
    print("times from the first API call; '<=' marks a stall that is an upper bound "
          "(the node's worst since start did not grow during the row)")
    environment = allocator_environment(dict(os.environ))
    if environment:
        print("the nodes ran with " + " ".join(f"{name}={value}"
                                                for name, value in environment.items()))
    print()
    table = rows(args)
    cells = []
    for label, get, fmt in table:
        row = []
        for topology in args.topologies:
            values = [get(run.get(topology, {})) for run in runs]
            bound = getattr(get, "bound", None)
            row.append(common.cell(values, fmt, bound is not None and any(
                bound(run.get(topology, {})) for run in runs)))
        cells.append(row)
    width = max(len(label) for label, _, _ in table) + 2
    columns = [max(len(topology), *(len(row[i]) for row in cells)) + 2
               for i, topology in enumerate(args.topologies)]
    print(" " * width + "".join(f"{t:>{w}}" for t, w in zip(args.topologies, columns)))
    for (label, _, _), row in zip(table, cells):
        print(f"{label:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(row, columns)))
    print("\n7. resync (catch-up from the log, Merkle reconciliation, full resync): "
          "see benchmarks/resync.py")
    # Where the time went, and failures.
    for k, run in enumerate(runs, start=1):
        for topology in args.topologies:
            t = run.get(topology, {})
            for name, section in _sections(t):
                for where, why, _ in _failures(section):
                    print(f"run {k}, {topology}, {name}, {where}: FAILED: {why}")
                for note in section.get("notes", []):
                    print(f"run {k}, {topology}, {name}: {note}")
    for topology in args.topologies:
        slowest = {}
        for run in runs:
            for n in args.sizes if "objects" in args.rows else []:
                name = common.get("objects", str(n), "row1", "slowest")(run.get(topology, {}))
                if name:
                    slowest.setdefault(n, []).append(name)
        stalls: dict[str, list[str]] = {}
        for run in runs:
            for name, section in _sections(run.get(topology, {})):
                stall = section.get("stall")
                if stall:
                    stalls.setdefault(name, []).append(stall["worst_node"])
        if slowest:
            print(f"{topology}: last replica to hold N, by run: " + "; ".join(
                f"{n:,}: {', '.join(names)}" for n, names in slowest.items()))
        if stalls:
            print(f"{topology}: node with the worst stall, by run: " + "; ".join(
                f"{name}: {', '.join(nodes)}" for name, nodes in stalls.items()))
    print(f"\n{TARGETS_NOTE} (judged on the median):")
    found = targets(runs, args)
    width = max((len(name) for name, _, _ in found), default=0) + 2
    for name, unit, results in found:
        verdicts = []
        for topology, (value, met) in results.items():
            shown = ("-" if value is None else f"{value:.2%} {unit}" if unit == "delivered"
                     else f"{value:,.4g} {unit}")
            verdicts.append(f"{topology} {shown}: {'met' if met else 'NOT MET'}")
        print(f"  {name:<{width}}" + "; ".join(verdicts))


def _sections(t: dict) -> list[tuple[str, dict]]:
    found = [(f"{int(n):,} objects", section) for n, section in t.get("objects", {}).items()]
    for key in ("messages", "large_message", "large_object"):
        if key in t:
            found.append((key.replace("_", " "), t[key]))
    return found


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "whole numbers") from None
    if not sizes or any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 2")
    return sizes


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        wrong = [part for part in chosen if part not in allowed]
        if wrong or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return chosen
    return parse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", type=_sizes, default=[10_000, 100_000],
                        help="objects added in row 1, comma-separated (default "
                             "10000,100000; 1000000 takes minutes)")
    parser.add_argument("--topologies", type=_choices(tuple(TOPOLOGIES)),
                        default=list(TOPOLOGIES), help="star,chain (default both)")
    parser.add_argument("--rows", type=_choices(("objects", "messages", "large")),
                        default=["objects", "messages", "large"],
                        help="objects (rows 1, 2, 5, 6), messages (3), large (4); "
                             "default all")
    parser.add_argument("--chunk", type=int, default=5000,
                        help="objects (or hashes) per API call in rows 1 and 2")
    parser.add_argument("--poll", type=float, default=0.025,
                        help="seconds between two /status polls of a node, at "
                             "least (see poll_interval)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a row may take before it counts as failed")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds the five nodes have to start and link")
    parser.add_argument("--batch-window", type=float, default=0.0)
    parser.add_argument("--batch-max-ops", type=int, default=None,
                        help="passed to the nodes (default: the nodes' own)")
    parser.add_argument("--ping-interval", type=float, default=None,
                        help="passed to the nodes (default: the nodes' own); a link "
                             "silent for twice this is closed")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--message-interval", type=float, default=0.01)
    parser.add_argument("--flood", type=int, default=20_000)
    parser.add_argument("--flood-list", type=int, default=100,
                        help="messages per API call in the flood (POST /messages?list=1)")
    parser.add_argument("--flood-threads", type=int, default=4,
                        help="client threads sending the flood, each on a persistent "
                             "connection")
    parser.add_argument("--large-message", type=int, default=5 * 2**20,
                        help="bytes of the large message")
    parser.add_argument("--large-object", type=int, default=64 * 2**20,
                        help="bytes of the large object's string field")
    parser.add_argument("--max-frame", type=int, default=268_435_456,
                        help="--max-frame of the nodes in row 4")
    parser.add_argument("--send-queue-limit", type=int, default=268_435_456,
                        help="--send-queue-limit of the nodes in row 4")
    parser.add_argument("--node-args", default="", metavar="OPTIONS",
                        help="more options for every node's twistd dtable, in one "
                             "string (--node-args=--memory measures without the store)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep-logs", default=None, metavar="DIR",
                        help="copy every node's log to DIR before the temporary "
                             "directory is removed")
    parser.add_argument("--profile", type=_choices(tuple(NAMES)), default=[],
                        help="run these nodes (comma-separated: master,n1,...) under "
                             "cProfile; with --keep-logs their stats are kept as "
                             "DIR/...-NAME.prof (pstats format); slows them down")
    args = parser.parse_args()
    if args.profile and not args.keep_logs:
        parser.error("--profile needs --keep-logs to keep the profiles")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if (args.chunk < 1 or args.flood_threads < 1 or args.messages < 1 or args.flood < 1
            or args.flood_list < 1):
        parser.error("--chunk, --flood-threads, --flood-list, --messages and --flood "
                     "must be positive")
    if args.keep_logs:
        os.makedirs(args.keep_logs, exist_ok=True)

    began = time.perf_counter()
    runs: list[dict] = []
    workdir = tempfile.mkdtemp(prefix="dtable-replication-")
    bench = Bench(args, workdir)
    try:
        for k in range(args.runs):
            runs.append(bench.run(k + 1))
    except KeyboardInterrupt:
        print("interrupted; reporting the runs that finished", flush=True)
    finally:
        bench.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if not runs:
        return 1
    report(runs, args)
    total = time.perf_counter() - began
    print(f"\ntotal {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "node_options": FAST_OPTIONS,
                       "environment": allocator_environment(dict(os.environ)), "runs": runs,
                       "summary": summarize(runs, args),
                       "targets": [{"target": name, "unit": unit,
                                    "results": {t: {"median": v, "met": met}
                                                for t, (v, met) in results.items()}}
                                   for name, unit, results in targets(runs, args)],
                       "total_s": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
