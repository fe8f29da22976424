"""
examples/cdn/cdn.py: its parts as plain objects (files to content objects,
the content index, the load meter, the choice of an edge, the directory of
edges, the command line), then the program itself as child processes: a
master, two edges and a redirector on loopback, before and after the
master's content changes, and with an edge stopped.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.test_examples import EXAMPLES, Child, ExampleProcessTestCase, free_port_base

SCRIPT = EXAMPLES / "cdn" / "cdn.py"


def load_cdn() -> ModuleType:
    """
    The example as a module (it is a script in a folder, not a package).
    """
    spec = importlib.util.spec_from_file_location("cdn_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cdn = load_cdn()

INDEX_V1 = b"<h1>version 1</h1>\n"
INDEX_V2 = b"<h1>the second version</h1>\n"
LOGO = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"
OLD = b"old\n"

#: Seconds between an edge's announcements, and after which the redirector
#: forgets a silent edge (eight missed announcements: a loaded machine may
#: delay a few).
ANNOUNCE_INTERVAL = "0.25"
FORGET_AFTER = "2"
#: Seconds the nodes have to link up, replicate and announce; and an edge to
#: serve an update, or the redirector to forget a stopped edge.
DEADLINE = 10.0
#: Seconds an HTTP request may take.
HTTP_TIMEOUT = 5.0


def temporary_directory(case: SynchronousTestCase) -> Path:
    """
    A new empty folder, removed after the test.
    """
    path = tempfile.mkdtemp(prefix="dtable-cdn-")
    case.addCleanup(shutil.rmtree, path)
    return Path(path)


# The parts, without a reactor --------------------------------------------------

class ContentTests(SynchronousTestCase):
    def test_text_and_binary_round_trip(self) -> None:
        """
        UTF-8 files are stored as text, others as base64; both come back as
        the same bytes, with the content type of their name.
        """
        text = cdn.content_object("/index.html", INDEX_V1)
        binary = cdn.content_object("/img/logo.png", LOGO)
        self.assertEqual(text, {"type": "cdn-content", "path": "/index.html",
                                "content_type": "text/html",
                                "body": INDEX_V1.decode()})
        self.assertEqual(binary["body_base64"], base64.b64encode(LOGO).decode())
        self.assertEqual(cdn.parse_content(text),
                         cdn.Content("/index.html", "text/html", INDEX_V1))
        self.assertEqual(cdn.parse_content(binary),
                         cdn.Content("/img/logo.png", "image/png", LOGO))

    def test_other_objects_are_not_content(self) -> None:
        self.assertIsNone(cdn.parse_content({"name": "www"}))
        self.assertIsNone(cdn.parse_content({"type": "cdn-announce", "path": "/"}))

    def test_malformed_content(self) -> None:
        """
        What would break a response, or inject a header, is refused.
        """
        good = {"type": "cdn-content", "path": "/a", "content_type": "text/plain",
                "body": "a"}
        for change in [{"path": "a"}, {"path": 1},
                       {"content_type": "text/plain\r\nSet-Cookie: x=1"},
                       {"content_type": ""}, {"body": None},
                       {"body": None, "body_base64": "not base64!"}]:
            with self.subTest(change=change):
                with self.assertRaises(ValueError):
                    cdn.parse_content({**good, **change})


class PublishingTests(SynchronousTestCase):
    def test_read_directory(self) -> None:
        """
        Every file under the folder, by its path; hidden files and folders
        are left out.
        """
        root = temporary_directory(self)
        (root / "img").mkdir()
        (root / ".git").mkdir()
        (root / "index.html").write_bytes(INDEX_V1)
        (root / "img" / "logo.png").write_bytes(LOGO)
        (root / ".index.html.swp").write_bytes(b"swap")
        (root / ".git" / "HEAD").write_bytes(b"ref")
        objects = cdn.read_directory(root)
        self.assertEqual([obj["path"] for obj in objects], ["/img/logo.png", "/index.html"])

    def test_changes(self) -> None:
        """
        A changed file replaces its object; a file gone is withdrawn; an
        unchanged one is left alone.
        """
        logo = cdn.content_object("/logo.png", LOGO)
        old_index = cdn.content_object("/index.html", INDEX_V1)
        new_index = cdn.content_object("/index.html", INDEX_V2)
        old = cdn.content_object("/old.txt", OLD)
        adds, removes = cdn.changes([logo, old_index, old], [new_index, logo])
        self.assertEqual(adds, [new_index])
        self.assertEqual(removes, [old_index, old])
        self.assertEqual(cdn.changes([logo], [logo]), ([], []))


class ContentIndexTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.index = cdn.ContentIndex(self.out)
        self.v1 = cdn.content_object("/index.html", INDEX_V1)
        self.v2 = cdn.content_object("/index.html", INDEX_V2)

    def test_update(self) -> None:
        """
        An update (the old object removed, the new one added) serves the new
        body, and says so.
        """
        self.index.object_added(self.v1)
        self.index.object_removed(self.v1)
        self.index.object_added(self.v2)
        self.assertEqual(self.index.get("/index.html").body, INDEX_V2)
        self.assertEqual(self.out.getvalue().splitlines(), [
            f"added /index.html (text/html, {len(INDEX_V1)} bytes)",
            f"removed /index.html (text/html, {len(INDEX_V1)} bytes)",
            f"added /index.html (text/html, {len(INDEX_V2)} bytes)",
        ])

    def test_removing_a_replaced_object(self) -> None:
        """
        The old object's removal, seen after the new one's addition, keeps
        the new body; removing the current one leaves nothing.
        """
        self.index.object_added(self.v1)
        self.index.object_added(self.v2)
        self.index.object_removed(self.v1)
        self.assertEqual(self.index.get("/index.html").body, INDEX_V2)
        self.index.object_removed(self.v2)
        self.assertIsNone(self.index.get("/index.html"))

    def test_malformed_content_is_logged_and_ignored(self) -> None:
        with capturedLogs() as events:
            self.index.object_added({"type": "cdn-content", "path": "/x",
                                     "content_type": "text/html"})
        self.assertIsNone(self.index.get("/x"))
        self.assertEqual([e["reason"] for e in events],
                         ["content /x has neither body nor body_base64"])


class LoadMeterTests(SynchronousTestCase):
    def test_load_follows_requests_and_decays(self) -> None:
        """
        No requests, no load; a burst raises it; quiet intervals lower it
        without forgetting it at once.
        """
        clock = Clock()
        meter = cdn.LoadMeter(clock, window=60.0)
        clock.advance(5)
        self.assertEqual(meter.update(), 0.0)
        for _ in range(50):
            meter.request()
        clock.advance(5)
        busy = meter.update()
        clock.advance(5)
        quieter = meter.update()
        self.assertGreater(busy, 0.0)
        self.assertGreater(quieter, 0.0)
        self.assertLess(quieter, busy)

    def test_update_without_time_passing(self) -> None:
        clock = Clock()
        meter = cdn.LoadMeter(clock)
        meter.request()
        self.assertEqual(meter.update(), 0.0)


def edge(url: str, location: str, load: float, heard: float = 0.0) -> cdn.Edge:
    return cdn.Edge(url, location, load, heard)


class ChooseTests(SynchronousTestCase):
    def test_least_loaded(self) -> None:
        edges = [edge("http://a", "eu", 3.0), edge("http://b", "us", 1.0)]
        self.assertEqual(cdn.choose(edges, None).url, "http://b")

    def test_location_first(self) -> None:
        """
        An edge at the client's location wins over a less loaded one
        elsewhere; with none there, the least loaded anywhere.
        """
        edges = [edge("http://a", "eu", 3.0), edge("http://b", "us", 1.0),
                 edge("http://c", "eu", 2.0)]
        self.assertEqual(cdn.choose(edges, "eu").url, "http://c")
        self.assertEqual(cdn.choose(edges, "asia").url, "http://b")

    def test_ties_and_none(self) -> None:
        edges = [edge("http://b", "eu", 0.0), edge("http://a", "eu", 0.0)]
        self.assertEqual(cdn.choose(edges, None).url, "http://a")
        self.assertIsNone(cdn.choose([], "eu"))


class EdgeDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out = io.StringIO()
        self.directory = cdn.EdgeDirectory(self.clock, forget_after=3.0, out=self.out)

    def announce(self, url: str, load: float = 0.5) -> None:
        self.directory.message_received(
            {"type": "cdn-announce", "url": url, "location": "eu", "load": load})

    def test_forgets_silent_edges(self) -> None:
        """
        An edge is online from its first announcement until it has been
        silent for forget_after seconds.
        """
        self.announce("http://127.0.0.1:8081/")
        self.announce("http://127.0.0.1:8082")
        self.clock.advance(2)
        self.announce("http://127.0.0.1:8082", load=0.7)
        self.assertEqual(
            sorted((e.url, e.load) for e in self.directory.online()),
            [("http://127.0.0.1:8081", 0.5), ("http://127.0.0.1:8082", 0.7)])
        self.clock.advance(1.5)
        self.assertEqual([e.url for e in self.directory.online()],
                         ["http://127.0.0.1:8082"])
        self.directory.forget_silent()
        self.assertEqual(self.out.getvalue().splitlines(), [
            "online http://127.0.0.1:8081 eu", "online http://127.0.0.1:8082 eu",
            "offline http://127.0.0.1:8081"])

    def test_other_and_malformed_messages(self) -> None:
        """
        Other messages are none of its business; malformed announcements are
        logged and ignored.
        """
        bad = [{"url": "ftp://x"}, {"url": "http://a\r\nX: y"}, {"url": 5},
               {"location": None}, {"load": -1}, {"load": True}, {"load": "1"}]
        with capturedLogs() as events:
            self.directory.message_received({"load": 0.3})
            self.directory.message_received("hello")
            for change in bad:
                self.directory.message_received(
                    {"type": "cdn-announce", "url": "http://a", "location": "eu",
                     "load": 0, **change})
        self.assertEqual(self.directory.online(), [])
        self.assertEqual(len(events), len(bad))


class CommandLineTests(SynchronousTestCase):
    def parse_error(self, *argv: str) -> str:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as caught:
            cdn.parse_args(list(argv))
        self.assertEqual(caught.exception.code, 2)
        return stderr.getvalue()

    def test_bad_options(self) -> None:
        """
        Each bad option is named, with exit code 2.
        """
        folder = temporary_directory(self)
        missing = str(folder / "missing")
        weak = folder / "weak.key"
        weak.write_text("password")
        for argv, expected in [
            ([], "ROLE"),
            (["edge"], "--location"),
            (["edge", "--location", "eu", "--http", "0"], "--http"),
            (["edge", "--location", "eu", "--port", "70000"], "--port"),
            (["edge", "--location", "eu", "--peer", "nowhere"], "--peer"),
            (["edge", "--location", "eu", "--url", "ftp://x"], "--url"),
            (["edge", "--location", "eu", "--interface", "0.0.0.0"], "--url"),
            (["edge", "--location", "eu", "--announce-interval", "0"], "--announce-interval"),
            (["edge", "--location", "eu", "--key-file", missing], "--key-file"),
            (["edge", "--location", "eu", "--key-file", str(weak)], "--key-file"),
            (["master", "--content", missing], "--content"),
            (["redirector", "--forget-after", "soon"], "--forget-after"),
        ]:
            with self.subTest(argv=argv):
                self.assertIn(expected, self.parse_error(*argv))

    def test_defaults(self) -> None:
        args = cdn.parse_args(["edge", "--location", "eu", "--http", "8090"])
        self.assertEqual((args.url, args.port, args.interface, args.peer),
                         ("http://127.0.0.1:8090", 9999, "127.0.0.1", []))
        self.assertEqual(args.key, (EXAMPLES / "example.key").read_text())


# The program, as child processes --------------------------------------------------

def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """
    GET C{url} without following redirects: the status, the headers (by
    lower-case name) and the body.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                            timeout=HTTP_TIMEOUT)
    try:
        target = parts.path or "/"
        connection.request("GET", f"{target}?{parts.query}" if parts.query else target)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


class CDN:
    """
    The addresses of one test network, and its nodes once started.
    """

    def __init__(self) -> None:
        base = free_port_base(7)
        self.master_port, self.redirector_port = base, base + 1
        self.edge_ports = {"eu": base + 2, "us": base + 3}
        self.redirector_url = f"http://127.0.0.1:{base + 4}"
        self.edge_urls = {"eu": f"http://127.0.0.1:{base + 5}",
                          "us": f"http://127.0.0.1:{base + 6}"}
        self.children: dict[str, Child] = {}

    def online_line(self, location: str) -> str:
        return f"online {self.edge_urls[location]} {location}"


class CDNProcessTests(ExampleProcessTestCase):
    def start_cdn(self, site: Path) -> CDN:
        """
        Start a master publishing C{site}, edges "eu" and "us" and a
        redirector, each dialling the master, with short intervals.
        """
        net = CDN()
        env = self.environment()
        master = f"127.0.0.1:{net.master_port}"
        net.children["master"] = self.start(
            "cdn/cdn.py", "master", "--fast", "--content", str(site),
            "--scan-interval", "0.2", "--port", str(net.master_port), env=env)
        for location, url in net.edge_urls.items():
            net.children[location] = self.start(
                "cdn/cdn.py", "edge", "--fast", "--location", location,
                "--http", str(urlsplit(url).port), "--port", str(net.edge_ports[location]),
                "--peer", master, "--announce-interval", ANNOUNCE_INTERVAL, env=env)
        net.children["redirector"] = self.start(
            "cdn/cdn.py", "redirector", "--fast",
            "--http", str(urlsplit(net.redirector_url).port),
            "--port", str(net.redirector_port), "--peer", master,
            "--forget-after", FORGET_AFTER, env=env)
        return net

    def wait_for_lines(self, net: CDN, expected: dict[str, list[str]]) -> None:
        """
        Read the nodes' output until each named node printed its lines;
        fail, showing every node's output, if that takes longer than
        DEADLINE.
        """
        def done() -> bool:
            return all(line in net.children[name].lines
                       for name, lines in expected.items() for line in lines)

        children = [child for child in net.children.values()
                    if not child.process.stdout.closed]
        if not self.read_until(children, done, time.monotonic() + DEADLINE):
            self.fail(f"no {expected} after {DEADLINE:g} s:\n" + report(net))

    def redirect(self, net: CDN, path: str) -> str:
        """
        Where the redirector sends a request for C{path}.
        """
        status, headers, _ = get(net.redirector_url + path)
        self.assertEqual((status, headers.get("cache-control")), (301, "no-store"),
                         report(net))
        return headers["location"]

    def stop_cdn(self, net: CDN) -> None:
        """
        Stop every node that still runs; each must exit 0.
        """
        running = [child for child in net.children.values() if not child.terminated]
        self.assertEqual(self.stop_all(running), [0] * len(running), report(net))
        self.assertNotIn("Traceback", report(net))

    def test_content_update(self) -> None:
        """
        Every edge serves the master's files (text and binary, 404 for the
        rest); the redirector sends clients to the edge at their location;
        once the master's files change, every edge serves the new ones.
        """
        site = Path(self.cwd) / "site"
        site.mkdir()
        (site / "index.html").write_bytes(INDEX_V1)
        (site / "logo.png").write_bytes(LOGO)
        (site / "old.txt").write_bytes(OLD)
        net = self.start_cdn(site)
        content = [f"added /index.html (text/html, {len(INDEX_V1)} bytes)",
                   f"added /logo.png (image/png, {len(LOGO)} bytes)",
                   f"added /old.txt (text/plain, {len(OLD)} bytes)"]
        self.wait_for_lines(net, {"eu": content, "us": content, "redirector": [
            net.online_line("eu"), net.online_line("us")]})

        for url in net.edge_urls.values():
            for path, expected in [("/index.html", (200, "text/html", INDEX_V1)),
                                   ("/", (200, "text/html", INDEX_V1)),
                                   ("/logo.png", (200, "image/png", LOGO)),
                                   ("/missing.html", (404, "text/plain; charset=utf-8",
                                                      b"not found\n"))]:
                status, headers, body = get(url + path)
                self.assertEqual((status, headers["content-type"], body), expected,
                                 f"{url}{path}")
        self.assertEqual(self.redirect(net, "/index.html?location=us"),
                         net.edge_urls["us"] + "/index.html?location=us")
        self.assertEqual(self.redirect(net, "/logo.png?location=eu"),
                         net.edge_urls["eu"] + "/logo.png?location=eu")
        anywhere = self.redirect(net, "/logo.png")
        self.assertIn(anywhere, [url + "/logo.png" for url in net.edge_urls.values()])
        self.assertEqual(get(anywhere)[2], LOGO)

        # As an operator would: the new page replaces the old one at once.
        (site / "index.html.new").write_bytes(INDEX_V2)
        os.replace(site / "index.html.new", site / "index.html")
        (site / "old.txt").unlink()
        update = [f"added /index.html (text/html, {len(INDEX_V2)} bytes)",
                  f"removed /old.txt (text/plain, {len(OLD)} bytes)"]
        self.wait_for_lines(net, {"eu": update, "us": update})

        for url in net.edge_urls.values():
            self.assertEqual(get(url + "/index.html")[::2], (200, INDEX_V2))
            self.assertEqual(get(url + "/old.txt")[0], 404)
            self.assertEqual(get(url + "/logo.png")[::2], (200, LOGO))
        status, _, body = get(self.redirect(net, "/index.html?location=eu"))
        self.assertEqual((status, body), (200, INDEX_V2))
        self.assertIn(f"published /index.html (text/html, {len(INDEX_V2)} bytes)",
                      net.children["master"].lines)
        self.assertIn("withdrew /old.txt", net.children["master"].lines)
        self.stop_cdn(net)

    def test_stopped_edge_gets_no_more_clients(self) -> None:
        """
        Once an edge stops, the redirector forgets it and sends even the
        clients at its location to the other edge; with no edge left it
        answers 503.
        """
        site = Path(self.cwd) / "site"
        site.mkdir()
        (site / "index.html").write_bytes(INDEX_V1)
        net = self.start_cdn(site)
        self.wait_for_lines(net, {"redirector": [net.online_line("eu"),
                                                 net.online_line("us")]})
        self.assertEqual(self.redirect(net, "/?location=eu"),
                         net.edge_urls["eu"] + "/?location=eu")

        self.assertEqual(self.stop(net.children["eu"]), 0, report(net))
        self.wait_for_lines(net, {"redirector": [f"offline {net.edge_urls['eu']}"]})
        for path in ["/?location=eu", "/", "/index.html?location=us"]:
            self.assertEqual(self.redirect(net, path), net.edge_urls["us"] + path)
        status, _, body = get(self.redirect(net, "/?location=eu"))
        self.assertEqual((status, body), (200, INDEX_V1))

        self.assertEqual(self.stop(net.children["us"]), 0, report(net))
        self.wait_for_lines(net, {"redirector": [f"offline {net.edge_urls['us']}"]})
        status, _, body = get(net.redirector_url + "/index.html")
        self.assertEqual((status, body), (503, b"no edge is online\n"))
        self.stop_cdn(net)

    def test_busy_http_port(self) -> None:
        """
        An edge that cannot listen for HTTP says why and exits 1.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            child = self.start("cdn/cdn.py", "edge", "--fast", "--location", "eu",
                               "--port", "0", "--http", str(port), env=self.environment())
            code = self.wait_then_stop(child)
        self.assertEqual(code, 1, child.output)
        self.assertIn(f"edge: cannot start: Couldn't listen on 127.0.0.1:{port}",
                      child.output)


def report(net: CDN) -> str:
    return "\n\n".join(f"--- {name} (exit {child.process.returncode})\n{child.output}"
                       for name, child in net.children.items())
