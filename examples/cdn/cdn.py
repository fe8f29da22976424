"""
A small content delivery network on dtable. The master publishes the files
of a directory into the table; every edge serves them over HTTP and tells the
network, with send_message, where it is and how busy it is; a redirector
answers every request with a 301 to the best edge that is online.

    python examples/cdn/cdn.py master --content site --port 9999
    python examples/cdn/cdn.py edge --location eu --http 8081 --port 10001 \\
        --peer 127.0.0.1:9999
    python examples/cdn/cdn.py edge --location us --http 8082 --port 10002 \\
        --peer 127.0.0.1:9999
    python examples/cdn/cdn.py redirector --http 8080 --port 10000 \\
        --peer 127.0.0.1:9999
    curl -L 'http://127.0.0.1:8080/index.html?location=us'

The table holds one object per file:

    {"type": "cdn-content", "path": "/index.html",
     "content_type": "text/html", "body": "..."}

with "body_base64" instead of "body" when the file is not UTF-8 text. The
master rescans the directory every --scan-interval seconds and replaces the
object of every file that changed (it removes the old object and adds the
new one), so every edge serves the new body. Edges announce

    {"type": "cdn-announce", "url": "http://127.0.0.1:8081",
     "location": "eu", "load": 0.4}

every --announce-interval seconds. Messages are not stored, so the
redirector knows exactly the edges that are online now: it forgets an edge
it has not heard from for --forget-after seconds.

By default every node uses examples/example.key, a published key for the
examples only, and listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import mimetypes
import re
import sys
from pathlib import Path
from typing import Any, Callable, TextIO
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react
from twisted.logger import (FilteringLogObserver, Logger, LogLevel,
                            LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver)
from twisted.web.http import MOVED_PERMANENTLY, NOT_FOUND, SERVICE_UNAVAILABLE
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dtable import DistributedTable, TableObserver, WeakKeyError, object_hash
from dtable.crypto import parse_network_key
from dtable.peers import AddressError, PeerAddress

log = Logger()

CONTENT = "cdn-content"
ANNOUNCE = "cdn-announce"
#: The examples' shared key: published, so it protects nothing.
KEY_FILE = Path(__file__).resolve().parent.parent / "example.key"
#: How long a burst of requests keeps counting in an edge's load, in seconds
#: (as the Unix one-minute load average).
LOAD_WINDOW = 60.0
#: A header value: printable ASCII, no line breaks (no header injection).
HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]*\Z")


# Content: files to table objects and back -----------------------------------

@attrs.frozen
class Content:
    """
    One file as an edge serves it.
    """

    path: str
    content_type: str
    body: bytes

    def describe(self) -> str:
        return f"{self.path} ({self.content_type}, {len(self.body)} bytes)"


def content_object(path: str, body: bytes) -> dict:
    """
    The table object for the file served at C{path}: the body as text when it
    is UTF-8 (readable with C{python -m dtable list}), else base64.
    """
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    obj: dict[str, Any] = {"type": CONTENT, "path": path, "content_type": content_type}
    try:
        obj["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        obj["body_base64"] = base64.b64encode(body).decode("ascii")
    return obj


def parse_content(obj: object) -> Content | None:
    """
    The content an object of the table describes, or None for an object that
    is not content. The table holds only what the master signed, but an edge
    still checks what it will put into HTTP headers.

    @raise ValueError: for a content object that is malformed.
    """
    if not isinstance(obj, dict) or obj.get("type") != CONTENT:
        return None
    path, content_type = obj.get("path"), obj.get("content_type")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"content path must start with /, not {path!r}")
    if not isinstance(content_type, str) or not HEADER_VALUE.match(content_type):
        raise ValueError(f"bad content type {content_type!r} for {path}")
    if isinstance(obj.get("body"), str):
        body = obj["body"].encode("utf-8")
    elif isinstance(obj.get("body_base64"), str):
        try:
            body = base64.b64decode(obj["body_base64"], validate=True)
        except binascii.Error as e:
            raise ValueError(f"bad base64 body for {path}: {e}") from None
    else:
        raise ValueError(f"content {path} has neither body nor body_base64")
    return Content(path, content_type, body)


def read_directory(root: Path) -> list[dict]:
    """
    The content objects for every file under C{root}, served at its path
    relative to C{root}. Hidden files and folders (editors' swap files,
    .git) are left out.

    @raise OSError: if C{root} cannot be read.
    """
    objects = []
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        try:
            body = file.read_bytes()
        except FileNotFoundError:
            continue  # removed while we scanned; the next scan withdraws it
        objects.append(content_object("/" + relative.as_posix(), body))
    return objects


def changes(published: list[dict], wanted: list[dict]) -> tuple[list[dict], list[dict]]:
    """
    What to add and what to remove so that the published content objects
    become C{wanted}. A changed file is a new object, so its old object is
    removed and the new one added.
    """
    have = {object_hash(obj) for obj in published}
    want = {object_hash(obj) for obj in wanted}
    return ([obj for obj in wanted if object_hash(obj) not in have],
            [obj for obj in published if object_hash(obj) not in want])


# The master -------------------------------------------------------------------

class Publisher:
    """
    Keeps the table's content equal to the files of a directory.
    """

    def __init__(self, table: DistributedTable, root: Path, out: TextIO) -> None:
        self._table = table
        self._root = root
        self._out = out

    def scan(self) -> Deferred:
        """
        Publish what changed since the last scan; the Deferred fires once it
        is published, so that a timer never starts a scan over an unfinished
        one.
        """
        return Deferred.fromCoroutine(self._scan())

    async def _scan(self) -> None:
        if not self._root.is_dir():
            # A directory being swapped for a new one must not empty the CDN.
            log.error("{root} is not a directory; keeping what is published",
                      root=str(self._root))
            return
        try:
            wanted = read_directory(self._root)
        except OSError as e:
            log.error("cannot read {root}: {reason}", root=str(self._root), reason=str(e))
            return
        published = [obj for obj in self._table.objects() if obj.get("type") == CONTENT]
        adds, removes = changes(published, wanted)
        for obj in removes:
            self._table.remove_object(obj)
        for obj in adds:
            self._table.add_object(obj)
        if adds or removes:
            await self._table.flush()
        self._report(adds, removes)

    def _report(self, adds: list[dict], removes: list[dict]) -> None:
        added_paths = {obj["path"] for obj in adds}
        for obj in adds:
            print(f"published {parse_content(obj).describe()}", file=self._out, flush=True)
        for obj in removes:
            if obj.get("path") not in added_paths:
                print(f"withdrew {obj.get('path')}", file=self._out, flush=True)


# Edges ------------------------------------------------------------------------

class ContentIndex(TableObserver):
    """
    The table's content by URL path, kept up to date from the table's events.
    An update arrives as the old object's removal and the new one's addition
    in the same batch, delivered in one turn of the reactor, so no request
    sees the path missing in between.
    """

    def __init__(self, out: TextIO) -> None:
        self._by_path: dict[str, Content] = {}
        self._out = out

    def get(self, path: str) -> Content | None:
        return self._by_path.get(path)

    def object_added(self, obj: dict) -> None:
        content = self._parse(obj)
        if content is not None:
            self._by_path[content.path] = content
            print(f"added {content.describe()}", file=self._out, flush=True)

    def object_removed(self, obj: dict) -> None:
        content = self._parse(obj)
        if content is not None and self._by_path.get(content.path) == content:
            del self._by_path[content.path]
            print(f"removed {content.describe()}", file=self._out, flush=True)

    @staticmethod
    def _parse(obj: dict) -> Content | None:
        try:
            return parse_content(obj)
        except ValueError as e:
            log.warn("ignoring a content object: {reason}", reason=str(e))
            return None


class LoadMeter:
    """
    An edge's load: requests per second, averaged exponentially over about
    L{LOAD_WINDOW} seconds like the Unix load average, so that a burst keeps
    counting for a while instead of vanishing at the next announcement.

    @param clock: the time source (an L{IReactorTime}).
    """

    def __init__(self, clock: IReactorTime, window: float = LOAD_WINDOW) -> None:
        self._clock = clock
        self._window = window
        self._requests = 0
        self._since = clock.seconds()
        self.load = 0.0

    def request(self) -> None:
        self._requests += 1

    def update(self) -> float:
        """
        Fold the requests since the last update into the load; return it.
        """
        now = self._clock.seconds()
        elapsed = now - self._since
        if elapsed > 0:
            decay = math.exp(-elapsed / self._window)
            self.load = self.load * decay + self._requests / elapsed * (1 - decay)
            self._requests, self._since = 0, now
        return self.load


def request_path(request: Request) -> str:
    """
    The content path a request asks for; a folder means its index.html.
    """
    path = unquote(request.path.decode("ascii", "replace"))
    return path + "index.html" if path.endswith("/") else path


class EdgeResource(Resource):
    """
    Serves the table's content: every path is looked up in the index.
    """

    isLeaf = True

    def __init__(self, index: ContentIndex, meter: LoadMeter) -> None:
        super().__init__()
        self._index = index
        self._meter = meter

    def render_GET(self, request: Request) -> bytes:
        self._meter.request()
        content = self._index.get(request_path(request))
        if content is None:
            request.setResponseCode(NOT_FOUND)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", content.content_type.encode("ascii"))
        return content.body


def announcer(table: DistributedTable, url: str, location: str,
              meter: LoadMeter) -> Callable[[], None]:
    """
    What an edge runs every announce interval. An edge that holds no state
    the master signed yet (it never reached a peer) has nothing to serve and
    stays quiet.
    """
    def announce() -> None:
        load = meter.update()
        if table.head.rev > 0:
            table.send_message({"type": ANNOUNCE, "url": url, "location": location,
                                "load": load})
    return announce


# The redirector -----------------------------------------------------------------

@attrs.frozen
class Edge:
    """
    An edge as its last announcement describes it.
    """

    url: str
    location: str
    load: float
    heard: float


def check_url(url: object) -> None:
    """
    @raise ValueError: unless C{url} is an http(s) URL that can go into a
        Location header as it is.
    """
    if (not isinstance(url, str) or not HEADER_VALUE.match(url) or " " in url
            or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
        raise ValueError(f"an edge URL must be http(s)://HOST:PORT, not {url!r}")


def parse_announcement(body: object, now: float) -> Edge | None:
    """
    The edge a message announces, or None for a message that is not an
    announcement.

    @raise ValueError: for an announcement that is malformed.
    """
    if not isinstance(body, dict) or body.get("type") != ANNOUNCE:
        return None
    url, location, load = body.get("url"), body.get("location"), body.get("load")
    check_url(url)
    if not isinstance(location, str):
        raise ValueError(f"bad location {location!r} from {url}")
    if (isinstance(load, bool) or not isinstance(load, (int, float))
            or not (0 <= load < math.inf)):
        raise ValueError(f"bad load {load!r} from {url}")
    return Edge(url.rstrip("/"), location, float(load), now)


def choose(edges: list[Edge], location: str | None) -> Edge | None:
    """
    The best edge: the least loaded of those at C{location}, or of all of
    them when none is there; ties go to the first URL, so that the choice is
    stable. None when there is no edge.
    """
    nearby = [edge for edge in edges if edge.location == location]
    return min(nearby or edges, key=lambda edge: (edge.load, edge.url), default=None)


class EdgeDirectory(TableObserver):
    """
    The edges heard from within C{forget_after} seconds, from their
    announcements.

    @param clock: the time source (an L{IReactorTime}).
    """

    def __init__(self, clock: IReactorTime, forget_after: float, out: TextIO) -> None:
        self._clock = clock
        self._forget_after = forget_after
        self._out = out
        self._edges: dict[str, Edge] = {}

    def message_received(self, msg: object) -> None:
        try:
            edge = parse_announcement(msg, self._clock.seconds())
        except ValueError as e:
            log.warn("ignoring an announcement: {reason}", reason=str(e))
            return
        if edge is None:
            return
        if edge.url not in self._edges:
            print(f"online {edge.url} {edge.location}", file=self._out, flush=True)
        self._edges[edge.url] = edge

    def online(self) -> list[Edge]:
        horizon = self._clock.seconds() - self._forget_after
        return [edge for edge in self._edges.values() if edge.heard >= horizon]

    def forget_silent(self) -> None:
        """
        Drop the edges that fell silent, and say so.
        """
        online = {edge.url for edge in self.online()}
        for url in [url for url in self._edges if url not in online]:
            del self._edges[url]
            print(f"offline {url}", file=self._out, flush=True)


class RedirectResource(Resource):
    """
    Answers every request with a 301 to the same path on the best edge online
    (see L{choose}; C{?location=LABEL} says where the client is), or 503
    when no edge is.
    """

    isLeaf = True

    def __init__(self, directory: EdgeDirectory) -> None:
        super().__init__()
        self._directory = directory

    def render_GET(self, request: Request) -> bytes:
        wanted = request.args.get(b"location", [b""])[0].decode("utf-8", "replace")
        edge = choose(self._directory.online(), wanted or None)
        # The best edge changes: a browser must ask again next time.
        request.setHeader(b"cache-control", b"no-store")
        if edge is None:
            request.setResponseCode(SERVICE_UNAVAILABLE)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"no edge is online\n"
        request.setResponseCode(MOVED_PERMANENTLY)
        request.setHeader(b"location", edge.url.encode("ascii") + request.uri)
        return b""


# Running a role -----------------------------------------------------------------

def start_logging() -> None:
    """
    Warnings and errors (from dtable and twisted.web) to stderr; what the
    program itself reports goes to stdout.
    """
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def make_table(reactor: Any, args: argparse.Namespace) -> DistributedTable:
    options: dict[str, Any] = {"memory": args.data_dir is None}
    if args.fast:
        from dtable.testing import FAST

        options = {**FAST, **options}
    if args.data_dir is not None:
        options["data_dir"] = args.data_dir
    return DistributedTable(port=args.port, key=args.key, peers=args.peer,
                            master=args.role == "master", reactor=reactor,
                            interface=args.interface, **options)


def listen_endpoint(reactor: Any, args: argparse.Namespace) -> Any:
    if ":" in args.interface:
        return TCP6ServerEndpoint(reactor, args.http, interface=args.interface)
    return TCP4ServerEndpoint(reactor, args.http, interface=args.interface)


def every(reactor: Any, seconds: float, call: Callable[[], Any]) -> TimerService:
    timer = TimerService(seconds, call)
    timer.clock = reactor
    return timer


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """
    Run one node in its role until it is interrupted (Ctrl-C, SIGTERM), then
    stop its timers, its HTTP port and the table.
    """
    out = sys.stdout
    start_logging()
    table = make_table(reactor, args)
    services = MultiService()
    table.setServiceParent(services)
    reactor.addSystemEventTrigger("before", "shutdown", services.stopService)
    site, timers = build_role(reactor, args, table, out)
    # Asked before starting: a node that cannot listen fails at once.
    started = table.when_started()
    services.startService()
    try:
        await started
        if site is not None:
            port = await listen_endpoint(reactor, args).listen(site)
            reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
    except (CannotListenError, OSError) as e:
        print(f"{args.role}: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    for timer in timers:
        timer.setServiceParent(services)
    print(f"{describe(args)}; dtable port {table.listening_port}, peers "
          f"{', '.join(args.peer) or 'none'}", file=out, flush=True)
    await Deferred()  # until interrupted


def build_role(reactor: Any, args: argparse.Namespace, table: DistributedTable,
               out: TextIO) -> tuple[Site | None, list[TimerService]]:
    """
    What the role adds to the table: an HTTP site to serve, and timers that
    start once the table has.
    """
    if args.role == "master":
        publisher = Publisher(table, args.content, out)
        return None, [every(reactor, args.scan_interval, publisher.scan)]
    if args.role == "edge":
        index = ContentIndex(out)
        table.subscribe(index)
        meter = LoadMeter(reactor)
        announce = announcer(table, args.url, args.location, meter)
        return (Site(EdgeResource(index, meter), reactor=reactor),
                [every(reactor, args.announce_interval, announce)])
    directory = EdgeDirectory(reactor, args.forget_after, out)
    table.subscribe(directory)
    return (Site(RedirectResource(directory), reactor=reactor),
            [every(reactor, args.forget_after / 4, directory.forget_silent)])


def describe(args: argparse.Namespace) -> str:
    if args.role == "master":
        return f"master: publishing {args.content} every {args.scan_interval:g} s"
    if args.role == "edge":
        return f"edge {args.location}: serving {args.url}"
    return f"redirector: {http_url(args.interface, args.http)}"


# The command line ---------------------------------------------------------------

def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def port_number(text: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    if not low <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be {low}-65535, not {value}")
    return value


def http_port(text: str) -> int:
    return port_number(text, low=1)


def peer_address(text: str) -> str:
    try:
        PeerAddress.parse(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def http_url(interface: str, port: int) -> str:
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    node = argparse.ArgumentParser(add_help=False)
    node.add_argument("--port", type=port_number, default=9999,
                      help="the dtable port (default 9999)")
    node.add_argument("--peer", action="append", default=[], type=peer_address,
                      metavar="HOST:PORT", help="a dtable node to dial (repeat for more)")
    node.add_argument("--key-file", type=Path, default=KEY_FILE, metavar="FILE",
                      help="the network key (default: the examples' published key)")
    node.add_argument("--interface", default="127.0.0.1", metavar="ADDRESS",
                      help="the address to listen on (default 127.0.0.1)")
    node.add_argument("--data-dir", metavar="DIR",
                      help="keep the table in DIR (default: in memory only)")
    node.add_argument("--fast", action="store_true",
                      help="dtable's short test intervals (dtable.testing.FAST)")

    parser = argparse.ArgumentParser(
        description="A small CDN on dtable: a master publishes a directory, edges "
                    "serve it over HTTP, a redirector sends clients to the best edge.")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    master = roles.add_parser("master", parents=[node], help="publish a directory",
                              description="Publish the files of DIR and republish "
                                          "every file that changes.")
    master.add_argument("--content", type=Path, required=True, metavar="DIR",
                        help="the directory to publish")
    master.add_argument("--scan-interval", type=positive, default=2.0, metavar="SECONDS",
                        help="how often to look for changed files (default 2)")
    edge = roles.add_parser("edge", parents=[node], help="serve the content over HTTP",
                            description="Serve the published files over HTTP and "
                                        "announce this edge to the network.")
    edge.add_argument("--location", required=True, metavar="LABEL",
                      help="where this edge is, e.g. eu-west")
    edge.add_argument("--http", type=http_port, default=8081, metavar="PORT",
                      help="the HTTP port (default 8081)")
    edge.add_argument("--url", help="where clients reach this edge "
                                    "(default http://INTERFACE:HTTP)")
    edge.add_argument("--announce-interval", type=positive, default=5.0,
                      metavar="SECONDS", help="how often to announce (default 5)")
    redirector = roles.add_parser("redirector", parents=[node],
                                  help="redirect clients to the best edge",
                                  description="Answer every request with a 301 to the "
                                              "least-loaded edge online, preferring "
                                              "edges at ?location=LABEL.")
    redirector.add_argument("--http", type=http_port, default=8080, metavar="PORT",
                            help="the HTTP port (default 8080)")
    redirector.add_argument("--forget-after", type=positive, default=15.0,
                            metavar="SECONDS",
                            help="forget an edge not heard from for this long "
                                 "(default 15: three announce intervals)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """
    The options, checked; exits 2 with a message naming the bad one.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.key = args.key_file.read_text(encoding="utf-8")
        parse_network_key(args.key)
    except OSError as e:
        parser.error(f"--key-file: cannot read {args.key_file}: {e.strerror}")
    except WeakKeyError as e:
        parser.error(f"--key-file {args.key_file}: {e}")
    if args.role == "master" and not args.content.is_dir():
        parser.error(f"--content: {args.content} is not a directory")
    if args.role == "edge":
        if args.url is None:
            if args.interface in ("0.0.0.0", "::"):
                parser.error("--url is required when listening on every address")
            args.url = http_url(args.interface, args.http)
        try:
            check_url(args.url)
        except ValueError as e:
            parser.error(f"--url: {e}")
    return args


def main(argv: list[str]) -> None:
    react(run, (parse_args(argv),))


if __name__ == "__main__":
    main(sys.argv[1:])
