"""
DNS zone replication: every node is an authoritative DNS server for one zone
whose records come from the replicated table; the master takes them from a
zone file and publishes every change.

    python examples/dns/zone.py master --zone-file example.test.zone \\
        --port 9999 --dns-port 5053
    python examples/dns/zone.py node --port 10000 --dns-port 5054 \\
        --peer 127.0.0.1:9999

Edit the zone file and send the master SIGHUP (the command is printed at
start): it publishes exactly the difference, and every node answers from the
new records a moment later. A zone file with a bad line is rejected whole, and
the previous records stay. Each node answers over UDP and TCP: with the
records of the table for names in the zone (authoritative, with an SOA whose
serial is the table's revision), NXDOMAIN for other names in the zone, and
REFUSED for names outside it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import react
from twisted.names import dns, error
from twisted.names.authority import FileAuthority
from twisted.names.server import DNSServerFactory

from dns_node import Node, add_node_arguments, check_node_arguments, complain, \
    make_table, say
from dns_records import RECORD_TYPE, Record, RecordError, normalise_name, parse_zone, \
    record_from_object
from dtable.interfaces import TableObserver
from dtable.service import DistributedTable

#: The SOA's timers (refresh, retry, expire) and its negative-caching TTL.
SOA_TIMERS = dict(refresh=3600, retry=600, expire=604800, minimum=60)


class ZoneAuthority(FileAuthority):
    """
    The authority for one zone, answering from records that are added and
    removed as the table changes. FileAuthority does the looking up (answers,
    CNAMEs, additional addresses, NODATA with the SOA); this class only keeps
    its C{records} and C{soa} current.

    @param zone: the zone's name, normalised.
    @param serial: returns the SOA serial: the table's revision, which is
        the same on every node that holds the same records.
    """

    def __init__(self, zone: str, serial: Callable[[], int]) -> None:
        self._zone = zone.encode("ascii")
        self._serial = serial
        super().__init__(zone)

    def loadFile(self, filename: str) -> None:
        """
        FileAuthority's loading hook: the zone starts with its SOA alone.
        """
        self.records = {}
        self._refresh_soa()

    def _refresh_soa(self) -> None:
        zone = self._zone.decode("ascii")
        soa = dns.Record_SOA(mname=f"ns.{zone}", rname=f"hostmaster.{zone}",
                             serial=self._serial(), ttl=SOA_TIMERS["minimum"],
                             **SOA_TIMERS)
        others = [r for r in self.records.get(self._zone, []) if r.TYPE != dns.SOA]
        self.soa = (self._zone, soa)
        self.records[self._zone] = [soa, *others]

    def add(self, record: Record) -> None:
        self.records.setdefault(record.name.encode("ascii"), []).append(record.payload())

    def remove(self, record: Record) -> None:
        name = record.name.encode("ascii")
        payloads = self.records.get(name, [])
        payload = record.payload()
        if payload in payloads:
            payloads.remove(payload)
        if not payloads:
            self.records.pop(name, None)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Deferred:
        self._refresh_soa()
        return super()._lookup(name, cls, type, timeout)

    def lookupZone(self, name: bytes, timeout: Any = 10) -> Deferred:
        self._refresh_soa()
        return super().lookupZone(name, timeout)

    def negative_answer(self) -> dns.RRHeader:
        """
        The SOA for the authority section of an NXDOMAIN answer, so that
        resolvers may cache it (RFC 2308).
        """
        self._refresh_soa()
        return dns.RRHeader(self._zone, dns.SOA, dns.IN, SOA_TIMERS["minimum"],
                            self.soa[1], auth=True)


class ZoneServerFactory(DNSServerFactory):
    """
    Answers from one L{ZoneAuthority} only, without recursion: NXDOMAIN
    with the SOA for names in the zone it does not hold, REFUSED outside
    it, and every other answer authoritative.
    """

    def __init__(self, authority: ZoneAuthority) -> None:
        super().__init__(authorities=[authority])
        self._authority = authority

    def gotResolverError(self, failure: Any, protocol: Any, message: dns.Message,
                         address: Any) -> None:
        if failure.check(error.AuthoritativeDomainError):
            self._reply(protocol, message, address, dns.ENAME,
                        [self._authority.negative_answer()])
        elif failure.check(error.DomainError):
            self._reply(protocol, message, address, dns.EREFUSED, [])
        else:
            super().gotResolverError(failure, protocol, message, address)

    def _reply(self, protocol: Any, message: dns.Message, address: Any, rcode: int,
               authority: list[dns.RRHeader]) -> None:
        response = dns.Message(id=message.id, answer=1, opCode=message.opCode,
                               recDes=message.recDes, recAv=0, rCode=rcode)
        response.queries = message.queries
        response.authority = authority
        # sendReply reports how long the query took from this.
        response.timeReceived = message.timeReceived
        self.sendReply(protocol, response, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        # DNSServerFactory sets AA only when the answer section holds
        # records, but a NODATA answer (the name exists, without records of
        # the type asked) is just as authoritative.
        message.auth = int(message.rCode in (dns.OK, dns.ENAME))
        super().sendReply(protocol, message, address)


class ZoneUpdater(TableObserver):
    """
    Keeps a L{ZoneAuthority} equal to the table's records and prints each
    change; objects that are not valid records of the zone are reported and
    left out.
    """

    def __init__(self, authority: ZoneAuthority, zone: str) -> None:
        self._authority = authority
        self._zone = zone

    def _record(self, obj: dict) -> Record | None:
        if obj.get("type") != RECORD_TYPE:
            return None
        try:
            return record_from_object(obj, self._zone)
        except RecordError as e:
            complain(f"ignoring a record in the table: {e}: {obj}")
            return None

    def object_added(self, obj: dict) -> None:
        record = self._record(obj)
        if record is not None:
            self._authority.add(record)
            say(f"record added {record.text()}")

    def object_removed(self, obj: dict) -> None:
        record = self._record(obj)
        if record is not None:
            self._authority.remove(record)
            say(f"record removed {record.text()}")

    def error(self, error_string: str, origin: str, obj: object) -> None:
        complain(f"error from {origin}: {error_string}")


class ZonePublisher:
    """
    The master's side: makes the table's records exactly those of the zone
    file, at start and on every SIGHUP. Loads run one at a time, and a
    reload asked for while the node starts waits for the first load.
    """

    def __init__(self, table: DistributedTable, zone_file: Path, zone: str) -> None:
        self._table = table
        self._zone_file = zone_file
        self._zone = zone
        self._lock = DeferredLock()
        self._lock.acquire()

    async def publish_first(self, records: set[Record]) -> None:
        """
        Publish the records read at start, once the node has started.
        """
        try:
            await self._publish(records)
        finally:
            self._lock.release()

    def reload(self) -> Deferred:
        """
        Read the zone file again and publish it; a bad file is reported
        and changes nothing.
        """
        try:
            records = read_zone(self._zone_file, self._zone)
        except RecordError as e:
            complain(f"reload failed, keeping the previous records: {e}")
            return succeed(None)
        published = self._lock.run(lambda: Deferred.fromCoroutine(self._publish(records)))
        return published.addErrback(
            lambda failure: complain(f"reload failed: {failure.getErrorMessage()}"))

    async def _publish(self, records: set[Record]) -> None:
        # A starting master first learns the network's newest table.
        await self._table.flush()
        current: dict[Record, dict] = {}
        for obj in self._table.objects():
            if obj.get("type") == RECORD_TYPE:
                try:
                    current[record_from_object(obj, self._zone)] = obj
                except RecordError:
                    self._table.remove_object(obj)
        added = records - current.keys()
        removed = current.keys() - records
        for record in removed:
            self._table.remove_object(current[record])
        for record in added:
            self._table.add_object(record.to_object())
        head = await self._table.flush()
        say(f"zone published: {len(records)} records (+{len(added)} -{len(removed)}), "
            f"revision {head.rev}")


def read_zone(path: Path, zone: str) -> set[Record]:
    """
    @raise RecordError: if the file cannot be read or holds a bad record.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
    return parse_zone(text, zone, source=str(path))


#: Ports the system picks for UDP (with --dns-port 0) before giving up on
#: finding one that is free for TCP too.
PICK_ATTEMPTS = 10


def listen_dns(reactor: Any, factory: ZoneServerFactory, port: int,
               interface: str) -> list[Any]:
    """
    Listen for DNS over UDP, then over TCP on the same port number. With
    port 0 the system picks the UDP port, and its number may be in use for
    TCP (by any connection's local end): then the UDP port is closed and
    another picked, up to L{PICK_ATTEMPTS} times.

    @raise CannotListenError: if either port is taken (for port 0, on the
        last attempt).
    """
    attempts = PICK_ATTEMPTS if port == 0 else 1
    while True:
        udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory),
                                interface=interface)
        try:
            return [udp, reactor.listenTCP(udp.getHost().port, factory, interface=interface)]
        except CannotListenError:
            udp.stopListening()
            attempts -= 1
            if attempts == 0:
                raise


async def run(reactor: Any, args: argparse.Namespace, key: str,
              records: set[Record] | None) -> None:
    master = args.role == "master"
    table = make_table(args, key, master, reactor)
    node = Node(table, reactor, f"zone {args.role}")
    authority = ZoneAuthority(args.zone, lambda: table.head.rev)
    table.subscribe(ZoneUpdater(authority, args.zone))
    publisher = ZonePublisher(table, args.zone_file, args.zone) if master else None
    if publisher is not None:
        # Before anything can be printed: whoever reads the pid may signal.
        signal.signal(signal.SIGHUP,
                      lambda *_: reactor.callFromThread(publisher.reload))
    await node.start()
    if publisher is not None and records is not None:
        await publisher.publish_first(records)
    try:
        ports = listen_dns(reactor, ZoneServerFactory(authority), args.dns_port,
                           args.interface)
    except CannotListenError as e:
        complain(f"cannot listen for DNS: {e}")
        await node.stop()
        raise SystemExit(1)
    for port in ports:
        node.serve(port)
    say(f"dns: serving {args.zone} on {args.interface} port {ports[0].getHost().port} "
        "(UDP and TCP)")
    if publisher is not None:
        say(f"reload the zone file with: kill -HUP {os.getpid()}")
    await node.run_forever()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="An authoritative DNS server for one zone on every node; the "
                    "records replicate through dtable from the master's zone file.")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, summary in (("master", "publish the zone file's records and serve them"),
                          ("node", "serve the records the master publishes")):
        sub = roles.add_parser(role, help=summary, description=summary)
        sub.add_argument("--zone", default="example.test",
                         help="the zone served (default: %(default)s)")
        sub.add_argument("--dns-port", type=int, default=5053,
                         help="the DNS port, UDP and TCP; 0 picks a free one "
                              "(default: %(default)s)")
        if role == "master":
            sub.add_argument("--zone-file", type=Path, required=True,
                             help="lines of NAME [TTL] [IN] TYPE DATA, TYPE one of "
                                  "A, AAAA, MX, TXT, CNAME; re-read on SIGHUP")
        add_node_arguments(sub, default_port=9999)
    return parser


def main(argv: list[str]) -> None:
    arguments = parser()
    args = arguments.parse_args(argv)
    key = check_node_arguments(arguments, args)
    if not 0 <= args.dns_port <= 65535:
        arguments.error(f"--dns-port must be from 0 to 65535, not {args.dns_port}")
    try:
        args.zone = normalise_name(args.zone)
    except RecordError as e:
        arguments.error(f"--zone: {e}")
    records = None
    if args.role == "master":
        try:
            records = read_zone(args.zone_file, args.zone)
        except RecordError as e:
            arguments.error(str(e))
    react(run, (args, key, records))


if __name__ == "__main__":
    main(sys.argv[1:])
