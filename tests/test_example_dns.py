"""
examples/dns/ runs here: its record and verdict logic directly, and its two
programs as child processes. Zone replication must reach every node's DNS
server, which the test queries over UDP and TCP with twisted.names before and
after the master reloads its zone file; the world check must name the node
whose resolver answers differently, and agree once every node asks the same
server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import pytest_twisted
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import client, dns
from twisted.names.authority import BindAuthority
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import SynchronousTestCase

from tests.test_examples import free_port_base

DNS_EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "dns"
sys.path.append(str(DNS_EXAMPLES))

from dns_records import Record, RecordError, parse_zone, record_from_object  # noqa: E402
from worldcheck import Answer, Outcome, parse_answer, parse_server, verdict  # noqa: E402
from zone import ZoneAuthority, ZoneServerFactory, listen_dns  # noqa: E402

#: Seconds a child has to print an expected line (it takes about one).
LINE_TIMEOUT = 15.0
#: Seconds a child has to exit once told to stop (a clean stop takes
#: milliseconds).
STOP_TIMEOUT = 5.0
#: Seconds a program that ends by itself may run.
RUN_TIMEOUT = 20.0
#: Retries of one DNS query over loopback, in seconds.
QUERY_TIMEOUT = (1, 2, 4)

ZONE = """\
$TTL 300
@        MX    10 mail          ; the zone's mail exchanger
www  60  A     192.0.2.1
www      AAAA  2001:DB8::1
mail IN  A     192.0.2.25
alias    CNAME www
note     TXT   "v=spf1 -all"
"""

CHANGED_ZONE = ZONE.replace("www  60  A     192.0.2.1\n", "new  60  A     192.0.2.7\n")


def _reactor() -> Any:
    from twisted.internet import reactor
    return reactor


class ZoneFileTests(SynchronousTestCase):
    def test_records_are_normalised(self) -> None:
        """
        Relative names take the zone, C{@} is the zone, C{$TTL} applies to
        the lines without a TTL, and every record becomes the documented
        table object.
        """
        records = parse_zone(ZONE, "example.test")
        self.assertEqual(
            {record.text() for record in records},
            {"example.test 300 MX 10 mail.example.test",
             "www.example.test 60 A 192.0.2.1",
             "www.example.test 300 AAAA 2001:db8::1",
             "mail.example.test 300 A 192.0.2.25",
             "alias.example.test 300 CNAME www.example.test",
             'note.example.test 300 TXT "v=spf1 -all"'})
        www = Record("www.example.test", "A", 60, "192.0.2.1")
        self.assertEqual(www.to_object(),
                         {"type": "dns-record", "name": "www.example.test", "rtype": "A",
                          "ttl": 60, "data": "192.0.2.1"})
        self.assertEqual(record_from_object(www.to_object(), "example.test"), www)

    def test_bad_lines_are_named(self) -> None:
        """
        The first bad line is reported with its number and the reason.
        """
        for line, reason in [
            ("www A 192.0.2.300", "line 2: '192.0.2.300' is not an IPv4 address"),
            ("www SRV 0 0 80 www", "line 2: record type 'SRV' is not supported"),
            ("www.example.org. A 192.0.2.1", "line 2: www.example.org is outside the zone"),
            ("mx MX ten mail", "line 2: MX data must be 'PREFERENCE HOST'"),
            ('note TXT "unclosed', "line 2: no closing quotation"),
            ("bad_label!. A 192.0.2.1", "line 2: 'bad_label!.' is not a valid domain name"),
            ("www 99999999999 A 192.0.2.1", "line 2: TTL must be a whole number"),
            ("$INCLUDE other.zone", "line 2: unknown directive $INCLUDE"),
        ]:
            with self.assertRaises(RecordError) as raised:
                parse_zone(f"ok A 192.0.2.1\n{line}\n", "example.test", "z.zone")
            self.assertIn(f"z.zone {reason}", str(raised.exception))

    def test_records_that_cannot_stand_together(self) -> None:
        """
        A CNAME must be alone at its name, and one RRset has one TTL.
        """
        with self.assertRaises(RecordError) as raised:
            parse_zone("www CNAME mail\nwww A 192.0.2.1\n", "example.test")
        self.assertIn("www.example.test has a CNAME and other records", str(raised.exception))
        with self.assertRaises(RecordError) as raised:
            parse_zone("www 60 A 192.0.2.1\nwww 61 A 192.0.2.2\n", "example.test")
        self.assertIn("different TTLs (60, 61)", str(raised.exception))

    def test_table_objects_are_checked(self) -> None:
        """
        A node does not serve an object that is not a valid record of its
        zone.
        """
        good = {"type": "dns-record", "name": "www.example.test", "rtype": "A",
                "ttl": 60, "data": "192.0.2.1"}
        for change, reason in [({"name": 7}, "field 'name' must be a string"),
                               ({"ttl": -1}, "TTL must be"),
                               ({"ttl": True}, "TTL must be"),
                               ({"name": "www.example.org"}, "outside the zone")]:
            with self.assertRaises(RecordError) as raised:
                record_from_object({**good, **change}, "example.test")
            self.assertIn(reason, str(raised.exception))


def _answer(node: str, *records: str, error: str | None = None) -> Answer:
    return Answer(node=f"id-{node}", location=node,
                  outcome=Outcome(records=records, error=error))


class VerdictTests(SynchronousTestCase):
    def test_agreement(self) -> None:
        status, lines = verdict(_answer("here", "10 mx1"), [_answer("a", "10 mx1")], 1)
        self.assertEqual(status, 0)
        self.assertEqual(lines, ["a: 10 mx1", "here: 10 mx1",
                                 "verdict: AGREE: all 2 locations give the same answer"])

    def test_the_minority_is_named(self) -> None:
        status, lines = verdict(_answer("here", "10 mx1"),
                                [_answer("a", "10 mx1"), _answer("b", error="NXDOMAIN")],
                                None)
        self.assertEqual(status, 1)
        self.assertEqual(lines[-1], "verdict: DISAGREE: b differs from the majority (a, here)")
        self.assertIn("b: error: NXDOMAIN", lines)

    def test_the_same_failure_everywhere_is_no_agreement(self) -> None:
        """
        Every location timing out is a failure; every location saying the
        name does not exist is an answer they agree on.
        """
        status, lines = verdict(_answer("here", error="timeout"),
                                [_answer("a", error="timeout")], None)
        self.assertEqual((status, lines[-1]),
                         (1, "verdict: FAILED: the lookup failed everywhere "
                             "(error: timeout)"))
        status, lines = verdict(_answer("here", error="NXDOMAIN"),
                                [_answer("a", error="NXDOMAIN")], None)
        self.assertEqual(status, 0)

    def test_a_tie_has_no_majority(self) -> None:
        status, lines = verdict(_answer("here", "1"), [_answer("a", "2")], None)
        self.assertEqual(status, 1)
        self.assertIn("no majority", lines[-1])

    def test_missing_and_absent_answers_fail(self) -> None:
        status, lines = verdict(_answer("here", "1"), [_answer("a", "1")], 2)
        self.assertEqual((status, lines[-1]), (1, "verdict: INCOMPLETE: only 1 of 2 "
                                                  "expected nodes answered (those agree)"))
        status, lines = verdict(_answer("here", "1"), [], None)
        self.assertEqual((status, lines[-1]),
                         (1, "verdict: no other node answered; nothing to compare"))

    def test_only_answers_to_this_query_count(self) -> None:
        message = {"type": "dns-answer", "id": "q1", "node": "n", "location": "a",
                   "answers": ["2", "1"]}
        self.assertEqual(parse_answer(message, "q1"),
                         Answer("n", "a", Outcome(records=("1", "2"))))
        self.assertIsNone(parse_answer(message, "q2"))
        self.assertIsNone(parse_answer({**message, "answers": "1"}, "q1"))
        self.assertIsNone(parse_answer({**message, "type": "dns-query"}, "q1"))

    def test_resolver_addresses(self) -> None:
        self.assertEqual(parse_server("192.0.2.53"), ("192.0.2.53", 53))
        self.assertEqual(parse_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_server("[::1]:5353"), ("::1", 5353))
        for bad in ("ns.example.test", "127.0.0.1:0", "[::1]x"):
            self.assertRaises(ValueError, parse_server, bad)


class _FirstPick:
    """
    A reactor whose first UDP listen on port 0 gets C{port} instead, as if
    the system had picked it; everything else is the real reactor's.
    """

    def __init__(self, reactor: Any, port: int) -> None:
        self._reactor = reactor
        self._port = port

    def listenUDP(self, port: int, protocol: Any, **kwargs: Any) -> Any:
        if port == 0 and self._port:
            port, self._port = self._port, 0
        return self._reactor.listenUDP(port, protocol, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _tcp_listener() -> socket.socket:
    """
    A TCP socket listening on a port of 127.0.0.1 the system picks.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def _stop(ports: list[Any]) -> None:
    for port in ports:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_dns_port_0_picks_again_when_tcp_has_the_number() -> None:
    """
    With --dns-port 0 the UDP port's number may be taken for TCP: another is
    picked, and UDP and TCP end up on one number.
    """
    factory = ZoneServerFactory(ZoneAuthority("example.test", lambda: 0))
    with _tcp_listener() as taken:
        taken_port = taken.getsockname()[1]
        ports = listen_dns(_FirstPick(_reactor(), taken_port), factory, 0, "127.0.0.1")
        try:
            [udp, tcp] = ports
            assert udp.getHost().port == tcp.getHost().port != taken_port
        finally:
            await _stop(ports)


@pytest_twisted.ensureDeferred
async def test_dns_port_taken_for_tcp() -> None:
    """
    A port given on the command line that is taken for TCP is an error, and
    the UDP port on it is closed again.
    """
    factory = ZoneServerFactory(ZoneAuthority("example.test", lambda: 0))
    with _tcp_listener() as taken:
        taken_port = taken.getsockname()[1]
        try:
            listen_dns(_reactor(), factory, taken_port, "127.0.0.1")
        except CannotListenError as e:
            assert e.port == taken_port
        else:
            raise AssertionError("listened on a port taken for TCP")
        # The UDP port closes on the reactor's next turn.
        await deferLater(_reactor(), 0, lambda: None)
        ports = [_reactor().listenUDP(taken_port, dns.DNSDatagramProtocol(factory),
                                      interface="127.0.0.1")]
        await _stop(ports)


class Program(ProcessProtocol):
    """
    An example running as a child process: its output (stdout and stderr)
    as lines, waits for a line, and its exit.
    """

    def __init__(self, name: str, reactor: Any) -> None:
        self.name = name
        self.lines: list[str] = []
        self.status: int | None = None
        self._reactor = reactor
        self._partial = b""
        self._waiters: list[tuple[Callable[[str], bool], int, Deferred]] = []
        self._ended: list[Deferred] = []
        self._terminated = False

    def outReceived(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self.lines.append(raw.decode("utf-8", "replace"))
            for waiter in list(self._waiters):
                predicate, after, d = waiter
                if len(self.lines) > after and predicate(self.lines[-1]):
                    self._waiters.remove(waiter)
                    d.callback(self.lines[-1])

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if self._partial:
            self.outReceived(b"\n")
        code = reason.value.exitCode
        self.status = code if code is not None else -reason.value.signal
        for _, _, d in self._waiters:
            d.errback(AssertionError(f"{self.name} exited {self.status} before the line "
                                     f"came:\n{self.output}"))
        self._waiters.clear()
        for d in self._ended:
            d.callback(self.status)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def line(self, match: str | Callable[[str], bool], after: int = 0) -> Deferred:
        """
        A Deferred that fires with the first line from index C{after} on
        that contains C{match} (or for which it is true); it fails after
        LINE_TIMEOUT seconds or if the program ends first.
        """
        predicate = match if callable(match) else (lambda line: match in line)
        for line in self.lines[after:]:
            if predicate(line):
                return succeed(line)
        if self.status is not None:
            raise AssertionError(f"{self.name} exited {self.status}:\n{self.output}")
        d: Deferred = Deferred()
        self._waiters.append((predicate, after, d))
        return d.addTimeout(LINE_TIMEOUT, self._reactor)

    def ended(self, timeout: float) -> Deferred:
        """
        A Deferred that fires with the exit status; fails after C{timeout}.
        """
        d: Deferred = Deferred()
        if self.status is not None:
            d.callback(self.status)
            return d
        self._ended.append(d)
        return d.addTimeout(timeout, self._reactor)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def terminate(self) -> None:
        """
        Send SIGTERM once: a second one could reach the child after Twisted
        restored the default handler, and kill it mid-shutdown.
        """
        if not self._terminated:
            self._terminated = True
            self.signal("TERM")

    async def stop(self) -> int:
        """
        SIGTERM to its PID; SIGKILL if it has not exited STOP_TIMEOUT seconds
        later. Returns the exit status (negative: the signal that ended it).
        """
        self.terminate()
        try:
            return await self.ended(STOP_TIMEOUT)
        except TimeoutError:
            self.signal("KILL")
            self.lines.append(f"(killed: still running {STOP_TIMEOUT:g} s after SIGTERM)")
            return await self.ended(STOP_TIMEOUT)


class Programs:
    """
    The children a test started; stop_all() ends every one of them, and the
    report is their output.
    """

    def __init__(self, reactor: Any, cwd: Path) -> None:
        self._reactor = reactor
        self._cwd = cwd
        self.started: list[Program] = []

    def start(self, name: str, script: str, *args: str) -> Program:
        program = Program(name, self._reactor)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTABLE_")}
        self._reactor.spawnProcess(program, sys.executable,
                                   [sys.executable, str(DNS_EXAMPLES / script), *args],
                                   env=env, path=str(self._cwd))
        self.started.append(program)
        return program

    async def run(self, name: str, script: str, *args: str) -> Program:
        """
        Run a program that ends by itself, within RUN_TIMEOUT seconds.
        """
        program = self.start(name, script, *args)
        try:
            await program.ended(RUN_TIMEOUT)
        except TimeoutError:
            await program.stop()
        return program

    async def stop_all(self) -> list[int]:
        for program in self.started:
            program.terminate()
        return [await program.stop() for program in self.started]

    def tracebacks(self) -> list[str]:
        """
        The lines of every child that show an error it did not handle.
        """
        return [line for program in self.started for line in program.lines
                if "Traceback" in line or "Unhandled error" in line]

    def report(self) -> str:
        return "\n\n".join(f"--- {p.name} (exit {p.status})\n{p.output}"
                           for p in self.started)


# Zone replication ---------------------------------------------------------------


async def _dns_port(program: Program) -> int:
    line = await program.line("dns: serving example.test on 127.0.0.1 port")
    return int(re.search(r"port (\d+) ", line).group(1))


async def _ask(reactor: Any, port: int, name: str, rtype: int = dns.A) -> dns.Message:
    """
    The whole response of the server on C{port} to one query over UDP.
    """
    resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
    return await resolver.queryUDP([dns.Query(name, rtype, dns.IN)], timeout=QUERY_TIMEOUT)


class _TCPController:
    """
    The controller of one client L{dns.DNSProtocol}: it only tells when the
    connection is gone.
    """

    def __init__(self) -> None:
        self.lost: Deferred = Deferred()

    def connectionMade(self, protocol: dns.DNSProtocol) -> None:
        pass

    def connectionLost(self, protocol: dns.DNSProtocol) -> None:
        self.lost.callback(None)

    def messageReceived(self, message: dns.Message, protocol: dns.DNSProtocol,
                        address: Any = None) -> None:
        pass


async def _ask_tcp(reactor: Any, port: int, name: str) -> dns.Message:
    """
    The response of the server on C{port} to one A query over TCP; the
    connection is closed before this returns.
    """
    controller = _TCPController()
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                     dns.DNSProtocol(controller, reactor))
    try:
        return await protocol.query([dns.Query(name, dns.A, dns.IN)],
                                    timeout=QUERY_TIMEOUT[-1])
    finally:
        protocol.transport.loseConnection()
        await controller.lost


def _values(response: dns.Message) -> list[str]:
    values = []
    for record in response.answers:
        if record.type == dns.A:
            values.append(record.payload.dottedQuad())
        elif record.type == dns.AAAA:
            values.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
        elif record.type == dns.MX:
            values.append(f"{record.payload.preference} {record.payload.name}")
        else:
            values.append(f"{dns.QUERY_TYPES[record.type]} {record.payload.name}")
    return values


async def _check_answers(reactor: Any, port: int, present: str, address: str,
                         absent: str) -> None:
    """
    The server on C{port} answers for C{present} with C{address},
    authoritatively, and says C{absent} does not exist; names outside the
    zone are refused.
    """
    found = await _ask(reactor, port, present)
    assert (found.rCode, found.auth, _values(found)) == (dns.OK, 1, [address])
    missing = await _ask(reactor, port, absent)
    assert (missing.rCode, missing.auth, missing.answers) == (dns.ENAME, 1, [])
    assert [record.type for record in missing.authority] == [dns.SOA]
    outside = await _ask(reactor, port, "www.example.org")
    assert (outside.rCode, outside.answers) == (dns.EREFUSED, [])
    mail = await _ask(reactor, port, "example.test", dns.MX)
    assert _values(mail) == ["10 mail.example.test"]


@pytest_twisted.ensureDeferred
async def test_zone_changes_reach_every_node_s_dns_server(tmp_path: Path) -> None:
    """
    A master and two nodes, each an authoritative server for example.test:
    every one answers from the zone file the master read, and after the
    file changes and the master gets SIGHUP, every one answers from the new
    records. A bad zone file is rejected by line and changes nothing.
    """
    reactor = _reactor()
    zone_file = tmp_path / "example.test.zone"
    zone_file.write_text(ZONE)
    base = free_port_base(3)
    programs = Programs(reactor, tmp_path)
    try:
        master = programs.start("master", "zone.py", "master", "--zone-file", str(zone_file),
                                "--port", str(base), "--dns-port", "0", "--fast")
        nodes = [programs.start(f"node{i}", "zone.py", "node", "--port", str(base + i),
                                "--peer", f"127.0.0.1:{base}", "--dns-port", "0", "--fast")
                 for i in (1, 2)]
        servers = [master, *nodes]
        ports = [await _dns_port(program) for program in servers]
        for program in servers:
            await program.line("record added example.test 300 MX 10 mail.example.test")
            await program.line("record added www.example.test 60 A 192.0.2.1")
        for port in ports:
            await _check_answers(reactor, port, "www.example.test", "192.0.2.1",
                                 "new.example.test")
        alias = await _ask_tcp(reactor, ports[2], "alias.example.test")
        # The CNAME, then its target's addresses.
        cname, *addresses = _values(alias)
        assert (cname, sorted(addresses)) == ("CNAME www.example.test",
                                              ["192.0.2.1", "2001:db8::1"])
        if shutil.which("dig"):
            out, _, code = await getProcessOutputAndValue(
                "dig", ["@127.0.0.1", "-p", str(ports[1]), "+short", "+time=2", "+tries=2",
                        "www.example.test", "A"])
            assert (code, out.split()) == (0, [b"192.0.2.1"])

        marks = [len(program.lines) for program in servers]
        zone_file.write_text(CHANGED_ZONE)
        master.signal("HUP")
        for program, mark in zip(servers, marks):
            await program.line("record removed www.example.test 60 A 192.0.2.1", mark)
            await program.line("record added new.example.test 60 A 192.0.2.7", mark)
        for port in ports:
            await _check_answers(reactor, port, "new.example.test", "192.0.2.7",
                                 "gone.example.test")
            # www keeps its AAAA record: no A record, but the name exists.
            nodata = await _ask(reactor, port, "www.example.test")
            assert (nodata.rCode, nodata.auth, nodata.answers) == (dns.OK, 1, [])
            assert [record.type for record in nodata.authority] == [dns.SOA]

        zone_file.write_text(CHANGED_ZONE + "broken A 192.0.2\n")
        master.signal("HUP")
        await master.line("reload failed, keeping the previous records: "
                          f"{zone_file} line 8: '192.0.2' is not an IPv4 address")
        for port in ports:
            found = await _ask(reactor, port, "new.example.test")
            assert _values(found) == ["192.0.2.7"]
    finally:
        codes = await programs.stop_all()
    assert codes == [0, 0, 0], programs.report()
    assert not programs.tracebacks(), programs.report()
    assert sum("zone published" in line for line in master.lines) == 2, programs.report()


@pytest_twisted.ensureDeferred
async def test_bad_command_lines(tmp_path: Path) -> None:
    """
    Bad input is named and ends the program with status 2 before it starts
    a node.
    """
    reactor = _reactor()
    bad_zone = tmp_path / "bad.zone"
    bad_zone.write_text("www A 192.0.2.1\nwww CNAME mail\n")
    programs = Programs(reactor, tmp_path)
    cases = [
        (["zone.py", "master", "--zone-file", str(bad_zone)],
         "www.example.test has a CNAME and other records"),
        (["zone.py", "master", "--zone-file", str(tmp_path / "missing.zone")],
         "No such file or directory"),
        (["zone.py", "node", "--dns-port", "70000"], "--dns-port must be from 0 to 65535"),
        (["worldcheck.py", "ask", "--peer", "127.0.0.1:9", "example.test", "SRV"],
         "record type 'SRV' is not one of"),
        (["worldcheck.py", "ask", "example.test"], "ask needs --peer"),
        (["worldcheck.py", "node", "--resolver", "ns.example.test"], "--resolver:"),
        (["worldcheck.py", "node", "--key-file", str(bad_zone)], "--key-file"),
    ]
    try:
        running = [Deferred.fromCoroutine(programs.run(str(i), *args))
                   for i, (args, _) in enumerate(cases)]
        done = [await run for run in running]
    finally:
        await programs.stop_all()
    for program, (_, message) in zip(done, cases):
        assert program.status == 2, programs.report()
        assert message in program.output, programs.report()


# World-valid lookups ---------------------------------------------------------


def _mx_server(reactor: Any, directory: Path, exchange: str) -> Any:
    """
    A DNS server on a free UDP port of 127.0.0.1 that answers example.test
    MX with C{exchange}.
    """
    directory.mkdir()
    zone = directory / "example.test"
    zone.write_text("$ORIGIN example.test.\n$TTL 60\n"
                    "@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\n"
                    f"@ IN MX 10 {exchange}.\n")
    factory = DNSServerFactory(authorities=[BindAuthority(str(zone))])
    return reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory),
                             interface="127.0.0.1")


async def _linked(program: Program, count: int, after: int = 0) -> None:
    await program.line(f"linked to {count} node{'' if count == 1 else 's'}", after)


@pytest_twisted.ensureDeferred
async def test_world_check_names_the_node_that_differs(tmp_path: Path) -> None:
    """
    Nodes a and c ask one DNS server, b asks another that gives a different
    MX: the check names b and exits 1. With b asking the same server as the
    others, every location agrees and it exits 0.
    """
    # The nodes keep the production intervals: there is no master to wait
    # for, links come up as fast, and with the test intervals a node may
    # move its primary link to another node within seconds, which would make
    # the links the test waits for after the restart of b a matter of luck.
    reactor = _reactor()
    servers = [_mx_server(reactor, tmp_path / "main", "mx1.example.test"),
               _mx_server(reactor, tmp_path / "rogue", "mx2.example.test")]
    main, rogue = (f"127.0.0.1:{server.getHost().port}" for server in servers)
    base = free_port_base(3)
    programs = Programs(reactor, tmp_path)

    def node(name: str, offset: int, resolver: str) -> Program:
        peers = ["--peer", f"127.0.0.1:{base}"] if offset else []
        return programs.start(name, "worldcheck.py", "node", "--name", name, "--port",
                              str(base + offset), "--resolver", resolver, *peers)

    def ask() -> Deferred:
        return Deferred.fromCoroutine(programs.run(
            "ask", "worldcheck.py", "ask", "--name", "ask", "--port", "0", "--resolver",
            main, "--peer", f"127.0.0.1:{base}", "--expect", "3", "--timeout", "10",
            "example.test", "MX"))

    try:
        a, b, c = node("a", 0, main), node("b", 1, rogue), node("c", 2, main)
        await _linked(a, 2)
        await _linked(b, 1)
        await _linked(c, 1)
        split = await ask()
        assert split.status == 1, programs.report()
        assert "b: 10 mx2.example.test" in split.lines, programs.report()
        assert "a: 10 mx1.example.test" in split.lines, programs.report()
        assert split.lines[-1] == ("verdict: DISAGREE: b differs from the majority "
                                   "(a, ask, c)"), programs.report()
        assert "answered example.test MX" in b.output

        mark = len(a.lines)
        assert await b.stop() == 0, programs.report()
        b = node("b", 1, main)
        await _linked(b, 1)
        await _linked(a, 2, mark)
        agreed = await ask()
        assert agreed.status == 0, programs.report()
        assert "b: 10 mx1.example.test" in agreed.lines, programs.report()
        assert agreed.lines[-1] == "verdict: AGREE: all 4 locations give the same answer"
    finally:
        codes = await programs.stop_all()
        for server in servers:
            await maybeDeferred(server.stopListening)
    node_codes = [code for program, code in zip(programs.started, codes)
                  if program.name != "ask"]
    assert node_codes == [0, 0, 0, 0], programs.report()
    assert not programs.tracebacks(), programs.report()
