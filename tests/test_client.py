"""
The API's synchronous client (L{dtable.client}) and the command line built
on it (C{python -m dtable add|remove|list|get|send|watch|status|metrics}),
against real nodes serving the API over HTTP on loopback.

The client blocks, so the nodes run in this process's reactor and every
client call runs in a thread (L{deferToThread}); the command line runs
there too, as L{dtable.__main__.main} with streams of its own (never
sys.stdout, which threads share). One test runs it as a child process, to
interrupt it with SIGINT.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from typing import Any, Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from dtable.__main__ import main
from dtable.client import (ApiClient, NodeUnreachable, RequestFailed, Unauthorized,
                           _lines, api_url, read_events)
from dtable.service import DistributedTable
from dtable.testing import LocalNetwork, wait_for

TOKEN = "client-test-token-" + "x" * 32
#: Seconds any one command, client call or awaited line may take.
TIMEOUT = 30.0
#: The environment the command line reads its defaults from.
CLIENT_ENVIRONMENT = ("DTABLE_API", "DTABLE_TOKEN", "DTABLE_TOKEN_FILE")


def _reactor():
    from twisted.internet import reactor
    return reactor


def api_of(node: DistributedTable) -> str:
    return f"http://127.0.0.1:{node.api_port}"


def closed_port() -> int:
    """
    A loopback port nothing listens on: bound, then closed. Another process
    could take it before the test connects; on a test machine that is rare.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@attrs.frozen
class Run:
    """
    One run of the command line: its exit code, stdout and stderr.
    """

    code: int
    out: str
    err: str

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


def run_main(argv: list[str], stdin: str = "") -> Run:
    """
    Run the command line (blocking) with streams of its own.
    """
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return Run(code, out.getvalue(), err.getvalue())


class LineWaiter(io.TextIOBase):
    """
    A stdout for a command running in a thread (C{write}) or a child
    process (C{feed}): C{wait} waits in the reactor's thread for a line.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.lines: list[str] = []
        self._partial = ""
        self._waiters: list[tuple[Callable[[str], bool], Deferred]] = []

    def write(self, text: str) -> int:
        self.reactor.callFromThread(self.feed, text)
        return len(text)

    def feed(self, text: str) -> None:
        """
        Take output in the reactor's thread.
        """
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self.lines.append(line)
            for waiter in list(self._waiters):
                if waiter[0](line):
                    self._waiters.remove(waiter)
                    waiter[1].callback(line)

    def wait(self, predicate: Callable[[str], bool]) -> Deferred:
        for line in self.lines:
            if predicate(line):
                d: Deferred = Deferred()
                d.callback(line)
                return d
        d = Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(TIMEOUT, self.reactor)


def is_event(name: str) -> Callable[[str], bool]:
    return lambda line: json.loads(line)["event"] == name


@pytest.fixture(autouse=True)
def client_environment(monkeypatch):
    """
    No DTABLE_* variable of the developer's shell reaches the command line.
    """
    for name in CLIENT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def token_file(tmp_path) -> str:
    path = tmp_path / "api.token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def network():
    net = LocalNetwork(_reactor(), size=2, api="tcp:0:interface=127.0.0.1",
                       api_token=TOKEN)
    pytest_twisted.blockon(Deferred.fromCoroutine(net.start()))
    yield net
    pytest_twisted.blockon(Deferred.fromCoroutine(net.stop()))


@pytest.fixture
def cli(token_file):
    """
    C{await cli(node, COMMAND, ARGS...)}: run the command line against
    C{node}'s API with the right token, in a thread; returns a L{Run}.
    """
    def run(node: DistributedTable, command: str, *args: str, stdin: str = "") -> Deferred:
        argv = [command, *args, "--api", api_of(node), "--token-file", token_file]
        return deferToThread(run_main, argv, stdin).addTimeout(TIMEOUT, _reactor())

    return run


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    return deferToThread(function, *args, **kwargs).addTimeout(TIMEOUT, _reactor())


# The pure parts ---------------------------------------------------------------------------


class ReadEventsTests(SynchronousTestCase):
    def test_events_and_comments(self) -> None:
        """
        Comments are skipped; each event ends at a blank line; a line's first
        space after the colon is not part of the value.
        """
        stream = [": dtable events\n", "\n", "event: object_added\n",
                  'data: {"hash": "ab"}\n', "\n", ": keep-alive\n", "\n",
                  "event: ready\n", "data:{}\n", "\n"]
        self.assertEqual(list(read_events(stream)),
                         [("object_added", '{"hash": "ab"}'), ("ready", "{}")])

    def test_multi_line_data(self) -> None:
        stream = ["event: message_received\r\n", "data: {\"body\":\r\n", "data:  [1,\n",
                  "data: 2]}\n", "\r\n"]
        [(name, data)] = read_events(stream)
        self.assertEqual(name, "message_received")
        self.assertEqual(data, '{"body":\n [1,\n2]}')
        self.assertEqual(json.loads(data), {"body": [1, 2]})

    def test_defaults_and_leftovers(self) -> None:
        """
        An unnamed event is a message; id and retry are ignored; an event
        without data is not one; an unfinished event at the end is dropped.
        """
        stream = ["id: 7\n", "retry: 100\n", "data: plain\n", "\n",
                  "event: empty\n", "\n", "event: cut\n", "data: off"]
        self.assertEqual(list(read_events(stream)), [("message", "plain")])


class LinesTests(SynchronousTestCase):
    """
    The client reads an event stream whatever its reads give, and splits
    it into lines itself.
    """

    class Reads:
        """
        A response whose read1() gives the pieces it was made with.
        """

        def __init__(self, *pieces: bytes) -> None:
            self._pieces = list(pieces)

        def read1(self, size: int) -> bytes:
            return self._pieces.pop(0) if self._pieces else b""

    def test_lines_across_reads(self) -> None:
        long = "\u00e9" * 50_000
        pieces = [b"event: a\r\ndata: ", b"{}\n\nevent: b\nda", b"ta: x\n",
                  b"\n:", b" keep-alive\n\ndata: "]
        # A long data line comes over many reads, and a two-byte character
        # is cut between two of them.
        encoded = long.encode("utf-8")
        pieces += [encoded[i:i + 4097] for i in range(0, len(encoded), 4097)]
        pieces += [b"\n\nevent: cut\ndata: off"]
        lines = list(_lines(self.Reads(*pieces)))
        self.assertEqual(lines, ["event: a\r", "data: {}", "", "event: b", "data: x", "",
                                 ": keep-alive", "", "data: " + long, "", "event: cut",
                                 "data: off"])
        self.assertEqual(list(read_events(lines)),
                         [("a", "{}"), ("b", "x"), ("message", long)])

    def test_empty(self) -> None:
        self.assertEqual(list(_lines(self.Reads())), [])


class ApiUrlTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(api_url("8080"), "http://127.0.0.1:8080")
        self.assertEqual(api_url("node.example:8080"), "http://node.example:8080")
        self.assertEqual(api_url("http://[::1]:8080/"), "http://[::1]:8080")
        self.assertEqual(api_url("https://node.example/dtable"),
                         "https://node.example/dtable")
        for bad in ["ftp://node.example", "http://"]:
            self.assertRaises(ValueError, api_url, bad)


class UsageTests(SynchronousTestCase):
    """
    Usage errors of the client's commands: exit code 2 and a message on
    stderr, before any request (the node given does not exist).
    """

    def setUp(self) -> None:
        saved = {name: os.environ.pop(name) for name in CLIENT_ENVIRONMENT
                 if name in os.environ}
        self.addCleanup(os.environ.update, saved)
        self.api = f"http://127.0.0.1:{closed_port()}"

    def assert_usage_error(self, argv: list[str], *fragments: str, stdin: str = "") -> None:
        run = run_main(argv, stdin)
        self.assertEqual((run.code, run.out), (2, ""), run.err)
        for fragment in fragments:
            self.assertIn(fragment, run.err)

    def test_no_command_lists_every_command(self) -> None:
        self.assert_usage_error([], "choose a command", "add", "remove", "list", "get",
                                "send", "watch", "status", "metrics")

    def test_missing_token(self) -> None:
        self.assert_usage_error(["status", "--api", self.api], "status: error: no token",
                                "--token-file", "DTABLE_TOKEN")
        missing = os.path.join(os.path.dirname(__file__), "no-such.token")
        self.assert_usage_error(["list", "--api", self.api, "--token-file", missing],
                                "cannot read the token file", missing)

    def test_bad_options(self) -> None:
        os.environ["DTABLE_TOKEN"] = TOKEN
        self.assert_usage_error(["list", "--api", self.api, "--limit", "0"], "--limit",
                                "1 or more")
        self.assert_usage_error(["watch", "--api", self.api, "--count", "x"], "--count")
        self.assert_usage_error(["status", "--api", "ftp://node"], "--api", "ftp://node")
        self.assert_usage_error(["remove", "--api", self.api], "HASH")

    def test_bad_json(self) -> None:
        os.environ["DTABLE_TOKEN"] = TOKEN
        self.assert_usage_error(["add", '{"name": ', "--api", self.api],
                                "add: error: the argument is not JSON")
        self.assert_usage_error(["add", '{"n": NaN}', "--api", self.api], "NaN is not JSON")
        self.assert_usage_error(["add", "--api", self.api], "standard input is empty")
        self.assert_usage_error(["add", "-", "--api", self.api], "standard input is not JSON",
                                stdin="[1,")
        self.assert_usage_error(["send", "hello", "--api", self.api],
                                "send: error: the argument is not JSON", "'\"hello\"'")


# Objects ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_changes_and_reads_the_table(network):
    """
    ApiClient: add one object and a list (waiting for the revision), get,
    read pages, remove; an unknown hash is a RequestFailed with status 404.
    """
    master, replica = network.nodes
    client = ApiClient(api_of(master), TOKEN)
    answer = await in_thread(client.add, {"name": "a"}, wait=True)
    assert answer["rev"] == master.head.rev
    first = answer["hash"]
    answer = await in_thread(client.add, [{"name": "b"}, {"name": "c"}])
    assert len(answer["hashes"]) == 2 and "rev" not in answer
    await network.converged()

    reader = ApiClient(api_of(replica), TOKEN)
    assert await in_thread(reader.get, first) == {"name": "a"}
    page = await in_thread(reader.list, limit=2)
    hashes = sorted([first, *answer["hashes"]])
    assert [item["hash"] for item in page["objects"]] == hashes[:2]
    assert (page["next"], page["count"], page["rev"]) == (hashes[1], 3, master.head.rev)
    page = await in_thread(reader.list, after=page["next"], limit=2)
    assert [item["hash"] for item in page["objects"]] == hashes[2:]
    assert page["next"] is None
    items = await in_thread(lambda: list(reader.iter_objects(page_size=1)))
    assert [item["hash"] for item in items] == hashes

    answer = await in_thread(client.remove, first, wait=True)
    assert answer == {"hash": first, "rev": master.head.rev}
    await network.converged()
    with pytest.raises(RequestFailed) as caught:
        await in_thread(reader.get, first)
    assert caught.value.status == 404
    assert caught.value.error == f"no object {first} in the table"
    assert str(caught.value) == (f"the node answered HTTP 404 (Not Found): "
                                 f"no object {first} in the table")


@pytest_twisted.ensureDeferred
async def test_add_get_remove(network, cli):
    """
    add from an argument and from stdin (a list, with -), with --wait; get
    on the replica; remove --wait.
    """
    master, replica = network.nodes
    run = await cli(master, "add", '{"name": "www", "ip": "192.0.2.1"}', "--wait")
    assert (run.code, run.err) == (0, "")
    [answer] = run.json_lines()
    assert answer["rev"] == master.head.rev
    www = answer["hash"]
    run = await cli(master, "add", stdin='{"name": "mail"}')
    assert run.code == 0
    mail = run.json_lines()[0]["hash"]
    run = await cli(master, "add", "-", "--wait", stdin='[{"n": 1}, {"n": 2}]')
    assert run.code == 0
    [answer] = run.json_lines()
    assert len(answer["hashes"]) == 2 and answer["rev"] == master.head.rev
    assert len(master) == 4
    await network.converged()

    run = await cli(replica, "get", www)
    assert (run.code, run.json_lines()) == (0, [{"name": "www", "ip": "192.0.2.1"}])
    run = await cli(master, "remove", mail, "--wait")
    assert (run.code, run.json_lines()) == (0, [{"hash": mail, "rev": master.head.rev}])
    await network.converged()
    assert mail not in replica and www in replica


@pytest_twisted.ensureDeferred
async def test_list_pages_through_the_table(network, cli):
    master, replica = network.nodes
    hashes = {master.add_object({"n": i}) for i in range(250)}
    await network.converged()
    run = await cli(replica, "list", "--limit", "100")
    assert (run.code, run.err) == (0, "")
    items = run.json_lines()
    assert [item["hash"] for item in items] == sorted(hashes)
    assert sorted(item["object"]["n"] for item in items) == list(range(250))
    run = await cli(replica, "list")
    assert run.json_lines() == items


@pytest_twisted.ensureDeferred
async def test_empty_table(network, cli):
    run = await cli(network.nodes[1], "list")
    assert (run.code, run.out, run.err) == (0, "", "")


# Messages and events ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_and_watch(network, cli, token_file):
    """
    watch --snapshot --count 5 on the replica prints the table, ready, then
    a message sent from the master's command line and an object it adds,
    and exits 0 by itself.
    """
    master, replica = network.nodes
    old = {master.add_object({"old": i}) for i in range(2)}
    await network.converged()
    before = master.head.rev
    out, err = LineWaiter(_reactor()), io.StringIO()
    argv = ["watch", "--snapshot", "--count", "5", "--api", api_of(replica),
            "--token-file", token_file]
    watching = in_thread(main, argv, stdout=out, stderr=err)
    await out.wait(is_event("ready"))

    run = await cli(master, "send", '{"hello": ["ü", 1]}')
    assert run.code == 0 and run.json_lines()[0]["id"]
    run = await cli(master, "add", '{"new": 1}')
    new = run.json_lines()[0]["hash"]
    assert await watching == 0, err.getvalue()
    events = [json.loads(line) for line in out.lines]
    assert [(e["event"], e["data"]["hash"]) for e in events[:2]] == [
        ("object_added", h) for h in sorted(old)]
    assert {e["data"]["object"]["old"] for e in events[:2]} == {0, 1}
    assert events[2] == {"event": "ready", "data": {"rev": before, "objects": 2}}
    live = sorted(events[3:], key=lambda e: e["event"])
    assert live == [{"event": "message_received", "data": {"body": {"hello": ["ü", 1]}}},
                    {"event": "object_added", "data": {"hash": new, "object": {"new": 1}}}]
    assert err.getvalue() == ""


@pytest_twisted.ensureDeferred
async def test_client_events(network):
    """
    ApiClient.events opens the stream at the call, so an event that happens
    right after it returns is delivered.
    """
    master, replica = network.nodes
    await wait_for(replica, lambda node: len(node.links) == 1)
    client = ApiClient(api_of(replica), TOKEN)
    events = await in_thread(client.events)
    # The node answers only once the stream is subscribed to its events.
    got: Deferred = in_thread(next, events)
    master.send_message("one")
    name, data = await got
    assert (name, data) == ("message_received", {"body": "one"})
    sent = await in_thread(ApiClient(api_of(master), TOKEN).send_many, ["two", [3]])
    assert len(sent["ids"]) == 2
    assert await in_thread(next, events) == ("message_received", {"body": "two"})
    assert await in_thread(next, events) == ("message_received", {"body": [3]})
    await in_thread(events.close)


@pytest_twisted.ensureDeferred
async def test_watch_ends_with_the_node(network, token_file):
    replica = network.nodes[1]
    url = api_of(replica)
    out, err = LineWaiter(_reactor()), io.StringIO()
    watching = in_thread(main, ["watch", "--snapshot", "--api", url,
                                "--token-file", token_file], stdout=out, stderr=err)
    await out.wait(is_event("ready"))
    await replica.stopService()
    assert await watching == 1
    # A stopping node finishes its event streams and lets their end reach
    # the client before it closes the connection.
    assert err.getvalue().splitlines() == [
        "python -m dtable watch: the node ended the event stream"]


class Child(ProcessProtocol):
    """
    A child process whose stdout lines C{wait} can wait for.
    """

    def __init__(self) -> None:
        self.out = LineWaiter(_reactor())
        self.err = bytearray()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.feed(data.decode())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_ctrl_c_ends_watch_quietly(network, token_file):
    """
    SIGINT (Ctrl-C) ends python -m dtable watch with exit code 0 and
    nothing on stderr.
    """
    master = network.master
    master.add_object({"a": 1})
    await network.converged()
    child = Child()
    process = _reactor().spawnProcess(
        child, sys.executable,
        [sys.executable, "-m", "dtable", "watch", "--snapshot", "--api", api_of(master),
         "--token-file", token_file],
        env={k: v for k, v in os.environ.items() if k not in CLIENT_ENVIRONMENT})
    try:
        await child.out.wait(is_event("ready"))
        process.signalProcess("INT")
        assert await child.ended.addTimeout(TIMEOUT, _reactor()) == 0
        assert child.err == b""
        assert [json.loads(line)["event"] for line in child.out.lines] == [
            "object_added", "ready"]
    finally:
        if not child.ended.called:
            os.kill(process.pid, signal.SIGKILL)
            await child.ended


# The node ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_and_metrics(network, cli):
    master, replica = network.nodes
    master.add_object({"a": 1})
    await network.converged()
    run = await cli(replica, "status")
    assert (run.code, run.err) == (0, "")
    assert run.out.startswith("{\n  ")
    status = json.loads(run.out)
    assert status["node_id"] == replica.node_id and status["objects"] == 1
    assert status["head"]["rev"] == master.head.rev
    run = await cli(replica, "metrics")
    assert run.code == 0
    assert "\ndtable_objects 1.0\n" in run.out
    assert f"\ndtable_revision {float(master.head.rev)}\n" in run.out


@pytest_twisted.ensureDeferred
async def test_defaults_from_the_environment(network, monkeypatch, token_file):
    """
    --api defaults to $DTABLE_API; the token comes from $DTABLE_TOKEN_FILE,
    else $DTABLE_TOKEN; --token-file wins over both.
    """
    replica = network.nodes[1]
    monkeypatch.setenv("DTABLE_API", str(replica.api_port))
    monkeypatch.setenv("DTABLE_TOKEN", TOKEN)
    run = await in_thread(run_main, ["status"])
    assert (run.code, json.loads(run.out)["node_id"]) == (0, replica.node_id)
    monkeypatch.setenv("DTABLE_TOKEN", "wrong")
    monkeypatch.setenv("DTABLE_TOKEN_FILE", token_file)
    run = await in_thread(run_main, ["status"])
    assert run.code == 0
    run = await in_thread(run_main, ["status", "--token-file", os.devnull])
    assert (run.code, run.err) == (2, f"python -m dtable status: error: the token file "
                                      f"{os.devnull} is empty\n")


# Failures ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_node(token_file):
    port = closed_port()
    client = ApiClient(f"http://127.0.0.1:{port}", TOKEN)
    for call in (client.status, client.events):
        with pytest.raises(NodeUnreachable) as caught:
            await in_thread(call)
        assert str(caught.value) == (f"cannot reach the node at http://127.0.0.1:{port}: "
                                     "Connection refused")
    for argv in (["get", "0" * 64], ["watch"], ["add", "{}"]):
        run = await in_thread(run_main, [*argv, "--api", str(port), "--token-file",
                                         token_file])
        assert (run.code, run.out) == (1, "")
        assert run.err == (f"python -m dtable {argv[0]}: cannot reach the node at "
                           f"http://127.0.0.1:{port}: Connection refused\n")


@pytest_twisted.ensureDeferred
async def test_wrong_token(network, tmp_path):
    master = network.master
    client = ApiClient(api_of(master), "wrong")
    for call in (client.status, client.events, lambda: client.add({"a": 1})):
        with pytest.raises(Unauthorized) as caught:
            await in_thread(call)
        assert caught.value.status == 401
        assert str(caught.value) == "the node refused the token (HTTP 401): the token is wrong"
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    for argv in (["status"], ["watch"], ["add", "{}"]):
        run = await in_thread(run_main, [*argv, "--api", api_of(master), "--token-file",
                                         str(wrong)])
        assert (run.code, run.out) == (1, "")
        assert run.err == (f"python -m dtable {argv[0]}: the node refused the token "
                           "(HTTP 401): the token is wrong\n")
    assert len(master) == 0


@pytest_twisted.ensureDeferred
async def test_a_replica_refuses_changes(network, cli):
    master, replica = network.nodes
    kept = master.add_object({"kept": 1})
    await network.converged()
    run = await cli(replica, "add", '{"new": 1}')
    assert (run.code, run.out) == (1, "")
    assert run.err == ("python -m dtable add: the node answered HTTP 403 (Forbidden): "
                       "only the master can add objects; this node is not the master\n")
    run = await cli(replica, "remove", kept, "--wait")
    assert run.code == 1
    assert "HTTP 403 (Forbidden): only the master can remove objects" in run.err
    assert replica.objects() == master.objects() == [{"kept": 1}]


@pytest_twisted.ensureDeferred
async def test_unknown_and_bad_hashes(network, cli):
    master = network.master
    unknown = "0" * 64
    for command in ("get", "remove"):
        run = await cli(master, command, unknown)
        assert (run.code, run.out) == (1, "")
        assert run.err == (f"python -m dtable {command}: the node answered HTTP 404 "
                           f"(Not Found): no object {unknown} in the table\n")
    run = await cli(master, "get", "../status")
    assert run.code == 1
    assert "HTTP 400 (Bad Request): '../status' is not an object hash" in run.err


@pytest_twisted.ensureDeferred
async def test_not_a_table_object(network, cli):
    """
    JSON that is no table object reaches the node, which refuses it (exit
    1); JSON that does not parse never leaves the command line (exit 2).
    """
    master = network.master
    before = master.head
    run = await cli(master, "add", "[1, 2]")
    assert run.code == 1
    assert "HTTP 400 (Bad Request): not a table object" in run.err
    run = await cli(master, "add", "{'single': 'quotes'}")
    assert (run.code, run.out) == (2, "")
    assert "add: error: the argument is not JSON" in run.err
    await master.flush()
    assert (len(master), master.head) == (0, before)
