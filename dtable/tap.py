"""
twistd plugin support: C{twistd dtable} options and makeService.

    twistd -n dtable --port 9999 --key-file net.key --peer 127.0.0.1:10000 [--master]

Every interval and threshold of L{dtable.config.Config} is an option with the
seed's default. A bad option makes twistd print what is wrong and exit.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.python import usage

from dtable import crypto
from dtable.config import Config, ConfigError, master_signing_key
from dtable.peers import AddressError, PeerAddress

#: Config fields offered as options, with their help text.
_TUNABLES: dict[str, str] = {
    "ping_interval": "Seconds between keep-alive pings; a link silent for twice this is dead.",
    "clean_interval": "Seconds between runs of the clean loop.",
    "ping_window": "RTT measurements kept per node.",
    "better_primary_wait": "Seconds another node must be clearly better before the primary link moves to it.",
    "purge_after": "Seconds after which an unreachable learned node is forgotten.",
    "handshake_timeout": "Seconds a new connection has to complete TLS and its hello.",
    "connect_timeout": "Seconds a TCP connection attempt may take.",
    "request_timeout": "Seconds a catch-up request may wait for its answer.",
    "reconnect_initial_delay": "First delay before dialling a peer again.",
    "reconnect_max_delay": "Longest delay between attempts to dial a peer.",
    "failures_before_next_peer": "Failed attempts before the primary link tries the next peer.",
    "outbound_links": "Outbound links kept (the primary and more, for redundancy).",
    "probe_retest": "Seconds before a node that is not linked is probed again.",
    "probe_pings": "Test pings sent over each probe connection.",
    "probe_concurrency": "Probe connections open at once.",
    "better_primary_ratio": "Another node's mean RTT must be below this times the primary's to replace it.",
    "message_ttl": "Seconds a message id is remembered by the duplicate filter.",
    "message_filter_size": "Message ids the duplicate filter remembers at most.",
    "batch_window": "Seconds the master groups add/remove calls into one batch.",
    "batch_max_ops": "Operations in one batch at most.",
    "master_sync_timeout": "Seconds a starting master waits to learn the network's newest state before it publishes.",
    "catch_up_retry": "Seconds before a failed catch-up is tried again.",
    "fetch_chunk": "Objects asked for in one catch-up request.",
    "log_max_batches": "Recent batches kept to serve peers that are a few revisions behind.",
    "log_max_bytes": "Bytes of recent batches kept at most.",
    "warn_after_new_connections": "Firewall: warn about an address after this many connections that did not authenticate.",
    "block_after_new_connections": "Firewall: block an address after this many connections that did not authenticate.",
    "block_after_failures": "Firewall: block an address after this many failed handshakes or protocol violations within --block-for seconds.",
    "block_for": "Firewall: seconds a block lasts.",
    "ipv6_group_depth": "Firewall: IPv6 subnet levels, in 16-bit groups (4 groups is a /64).",
    "ipv6_subnet_breach": "Firewall: blocked addresses that block their /64 (and this number squared its /48, and so on).",
    "firewall_max_addresses": "Firewall: addresses tracked at most; the least recently seen are forgotten first.",
    "max_pending_handshakes": "Inbound connections that may be between accept and hello at once; more are refused.",
    "stall_probe_interval": "Seconds between checks of how late the reactor runs (status and metrics show the worst).",
    "hello_max_frame": "Largest frame accepted before the hello, in bytes.",
    "max_frame": "Largest frame accepted on a live link, in bytes.",
    "send_queue_limit": "Bytes that may wait for a slow peer before it is disconnected.",
}

_DEFAULTS = {f.name: f.default for f in attrs.fields(Config)}


def _number(option: str, kind: type) -> Callable[[str], Any]:
    """
    A coerce function for C{--option} whose error names the option.
    """
    def coerce(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{option}: {text!r} is not {what}") from None

    return coerce


def _option(name: str) -> list[Any]:
    default = _DEFAULTS[name]
    option = name.replace("_", "-")
    return [option, None, default, _TUNABLES[name], _number(option, type(default))]


class Options(usage.Options):
    synopsis = (
        "--key-file FILE [--port PORT] [--peer HOST:PORT ...] [--master] [options]"
    )
    longdesc = (
        "Run a node of a dtable network: an encrypted, replicated table of JSON "
        "objects. Make a network key with: python -m dtable keygen > net.key"
    )

    optFlags = [
        ["master", "m", "This node is the master: only it adds and removes objects."],
        ["memory", None, "Keep the table in memory only (rebuilt from the network at every start)."],
        ["static-peers", None, "Link only to the --peer addresses; learn no others from peers."],
        ["never-block", None, "Firewall: count and warn, but never block an address."],
    ]
    optParameters = [
        ["port", "p", 9999, "TCP port to listen on for peers (0 picks a free one).",
         _number("port", int)],
        ["key-file", "k", None, "File holding the network key."],
        ["master-key-file", None, None,
         "On the master: file holding the private half of a separate master key pair "
         "(make one with: python -m dtable master-keygen -o master.key). Without it and "
         "--master-public-key, any holder of the network key can sign changes."],
        ["master-public-key", None, None,
         "On the other nodes: the master's public key (64 hex characters, as "
         "master-keygen printed it); only changes it signed are accepted."],
        ["api", None, None,
         "Serve the control API and status page on this Twisted endpoint, e.g. 8080 or "
         "tcp:8080:interface=127.0.0.1 (a bare port or tcp:PORT listens on loopback "
         "only). Needs --api-token-file."],
        ["api-token-file", None, None,
         "File holding the control API's bearer token (make one with: python -m dtable "
         "api-token -o api.token)."],
        ["api-access-log", None, None,
         "Append a line for every control API request (combined log format) to this "
         "file; by default requests are not logged."],
        ["block-command", None, None,
         "Firewall: command run when an address or subnet is blocked, {address} replaced "
         "(e.g. \"iptables -I INPUT -s {address} -j DROP\"); run without a shell."],
        ["unblock-command", None, None,
         "Firewall: command run when a block ends, {address} replaced."],
        ["data-dir", None, None,
         "Directory of the node's table (default: dtable-PORT in the working directory)."],
        ["interface", None, None,
         "Address to listen on (default: every address of both IPv4 and IPv6)."],
        ["debug", "d", 0,
         "Debug level: 0 none, 1 links, 2 peer selection and the clean loop, "
         "3 every frame.", _number("debug", int)],
    ] + [_option(name) for name in _TUNABLES]

    def __init__(self) -> None:
        super().__init__()
        self["peers"] = []

    def opt_peer(self, address: str) -> None:
        """
        An initial peer, HOST:PORT or [IPV6]:PORT (repeatable).
        """
        try:
            self["peers"].append(PeerAddress.parse(address))
        except AddressError as e:
            raise usage.UsageError(f"--peer: {e}")

    def _check_api(self) -> None:
        from twisted.internet.endpoints import serverFromString

        from dtable.api import api_endpoint

        try:
            # Parsing only: the endpoint is built again, with the reactor, to listen.
            serverFromString(None, api_endpoint(self["api"]))
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--api: {self['api']!r} is not an endpoint: {e}")
        _check_api_token(self["api-token-file"])

    def postOptions(self) -> None:
        if not self["key-file"]:
            raise usage.UsageError(
                "--key-file is required; make a key with: python -m dtable keygen > net.key"
            )
        path = self["key-file"]
        try:
            with open(path, encoding="utf-8") as f:
                self["key"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"--key-file: cannot read {path}: {e}")
        try:
            crypto.parse_network_key(self["key"])
        except crypto.WeakKeyError as e:
            raise usage.UsageError(f"--key-file {path}: {e}")
        if self["api"] is not None:
            self._check_api()
        self["master_key"] = None
        if self["master-key-file"]:
            try:
                self["master_key"] = crypto.load_master_key(self["master-key-file"])
            except crypto.MasterKeyError as e:
                raise usage.UsageError(f"--master-key-file: {e}")
        tunables = {name: self[name.replace("_", "-")] for name in _TUNABLES}
        try:
            self["config"] = Config(
                port=self["port"],
                interface=self["interface"],
                peers=tuple(self["peers"]),
                master=bool(self["master"]),
                debug=self["debug"],
                data_dir=self["data-dir"],
                memory=bool(self["memory"]),
                learn_peers=not self["static-peers"],
                memory_report_signal=True,
                gc_freeze=True,
                master_public_key=self["master-public-key"],
                api=self["api"],
                api_token_file=self["api-token-file"],
                api_access_log=self["api-access-log"],
                never_block=bool(self["never-block"]),
                block_command=self["block-command"],
                unblock_command=self["unblock-command"],
                **tunables,
            )
        except ConfigError as e:
            option = str(e).split()[0].rstrip(":").replace("_", "-")
            raise usage.UsageError(f"--{option}: {e}")
        try:
            master_signing_key(self["master_key"], self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


def _check_api_token(path: str | None) -> None:
    if not path:
        raise usage.UsageError(
            "--api needs --api-token-file; make a token with: python -m dtable api-token "
            "-o api.token")
    try:
        with open(path, encoding="utf-8") as token_file:
            token = token_file.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"--api-token-file: cannot read {path}: {e}")
    if len(token) < 16:
        raise usage.UsageError(
            f"--api-token-file: the token in {path} is {'empty' if not token else 'too short'}"
            "; make one with: python -m dtable api-token -o api.token")


def makeService(options: Options, reactor: Any = None):
    """
    Build the node described by C{options}.
    """
    from dtable.service import DistributedTable

    return DistributedTable(key=options["key"], config=options["config"],
                            master_key=options["master_key"], reactor=reactor)
