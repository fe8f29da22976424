"""
The control API: HTTP and JSON on twisted.web, in the node's own process,
for programs not written in Python and for operators.

    GET    /                    the status page (no token needed; it asks for one)
    GET    /objects             the table, a page at a time, with each object's hash
    POST   /objects             add an object, or a list of them (master only)
    GET    /objects/{hash}      one object
    DELETE /objects/{hash}      remove an object (master only)
    DELETE /objects             remove a JSON list of hashes (master only)
    POST   /messages            send a message to every node online (?list=1:
                                each item of a JSON list as its own message)
    GET    /events              Server-Sent Events: object_added, object_removed,
                                message_received, error (?snapshot=1 starts with
                                the table, then a ready event)
    GET    /status              the node, its links, the overlay, the firewall
    GET    /metrics             Prometheus text format

Every path but the page needs C{Authorization: Bearer TOKEN}. Errors are
JSON, C{{"error": "..."}}, with the matching status code. This module turns
HTTP into calls on L{dtable.service.DistributedTable} and results into
JSON; the node owns every rule (only the master changes the table).
"""

from __future__ import annotations

import hmac
import json
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from dtable.canonical import InvalidObjectError, canonical_bytes, hash_bytes, is_hash
from dtable.interfaces import TableObserver

if TYPE_CHECKING:
    from dtable.service import DistributedTable

log = Logger(namespace="dtable.api")

#: Objects in one page of GET /objects, by default and at most.
PAGE_SIZE = 100
MAX_PAGE_SIZE = 10_000
#: Seconds between keep-alive comments on an event stream.
KEEP_ALIVE = 15.0
#: Bytes of events that may wait for a slow event-stream client; past this
#: the stream is closed rather than let it grow the node's memory.
MAX_STREAM_QUEUE = 16 * 1024 * 1024
#: Objects read from the store per step of a snapshot.
SNAPSHOT_CHUNK = 500
#: Seconds a stopping node lets its API connections send what they hold
#: before it aborts them.
CLOSE_GRACE = 2.0


def api_endpoint(description: str) -> str:
    """
    The endpoint string for C{--api}: a bare port, or C{tcp:PORT} without an
    interface, listens on loopback only; anything else is used as given.
    """
    text = description.strip()
    if text.isdigit():
        return f"tcp:{text}:interface=127.0.0.1"
    if text.startswith("tcp:") and "interface=" not in text:
        return f"{text}:interface=127.0.0.1"
    if text.startswith("tcp6:") and "interface=" not in text:
        return f"{text}:interface=\\:\\:1"
    return text


class ApiError(Exception):
    """
    A request the API answers with an error: C{code} and a message for the
    client.
    """

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _LimitedRequest(server.Request):
    """
    A request whose body is not kept past the site's C{max_body} bytes: the
    rest is read and dropped, and the API answers 413.
    """

    too_large = False
    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.max_body:
            self.too_large = True
        super().gotLength(None if self.too_large else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class _ApiSite(server.Site):
    """
    The API's site: requests are logged to the access log file if the node
    has one (C{logPath}), and not otherwise (twisted.web would write them
    to the process's log).
    """

    def log(self, request: server.Request) -> None:
        if self.logPath:
            super().log(request)


class _Connection(ProtocolWrapper):
    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.factory.connection_gone()


class ApiConnections(WrappingFactory):
    """
    The API's site with every open connection tracked, so that a stopping
    node closes them all and knows when they are gone.
    """

    protocol = _Connection
    noisy = False

    def __init__(self, site: server.Site) -> None:
        super().__init__(site)
        self._idle: list[Deferred] = []

    def connection_gone(self) -> None:
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def close_all(self, grace: float = CLOSE_GRACE) -> Deferred:
        """
        Close every open connection once what was written to it is sent
        (the end of a finished event stream, a last answer), and abort those
        still open after C{grace} seconds; the Deferred fires once all are
        gone.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        reactor = self.wrappedFactory.reactor

        def abort() -> None:
            for protocol in list(self.protocols):
                protocol.transport.abortConnection()

        call = reactor.callLater(grace, abort)

        def cancel(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel)


def make_site(node: "DistributedTable", token: str) -> tuple[ApiConnections, "ApiResource"]:
    """
    The factory to listen with, and the API resource (which holds the open
    event streams).
    """
    root = ApiResource(node, token)
    # The API takes JSON only: no parsing of form bodies (which would also
    # parse every request's Content-Type with the email package).
    site = _ApiSite(root, reactor=node.reactor, timeout=300,
                    logPath=node.config.api_access_log, parsePOSTFormSubmission=False)
    site.requestFactory = _LimitedRequest
    site.max_body = max(1, node.config.max_frame // 2)
    site.displayTracebacks = False
    site.noisy = False
    return ApiConnections(site), root


# Metrics ----------------------------------------------------------------------


class NodeCollector:
    """
    A Prometheus collector that reads the node's state at every scrape.
    """

    def __init__(self, node: "DistributedTable") -> None:
        self.node = node

    def collect(self):
        node = self.node
        status = node.status()
        gauges = [
            ("dtable_objects", "Objects in the table.", status["objects"]),
            ("dtable_revision", "Revision of the table.", status["head"]["rev"]),
            ("dtable_master", "1 on the master, 0 elsewhere.", int(status["master"])),
            ("dtable_links", "Live links to other nodes.", len(status["links"])),
            ("dtable_known_nodes", "Nodes this node knows addresses of.", len(status["known"])),
            ("dtable_overlay_nodes", "Nodes whose beacons arrived recently.",
             len(status["overlay"]["nodes"])),
            ("dtable_uptime_seconds", "Seconds since the node started.", status["uptime"]),
            ("dtable_resident_memory_bytes", "Resident memory of the node's process.",
             status["rss_bytes"] or 0),
            ("dtable_store_pending_commits", "Commits waiting to be written to disk.",
             status["store_pending"]),
            ("dtable_pending_handshakes", "Inbound connections waiting for their hello.",
             status["firewall"]["pending_handshakes"]),
            ("dtable_firewall_addresses", "Addresses the firewall tracks.",
             status["firewall"]["total"]),
            ("dtable_firewall_blocked", "Addresses blocked now.", status["firewall"]["blocked"]),
            ("dtable_firewall_warned", "Addresses warned now.", status["firewall"]["warned"]),
            ("dtable_firewall_blocked_subnets", "IPv6 subnets blocked now.",
             status["firewall"]["blocked_subnets"]),
            ("dtable_reactor_worst_stall_seconds",
             "The longest the reactor ran late since the node started.",
             status["reactor"]["worst_stall_ms"] / 1000),
            ("dtable_reactor_recent_worst_stall_seconds",
             "The longest the reactor ran late in the last minute.",
             status["reactor"]["recent_worst_stall_ms"] / 1000),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        traffic = status["traffic"]
        counters = status["counters"]
        totals = [
            ("dtable_bytes_received", "Bytes received from peers.", traffic["bytes_in"]),
            ("dtable_bytes_sent", "Bytes sent to peers.", traffic["bytes_out"]),
            ("dtable_frames_received", "Frames received from peers.", traffic["frames_in"]),
            ("dtable_frames_sent", "Frames sent to peers.", traffic["frames_out"]),
            ("dtable_batches_applied", "Batches applied (received or published).",
             counters["batches_applied"]),
            ("dtable_messages_received", "Messages delivered to this node.",
             counters["messages_received"]),
            ("dtable_messages_relayed", "Message frames relayed to peers.",
             counters["messages_relayed"]),
            ("dtable_firewall_blocks", "Blocks of addresses and subnets.",
             counters["firewall_blocks"]),
            ("dtable_firewall_refused", "Connections refused by the firewall.",
             status["firewall"]["refused"]),
            ("dtable_refused_busy", "Connections refused while too many handshakes were open.",
             status["firewall"]["refused_busy"]),
        ]
        for name, documentation, value in totals:
            yield CounterMetricFamily(name, documentation, value=value)
        catch_ups = CounterMetricFamily("dtable_catch_ups", "Catch-ups by how they went.",
                                        labels=["kind"])
        catch_ups.add_metric(["log"], counters["catch_ups_log"])
        catch_ups.add_metric(["merkle"], counters["catch_ups_merkle"])
        yield catch_ups
        stalls = CounterMetricFamily(
            "dtable_reactor_stalls", "Times the reactor ran late by more than a threshold.",
            labels=["over_seconds"])
        for over_ms, count in status["reactor"]["stalls_over_ms"].items():
            stalls.add_metric([f"{float(over_ms) / 1000:g}"], count)
        yield stalls


# Event streams ----------------------------------------------------------------


@implementer(IPushProducer)
class EventStream(TableObserver):
    """
    One client's Server-Sent Events: the node's events as they happen,
    optionally after the whole table. Writes wait while the client's
    connection is paused, up to L{MAX_STREAM_QUEUE} bytes; a client that
    lets more pile up is disconnected.
    """

    def __init__(self, node: "DistributedTable", request: server.Request,
                 snapshot: bool, on_close: Callable[["EventStream"], None]) -> None:
        self.node = node
        self.request = request
        self._on_close = on_close
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._closed = False
        self._resumed: Deferred | None = None
        # Live events wait here while the snapshot is sent.
        self._held: list[bytes] | None = [] if snapshot else None
        self._keep_alive = LoopingCall(self._write, b": keep-alive\n\n")
        self._keep_alive.clock = node.reactor

    def start(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self._gone())
        self._unsubscribe = self.node.subscribe(self)
        request.write(b": dtable events\n\n")
        self._keep_alive.start(KEEP_ALIVE, now=False)
        if self._held is not None:
            Deferred.fromCoroutine(self._send_snapshot()).addErrback(
                lambda f: log.failure("event stream snapshot failed", f))

    async def _send_snapshot(self) -> None:
        from twisted.internet.task import deferLater

        table = self.node.table
        after = ""
        sent = 0
        while not self._closed:
            hashes = table.page(after, SNAPSHOT_CHUNK)
            if not hashes:
                break
            after = hashes[-1]
            data = self.node.object_data(hashes)
            for h in hashes:
                if h in data:
                    self._write(_event("object_added", b'{"hash":"' + h.encode() +
                                       b'","object":' + data[h] + b"}"))
                    sent += 1
            while self._paused and not self._closed:
                self._resumed = Deferred()
                await self._resumed
            # Let the node serve its peers between chunks.
            await deferLater(self.node.reactor, 0, lambda: None)
        if self._closed:
            return
        held, self._held = self._held or [], None
        self._write(_event("ready", _json_bytes({"rev": self.node.head.rev,
                                                 "objects": sent})))
        for event in held:
            self._write(event)

    # ITableObserver ------------------------------------------------------------

    def object_added(self, obj: dict) -> None:
        self._event("object_added", obj)

    def object_removed(self, obj: dict) -> None:
        self._event("object_removed", obj)

    def message_received(self, msg: object) -> None:
        self._send(_event("message_received", _json_bytes({"body": msg})))

    def error(self, error_string: str, origin: str, obj: object) -> None:
        self._send(_event("error", _json_bytes({"error": error_string, "origin": origin})))

    def _event(self, name: str, obj: dict) -> None:
        data = canonical_bytes(obj)
        self._send(_event(name, b'{"hash":"' + hash_bytes(data).encode() +
                          b'","object":' + data + b"}"))

    def _send(self, event: bytes) -> None:
        if self._held is not None:
            self._held.append(event)
            self._queued += len(event)
            self._check_queue()
        else:
            self._write(event)

    # Writing with backpressure ------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._paused or self._queue:
            self._queue.append(data)
            self._queued += len(data)
            self._check_queue()
            return
        self.request.write(data)

    def _check_queue(self) -> None:
        if self._queued > MAX_STREAM_QUEUE and not self._closed:
            log.warn("event stream client does not read: {queued} bytes waiting; "
                     "closing it", queued=self._queued)
            self.close(abort=True)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and not self._closed:
            data = self._queue.popleft()
            self._queued -= len(data)
            self.request.write(data)
        if not self._paused and self._resumed is not None:
            d, self._resumed = self._resumed, None
            d.callback(None)

    def stopProducing(self) -> None:
        self._gone()

    def close(self, abort: bool = False) -> None:
        """
        End the stream (the node is stopping, or the client is too slow).
        """
        if self._closed:
            return
        if abort:
            self.request.transport.abortConnection()
            self._gone()
            return
        self._gone()
        self.request.unregisterProducer()
        self.request.finish()

    def _gone(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._queued = 0
        if self._keep_alive.running:
            self._keep_alive.stop()
        unsubscribe = getattr(self, "_unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe()
        if self._resumed is not None:
            d, self._resumed = self._resumed, None
            d.callback(None)
        self._on_close(self)


def _event(name: str, data: bytes) -> bytes:
    # JSON text holds no newline (json.dumps escapes them), so one data line.
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


# The resource -----------------------------------------------------------------


class ApiResource(Resource):
    """
    Every path of the API: checks the token, routes, and turns results and
    errors into JSON responses.
    """

    isLeaf = True

    def __init__(self, node: "DistributedTable", token: str) -> None:
        super().__init__()
        self.node = node
        self._token = token.encode("utf-8")
        self.streams: set[EventStream] = set()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(NodeCollector(node))

    def close_streams(self) -> None:
        for stream in list(self.streams):
            stream.close()

    def render(self, request: server.Request) -> bytes | int:
        try:
            return self._route(request)
        except Exception:
            return self._failed(request, Failure())

    def _failed(self, request: server.Request, failure: Failure) -> bytes:
        """
        The answer to a request whose handler failed: an L{ApiError} as
        itself, anything else as a logged internal error.
        """
        if failure.check(ApiError):
            return self._error(request, failure.value)
        log.failure("API request {method} {path} failed", failure,
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("ascii", "replace"))
        return self._error(request, ApiError(500, "internal error; see the node's log"))

    def _answer_later(self, request: server.Request, answer: Deferred) -> int:
        """
        Answer C{request} when C{answer} fires: with the bytes it gives, or
        not at all if it gives NOT_DONE_YET (a handler that goes on waiting
        finishes the request itself), or with the error it fails with.
        """
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def write(body: bytes | int) -> None:
            if not gone and body is not server.NOT_DONE_YET:
                assert isinstance(body, bytes)
                request.write(body)
                request.finish()

        answer.addErrback(lambda failure: self._failed(request, failure))
        answer.addCallback(write)
        return server.NOT_DONE_YET

    # Routing ---------------------------------------------------------------------

    def _route(self, request: server.Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        while parts and parts[-1] == "":
            parts.pop()
        if not parts:
            self._allow(method, "GET")
            return self._page(request)
        self._authorize(request)
        if getattr(request, "too_large", False):
            raise ApiError(413, f"the body is larger than {request.channel.site.max_body} "
                                "bytes")
        name, rest = parts[0], parts[1:]
        if name == "objects" and not rest:
            self._allow(method, "GET", "POST", "DELETE")
            if method == "DELETE":
                return self._remove_many(request)
            return self._list(request) if method == "GET" else self._add(request)
        if name == "objects" and len(rest) == 1:
            self._allow(method, "GET", "DELETE")
            h = rest[0]
            if not is_hash(h):
                raise ApiError(400, f"{h!r} is not an object hash (64 lowercase hex digits)")
            return self._get(request, h) if method == "GET" else self._remove(request, h)
        if name == "messages" and not rest:
            self._allow(method, "POST")
            return self._message(request)
        if name == "events" and not rest:
            # Not HEAD: the headers of a stream come with the stream.
            if method != "GET":
                raise ApiError(405, f"{method} is not allowed here; use GET",
                               {"Allow": "GET"})
            return self._events(request)
        if name == "status" and not rest:
            self._allow(method, "GET")
            return self._json(request, self.node.status())
        if name == "metrics" and not rest:
            self._allow(method, "GET")
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            return generate_latest(self._registry)
        raise ApiError(404, f"no such path: /{'/'.join(parts)}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method == "HEAD" and "GET" in allowed:
            return
        if method not in allowed:
            raise ApiError(405, f"{method} is not allowed here; use {' or '.join(allowed)}",
                           {"Allow": ", ".join(allowed)})

    def _authorize(self, request: server.Request) -> None:
        raw = request.getHeader(b"authorization")
        header = None if raw is None else raw.decode("latin-1")
        challenge = {"WWW-Authenticate": 'Bearer realm="dtable"'}
        if header is None:
            raise ApiError(401, "this API needs a token: send Authorization: Bearer TOKEN",
                           challenge)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "the Authorization header must be: Bearer TOKEN", challenge)
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._token):
            raise ApiError(401, "the token is wrong", challenge)

    # Handlers ------------------------------------------------------------------------

    def _page(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return resources.files("dtable").joinpath("web/status.html").read_bytes()

    def _list(self, request: server.Request) -> bytes:
        args = _query(request)
        limit = _int_arg(args, "limit", PAGE_SIZE, 1, MAX_PAGE_SIZE)
        after = args.get("after", "")
        if after and (len(after) > 64 or any(c not in "0123456789abcdef" for c in after)):
            raise ApiError(400, "after must be an object hash (lowercase hex)")
        hashes = self.node.table.page(after, limit)
        data = self.node.object_data(hashes)
        items = b",".join(b'{"hash":"' + h.encode() + b'","object":' + data[h] + b"}"
                          for h in hashes if h in data)
        next_after = hashes[-1] if len(hashes) == limit else None
        tail = _json_bytes({"next": next_after, "count": len(self.node),
                            "rev": self.node.head.rev})
        request.setHeader(b"content-type", b"application/json")
        return b'{"objects":[' + items + b"]," + tail[1:]

    def _get(self, request: server.Request, h: str) -> bytes:
        data = self.node.object_data([h]).get(h)
        if data is None:
            raise ApiError(404, f"no object {h} in the table")
        request.setHeader(b"content-type", b"application/json")
        return b'{"hash":"' + h.encode() + b'","object":' + data + b"}"

    def _add(self, request: server.Request) -> bytes | int:
        self._require_master("add objects")
        body = _json_body(request)
        objects = body if isinstance(body, list) else [body]

        def added(hashes: list[str]) -> bytes | int:
            result: dict[str, Any] = ({"hashes": hashes} if isinstance(body, list)
                                      else {"hash": hashes[0]})
            request.setResponseCode(http.CREATED if hashes else http.OK)
            return self._maybe_wait(request, result)

        def invalid(failure: Failure) -> None:
            failure.trap(InvalidObjectError)
            raise ApiError(400, f"not a table object: {failure.value}")

        # Encoded across turns: a long list does not hold up the node.
        adding = self.node.add_objects_cooperatively(objects)
        return self._answer_later(request, adding.addCallbacks(added, invalid))

    def _remove(self, request: server.Request, h: str) -> bytes | int:
        self._require_master("remove objects")
        if h not in self.node.table:
            raise ApiError(404, f"no object {h} in the table")
        self.node.remove_object(h)
        return self._maybe_wait(request, {"hash": h})

    def _remove_many(self, request: server.Request) -> bytes | int:
        self._require_master("remove objects")
        body = _json_body(request)
        if not isinstance(body, list) or not all(isinstance(h, str) and is_hash(h)
                                                 for h in body):
            raise ApiError(400, "send a JSON list of object hashes to remove")
        for h in body:
            self.node.remove_object(h)
        return self._maybe_wait(request, {"removed": sum(h in self.node.table
                                                         for h in body)})

    def _message(self, request: server.Request) -> bytes:
        body = _json_body(request)
        if _query(request).get("list", "0").lower() in ("1", "true", "yes"):
            if not isinstance(body, list):
                raise ApiError(400, "with ?list=1 the body is a JSON list of messages")
            try:
                return self._json(request, {"ids": self.node.send_messages(body)})
            except InvalidObjectError as e:
                raise ApiError(400, f"not a message: {e}")
        try:
            message_id = self.node.send_message(body)
        except InvalidObjectError as e:
            raise ApiError(400, f"not a message: {e}")
        return self._json(request, {"id": message_id})

    def _events(self, request: server.Request) -> int:
        args = _query(request)
        snapshot = args.get("snapshot", "0").lower() in ("1", "true", "yes")
        stream = EventStream(self.node, request, snapshot, self.streams.discard)
        self.streams.add(stream)
        stream.start()
        return server.NOT_DONE_YET

    # Helpers -------------------------------------------------------------------------

    def _require_master(self, what: str) -> None:
        if not self.node.config.master:
            raise ApiError(403, f"only the master can {what}; this node is not the master")

    def _maybe_wait(self, request: server.Request, result: dict[str, Any]) -> bytes | int:
        """
        Answer now, or with C{?wait=1} once the change is published (the
        answer then holds the new revision).
        """
        if _query(request).get("wait", "0").lower() not in ("1", "true", "yes"):
            return self._json(request, result)
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def published(head: Any) -> None:
            if not gone:
                request.write(self._json(request, {**result, "rev": head.rev}))
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("waiting for a publication failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.write(self._json(request, {"error": "the change was not published"}))
                request.finish()

        self.node.flush().addCallbacks(published, failed)
        return server.NOT_DONE_YET

    @staticmethod
    def _json(request: server.Request, value: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return _json_bytes(value)

    def _error(self, request: server.Request, error: ApiError) -> bytes:
        request.setResponseCode(error.code)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return self._json(request, {"error": error.message})


def _query(request: server.Request) -> dict[str, str]:
    query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
    return {name: values[-1] for name, values in parse_qs(query).items()}


def _int_arg(args: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, not {value}")
    return value


def _json_body(request: server.Request) -> Any:
    raw_kind = request.getHeader(b"content-type")
    kind = None if raw_kind is None else raw_kind.decode("latin-1")
    if kind is not None and kind.split(";")[0].strip().lower() not in (
            "application/json", "text/json"):
        raise ApiError(415, f"send JSON (Content-Type: application/json), not {kind}")
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        raise ApiError(400, "the body is empty; send a JSON value")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
