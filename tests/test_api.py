"""
The control API over real HTTP on loopback: every endpoint, its errors and
the token, on a master and a replica linked over real TLS.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from dtable import api
from dtable.service import DistributedTable
from dtable.testing import LocalNetwork, wait_for

TOKEN = "test-token-" + "x" * 32
#: Seconds any one HTTP exchange or awaited event may take.
TIMEOUT = 30.0


def _reactor():
    from twisted.internet import reactor
    return reactor


@implementer(IBodyProducer)
class Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self.data)
        d: Deferred = Deferred()
        d.callback(None)
        return d

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Client:
    """
    Talks to one node's API; every call returns (status, headers, body).
    """

    def __init__(self, node: DistributedTable, token: str | None = TOKEN) -> None:
        self.base = f"http://127.0.0.1:{node.api_port}"
        self.token = token
        self.pool = HTTPConnectionPool(_reactor(), persistent=False)
        self.agent = Agent(_reactor(), pool=self.pool)

    def headers(self, extra: dict[str, str] | None = None) -> Headers:
        headers = Headers()
        if self.token is not None:
            headers.addRawHeader("Authorization", f"Bearer {self.token}")
        for name, value in (extra or {}).items():
            headers.addRawHeader(name, value)
        return headers

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Headers, Any]:
        if body is not None:
            raw = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        d = self.agent.request(method.encode(), (self.base + path).encode(),
                               self.headers(headers), Body(raw) if raw is not None else None)
        d.addTimeout(TIMEOUT, _reactor())
        response = await d
        data = await readBody(response)
        kind = response.headers.getRawHeaders("content-type", [""])[0]
        value: Any = json.loads(data) if kind.startswith("application/json") else data
        return response.code, response.headers, value

    async def stream(self, path: str) -> "EventReader":
        d = self.agent.request(b"GET", (self.base + path).encode(), self.headers())
        d.addTimeout(TIMEOUT, _reactor())
        response = await d
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith(
            "text/event-stream")
        reader = EventReader()
        response.deliverBody(reader)
        return reader


class EventReader(Protocol):
    """
    Parses a Server-Sent Events body; wait() fires when an event matches.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.buffer = b""
        self.waiters: list[tuple[Callable, Deferred]] = []
        self.finished: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            name, payload = None, None
            for line in block.decode().split("\n"):
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    payload = json.loads(line[len("data: "):])
            if name is not None:
                self.events.append((name, payload))
                for waiter in list(self.waiters):
                    if waiter[0](name, payload):
                        self.waiters.remove(waiter)
                        waiter[1].callback((name, payload))

    def connectionLost(self, reason) -> None:
        self.finished.callback(None)

    def wait(self, predicate: Callable[[str, Any], bool]) -> Deferred:
        for name, payload in self.events:
            if predicate(name, payload):
                d: Deferred = Deferred()
                d.callback((name, payload))
                return d
        d = Deferred()
        self.waiters.append((predicate, d))
        return d.addTimeout(TIMEOUT, _reactor())

    def close(self) -> Deferred:
        self.transport.stopProducing()
        return self.finished


@pytest.fixture
def network():
    net = LocalNetwork(_reactor(), size=2, api="tcp:0:interface=127.0.0.1",
                       api_token=TOKEN)
    pytest_twisted.blockon(Deferred.fromCoroutine(net.start()))
    yield net
    pytest_twisted.blockon(Deferred.fromCoroutine(net.stop()))


# The token and the page ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_is_required(network):
    master = network.master
    for token, message in [(None, "needs a token"), ("wrong", "the token is wrong")]:
        code, headers, body = await Client(master, token).call("GET", "/status")
        assert code == 401
        assert message in body["error"]
        assert headers.getRawHeaders("www-authenticate") == ['Bearer realm="dtable"']
    code, _, body = await Client(master, None).call(
        "GET", "/objects", headers={"Authorization": "Basic abc"})
    assert code == 401 and "Bearer TOKEN" in body["error"]


@pytest_twisted.ensureDeferred
async def test_access_log_only_where_asked(tmp_path):
    """
    With api_access_log, every request is a line of that file; the node's
    own log gets none, with it or without.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    path = tmp_path / "access.log"
    logged: list[str] = []

    def observe(event: dict) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for options in ({"api_access_log": str(path)}, {}):
            net = LocalNetwork(_reactor(), size=1, api="tcp:0:interface=127.0.0.1",
                               api_token=TOKEN, **options)
            await net.start()
            try:
                [node] = net.nodes
                assert (await Client(node).call("GET", "/status"))[0] == 200
                assert (await Client(node).call("GET", "/objects/" + "0" * 64))[0] == 404
                assert (await Client(node).call("POST", "/messages", {"n": 1}))[0] == 200
            finally:
                await net.stop()
    finally:
        globalLogPublisher.removeObserver(observe)
    lines = path.read_text().splitlines()
    assert [line.split('"')[3] for line in lines] == [
        "GET /status HTTP/1.1", "GET /objects/" + "0" * 64 + " HTTP/1.1",
        "POST /messages HTTP/1.1"]
    assert [line.split('"')[4].split()[0] for line in lines] == ["200", "404", "200"]
    assert [line for line in logged if "HTTP/1.1" in line] == []


@pytest_twisted.ensureDeferred
async def test_status_page_needs_no_token(network):
    code, headers, body = await Client(network.master, None).call("GET", "/")
    assert code == 200
    assert headers.getRawHeaders("content-type")[0].startswith("text/html")
    assert b"<html" in body


# Objects ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_get_remove_on_the_master(network):
    master, replica = network.nodes
    client = Client(master)
    code, _, body = await client.call("POST", "/objects?wait=1", {"name": "a", "n": 1})
    assert code == 201
    h = body["hash"]
    assert body["rev"] == master.head.rev
    await wait_for(replica, lambda n: h in n)
    for node in (master, replica):
        code, _, body = await Client(node).call("GET", f"/objects/{h}")
        assert (code, body) == (200, {"hash": h, "object": {"name": "a", "n": 1}})
    code, _, body = await client.call("DELETE", f"/objects/{h}?wait=1")
    assert code == 200 and body["hash"] == h
    await wait_for(replica, lambda n: h not in n)
    code, _, body = await client.call("GET", f"/objects/{h}")
    assert code == 404 and h in body["error"]
    code, _, body = await client.call("DELETE", f"/objects/{h}")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_remove_many(network):
    master, replica = network.nodes
    client = Client(master)
    code, _, body = await client.call("POST", "/objects?wait=1", [{"n": i} for i in range(20)])
    hashes = body["hashes"]
    code, _, body = await client.call("DELETE", "/objects?wait=1", hashes[:15] + ["0" * 64])
    assert code == 200 and body["removed"] == 15 and body["rev"] == master.head.rev
    await wait_for(replica, lambda n: n.head == master.head)
    assert sorted(replica.table.hashes()) == sorted(hashes[15:])
    code, _, body = await client.call("DELETE", "/objects", {"not": "a list"})
    assert code == 400 and "list of object hashes" in body["error"]
    code, _, body = await Client(replica).call("DELETE", "/objects", hashes[15:])
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_list_in_pages(network):
    master, replica = network.nodes
    objects = [{"n": i} for i in range(250)]
    code, _, body = await Client(master).call("POST", "/objects?wait=1", objects)
    assert code == 201 and len(body["hashes"]) == 250
    await wait_for(replica, lambda n: len(n) == 250)
    client = Client(replica)
    seen, after, pages = [], "", 0
    while True:
        code, _, page = await client.call("GET", f"/objects?limit=100&after={after}")
        assert code == 200 and page["count"] == 250 and page["rev"] == master.head.rev
        pages += 1
        seen.extend(page["objects"])
        if page["next"] is None:
            break
        after = page["next"]
    assert pages == 3
    assert [item["hash"] for item in seen] == sorted(body["hashes"])
    assert sorted(item["object"]["n"] for item in seen) == list(range(250))


@pytest_twisted.ensureDeferred
async def test_a_replica_refuses_changes(network):
    master, replica = network.nodes
    h = master.add_object({"kept": True})
    await network.converged()
    client = Client(replica)
    code, _, body = await client.call("POST", "/objects", {"new": 1})
    assert code == 403 and "only the master" in body["error"]
    code, _, body = await client.call("DELETE", f"/objects/{h}")
    assert code == 403 and "only the master" in body["error"]
    assert replica.objects() == master.objects() == [{"kept": True}]


@pytest.mark.parametrize("method, path, kwargs, code, words", [
    ("POST", "/objects", {"raw": b"{not json"}, 400, "not JSON"),
    ("POST", "/objects", {"raw": b""}, 400, "empty"),
    ("POST", "/objects", {"raw": b"\xff\xfe"}, 400, "not UTF-8"),
    ("POST", "/objects", {"raw": b'{"x": NaN}'}, 400, "not JSON"),
    ("POST", "/objects", {"body": 5}, 400, "not a table object"),
    ("POST", "/objects", {"body": [{"ok": 1}, "no"]}, 400, "not a table object"),
    ("POST", "/objects", {"raw": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
     "application/json"),
    ("GET", "/objects/xyz", {}, 400, "not an object hash"),
    ("GET", "/objects?limit=0", {}, 400, "between 1 and"),
    ("GET", "/objects?limit=ten", {}, 400, "whole number"),
    ("GET", "/objects?after=XYZ", {}, 400, "lowercase hex"),
    ("PUT", "/objects", {}, 405, "use GET or POST"),
    ("GET", "/messages", {}, 405, "use POST"),
    ("GET", "/nowhere", {}, 404, "no such path"),
])
@pytest_twisted.ensureDeferred
async def test_bad_requests(network, method, path, kwargs, code, words):
    master = network.master
    before = (master.head, len(master))
    got, headers, body = await Client(master).call(method, path, **kwargs)
    assert got == code
    assert words in body["error"]
    if code == 405:
        assert headers.getRawHeaders("allow")
    await master.flush()
    assert (master.head, len(master)) == before


@pytest_twisted.ensureDeferred
async def test_body_too_large():
    node = DistributedTable(port=0, key=LocalNetwork(_reactor(), size=0).key, master=True,
                            memory=True, interface="127.0.0.1", reactor=_reactor(),
                            max_frame=32 * 1024, api="tcp:0:interface=127.0.0.1",
                            api_token=TOKEN, master_sync_timeout=0)
    node.startService()
    try:
        await node.when_started()
        code, _, body = await Client(node).call("POST", "/objects",
                                                {"pad": "x" * 20_000})
        assert code == 413 and "larger than 16384" in body["error"]
        assert len(node) == 0
        code, _, _ = await Client(node).call("POST", "/objects", {"pad": "x" * 1000})
        assert code == 201
    finally:
        await node.stopService()


# Messages and events ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_messages_and_the_event_stream(network):
    master, replica = network.nodes
    first = master.add_object({"before": "the stream"})
    await network.converged()
    reader = await Client(replica).stream("/events?snapshot=1")
    try:
        added = await reader.wait(lambda name, data: name == "object_added")
        assert added[1] == {"hash": first, "object": {"before": "the stream"}}
        ready = await reader.wait(lambda name, data: name == "ready")
        assert ready[1] == {"rev": master.head.rev, "objects": 1}

        code, _, body = await Client(master).call("POST", "/objects", {"live": 1})
        live = body["hash"]
        await reader.wait(lambda name, data: name == "object_added" and data["hash"] == live)
        await Client(master).call("DELETE", f"/objects/{first}")
        removed = await reader.wait(lambda name, data: name == "object_removed")
        assert removed[1] == {"hash": first, "object": {"before": "the stream"}}

        got: list = []
        master.on("message_received", got.append)
        code, _, body = await Client(replica).call("POST", "/messages", {"hello": ["ü", 1]})
        assert code == 200 and body["id"]
        await wait_for(master, lambda n: got == [{"hello": ["ü", 1]}])
        code, _, body = await Client(master).call("POST", "/messages", "to everyone")
        message = await reader.wait(lambda name, data: name == "message_received")
        assert message[1] == {"body": "to everyone"}
        names = [name for name, _ in reader.events]
        assert names.index("ready") == 1
    finally:
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_a_list_of_messages(network):
    """
    POST /messages?list=1 sends each item as its own message, all of them or,
    if one is not a message, none; without it, a list is one message.
    """
    master, replica = network.nodes
    await wait_for(replica, lambda n: bool(n.links))
    got: list = []
    master.on("message_received", got.append)
    code, _, body = await Client(replica).call("POST", "/messages?list=1",
                                               [{"n": 1}, [2], "three"])
    assert code == 200 and len(set(body["ids"])) == 3
    await wait_for(master, lambda n: len(got) == 3)
    assert got == [{"n": 1}, [2], "three"]
    code, _, body = await Client(replica).call("POST", "/messages", [4, 5])
    await wait_for(master, lambda n: len(got) == 4)
    assert got[3] == [4, 5]
    code, _, body = await Client(replica).call("POST", "/messages?list=1", {"n": 1})
    assert code == 400 and "JSON list" in body["error"]
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    code, _, body = await Client(replica).call("POST", "/messages?list=1", [6, deep])
    assert code == 400 and "message 1 is nested deeper" in body["error"]
    replica.send_message("marker")
    await wait_for(master, lambda n: got[-1] == "marker")
    assert 6 not in got


@pytest_twisted.ensureDeferred
async def test_stream_without_snapshot_starts_with_what_happens_next(network):
    master, replica = network.nodes
    master.add_object({"old": 1})
    await network.converged()
    reader = await Client(replica).stream("/events")
    try:
        h = master.add_object({"new": 1})
        await reader.wait(lambda name, data: name == "object_added")
        assert reader.events == [("object_added", {"hash": h, "object": {"new": 1}})]
    finally:
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_stopping_the_node_ends_open_streams(network):
    replica = network.nodes[1]
    reader = await Client(replica).stream("/events")
    await replica.stopService()
    await reader.finished


@pytest_twisted.ensureDeferred
async def test_client_that_does_not_read_is_disconnected(network, monkeypatch, logs):
    monkeypatch.setattr(api, "MAX_STREAM_QUEUE", 100_000)
    master, replica = network.nodes
    await wait_for(replica, lambda n: len(n.links) == 1)
    reader = await Client(replica).stream("/events")
    reader.transport.pauseProducing()
    for i in range(400):
        master.send_message({"i": i, "pad": "x" * 50_000})
    await logs.wait(lambda e: "does not read" in e.get("log_format", ""))
    # A paused client notices only once it reads again.
    reader.transport.resumeProducing()
    await reader.finished.addTimeout(TIMEOUT, _reactor())
    assert len(reader.events) < 400


# Status and metrics ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status(network):
    master, replica = network.nodes
    master.add_object({"a": 1})
    await network.converged()
    code, _, status = await Client(replica).call("GET", "/status")
    assert code == 200
    assert status["node_id"] == replica.node_id and status["master"] is False
    assert status["head"]["rev"] == master.head.rev and status["objects"] == 1
    assert [link["node_id"] for link in status["links"]] == [master.node_id]
    assert set(status["links"][0]["rtt_ms"]) == {"count", "mean", "min", "max", "last"}
    assert set(status["firewall"]) >= {"total", "blocked", "warned", "blocked_subnets",
                                       "refused"}
    assert status["uptime"] > 0
    assert {n["node_id"] for n in status["overlay"]["nodes"]} >= {replica.node_id}
    # The network's nodes keep their tables in memory: nothing waits for a disk.
    assert status["store_pending"] == 0


@pytest_twisted.ensureDeferred
async def test_metrics(network):
    master, replica = network.nodes
    master.add_object({"a": 1})
    await network.converged()
    code, headers, text = await Client(replica).call("GET", "/metrics")
    assert code == 200
    assert headers.getRawHeaders("content-type")[0].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode())
               for s in family.samples}
    assert samples[("dtable_objects", ())] == 1
    assert samples[("dtable_revision", ())] == master.head.rev
    assert samples[("dtable_links", ())] == 1
    assert samples[("dtable_master", ())] == 0
    assert samples[("dtable_store_pending_commits", ())] == 0
    assert samples[("dtable_bytes_received_total", ())] > 0
    assert samples[("dtable_frames_sent_total", ())] > 0
    applied = samples[("dtable_batches_applied_total", ())]
    caught_up = sum(samples[("dtable_catch_ups_total", (("kind", kind),))]
                    for kind in ("log", "merkle"))
    assert applied + caught_up >= 1
    assert ("dtable_firewall_blocks_total", ()) in samples
    assert ("dtable_messages_relayed_total", ()) in samples
    # Stalls by threshold: a longer one is also over every shorter threshold.
    stalls = {dict(labels)["over_seconds"]: value for (name, labels), value in samples.items()
              if name == "dtable_reactor_stalls_total"}
    assert list(stalls) == ["0.05", "0.1", "0.25", "1"]
    assert sorted(stalls.values(), reverse=True) == list(stalls.values())
