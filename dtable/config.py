"""
The node's configuration: one frozen value with validation and the seed's
defaults, built from DistributedTable's keyword arguments or twistd's options.

Intervals are in seconds. The defaults are the production defaults of the
original node-distributed-table (ping every 2 s, clean loop 5 s, 20 pings per
window, better-primary wait 20 min, purge after 1 h, duplicate filter 5 min);
tests shrink them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import attrs

from dtable.peers import PeerAddress


class ConfigError(ValueError):
    """
    A configuration value is out of range; str() names the option.
    """


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{attribute.name} must be greater than 0, not {value!r}")


def _not_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{attribute.name} must not be negative, not {value!r}")


def _port(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value < 65536:
        raise ConfigError(f"{attribute.name} must be 0-65535, not {value!r}")


def _debug(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value not in (0, 1, 2, 3):
        raise ConfigError(f"debug must be 0, 1, 2 or 3, not {value!r}")


def _depth(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 1 <= value <= 8:
        raise ConfigError(f"{attribute.name} must be 1-8 (groups of 16 bits), not {value!r}")


def _master_public_key(value: str | None) -> str | None:
    if value is None:
        return None
    from dtable.crypto import MasterKeyError, parse_master_public_key

    try:
        return parse_master_public_key(value)
    except MasterKeyError as e:
        raise ConfigError(f"master_public_key: {e}") from None


def _command(value: str | None) -> str | None:
    if value is None:
        return None
    if "{address}" not in value:
        raise ConfigError(
            f"block_command and unblock_command must contain {{address}}, not {value!r}")
    return value


def _peers(value: Any) -> tuple[PeerAddress, ...]:
    return tuple(
        p if isinstance(p, PeerAddress) else PeerAddress.parse(str(p)) for p in value
    )


@attrs.frozen(kw_only=True)
class Config:
    """
    Everything a node is told; validated on construction.

    @ivar port: the TCP port to listen on (0 picks a free one).
    @ivar interface: the address to listen on; None listens on every address
        of both families where the host has them.
    @ivar peers: the initial peers.
    @ivar master: whether this node publishes the table.
    @ivar debug: the seed's debug level (0 none, 1 links, 2 peer selection and
        the clean loop, 3 every frame).
    @ivar data_dir: where the node keeps its table (SQLite); by default
        C{dtable-PORT} under the working directory.
    @ivar memory: keep the table in memory only; it is rebuilt from the
        network at every start.
    @ivar learn_peers: learn other nodes' addresses from peers; without it a
        node links only to the addresses it was given.
    @ivar master_public_key: the public half of a separate master key pair
        (64 hex characters); None trusts the master key derived from the
        network key. The master itself is given the private half (see
        L{dtable.service.DistributedTable}'s C{master_key}).
    @ivar api: where the control API listens (L{dtable.api}), as a Twisted
        endpoint string; a bare port or C{tcp:PORT} listens on loopback only.
        None serves no API.
    @ivar api_token_file: the file holding the API's bearer token.
    @ivar api_access_log: a file to append a line to for every API request
        (twisted.web's combined log format); None logs none. They are not
        in the node's own log, where a busy API would drown what the node
        reports, and which cost a tenth of a millisecond per request.
    @ivar memory_report_signal: write a memory report on SIGUSR2 (twistd
        sets it; an embedding application decides about its own signals).
    @ivar gc_freeze: once started, move every object the process holds out
        of the cyclic garbage collector's reach (C{gc.freeze}), so that a
        full collection does not walk them all again and again while the
        node works: 100-180 ms stalls on a busy node. twistd sets it; an
        embedding application decides about its own process.
    @ivar block_command: with C{unblock_command}, a command run (without a
        shell; C{{address}} is replaced) when the firewall blocks or
        unblocks an address or subnet, to apply the block in the host's
        firewall; None runs nothing.
    """

    port: int = attrs.field(default=9999, validator=_port)
    interface: str | None = None
    peers: tuple[PeerAddress, ...] = attrs.field(default=(), converter=_peers)
    master: bool = False
    debug: int = attrs.field(default=0, validator=_debug)
    data_dir: str | None = None
    memory: bool = False
    learn_peers: bool = True
    master_public_key: str | None = attrs.field(default=None, converter=_master_public_key)
    api: str | None = None
    api_token_file: str | None = None
    api_access_log: str | None = None

    # Liveness and the overlay.
    ping_interval: float = attrs.field(default=2.0, validator=_positive)
    clean_interval: float = attrs.field(default=5.0, validator=_positive)
    ping_window: int = attrs.field(default=20, validator=_positive)
    better_primary_wait: float = attrs.field(default=1200.0, validator=_positive)
    purge_after: float = attrs.field(default=3600.0, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    request_timeout: float = attrs.field(default=60.0, validator=_positive)
    reconnect_initial_delay: float = attrs.field(default=1.0, validator=_positive)
    reconnect_max_delay: float = attrs.field(default=60.0, validator=_positive)
    failures_before_next_peer: int = attrs.field(default=3, validator=_positive)
    outbound_links: int = attrs.field(default=1, validator=_positive)
    probe_retest: float = attrs.field(default=60.0, validator=_positive)
    probe_pings: int = attrs.field(default=20, validator=_positive)
    probe_concurrency: int = attrs.field(default=2, validator=_positive)
    better_primary_ratio: float = attrs.field(default=0.7, validator=_positive)

    # Messages.
    message_ttl: float = attrs.field(default=300.0, validator=_positive)
    message_filter_size: int = attrs.field(default=100_000, validator=_positive)

    # Replication.
    batch_window: float = attrs.field(default=0.0, validator=_not_negative)
    batch_max_ops: int = attrs.field(default=1_500, validator=_positive)
    master_sync_timeout: float = attrs.field(default=5.0, validator=_not_negative)
    catch_up_retry: float = attrs.field(default=1.0, validator=_positive)
    fetch_chunk: int = attrs.field(default=2_000, validator=_positive)
    log_max_batches: int = attrs.field(default=10_000, validator=_positive)
    log_max_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_positive)

    # The firewall (the seed's node-ip-ac defaults).
    warn_after_new_connections: int = attrs.field(default=80, validator=_positive)
    block_after_new_connections: int = attrs.field(default=600, validator=_positive)
    block_after_failures: int = attrs.field(default=30, validator=_positive)
    block_for: float = attrs.field(default=3600.0, validator=_positive)
    ipv6_group_depth: int = attrs.field(default=4, validator=_depth)
    ipv6_subnet_breach: int = attrs.field(default=40, validator=_positive)
    never_block: bool = False
    firewall_max_addresses: int = attrs.field(default=100_000, validator=_positive)
    block_command: str | None = attrs.field(default=None, converter=_command)
    unblock_command: str | None = attrs.field(default=None, converter=_command)
    max_pending_handshakes: int = attrs.field(default=256, validator=_positive)

    # Watching the node itself.
    stall_probe_interval: float = attrs.field(default=0.1, validator=_positive)
    memory_report_signal: bool = False
    gc_freeze: bool = False

    # Frames and buffers.
    hello_max_frame: int = attrs.field(default=16 * 1024, validator=_positive)
    max_frame: int = attrs.field(default=128 * 1024 * 1024, validator=_positive)
    send_queue_limit: int = attrs.field(default=256 * 1024 * 1024, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.reconnect_max_delay < self.reconnect_initial_delay:
            raise ConfigError(
                "reconnect_max_delay must not be smaller than reconnect_initial_delay"
            )
        from dtable.wire import MAX_FETCH

        if self.fetch_chunk > MAX_FETCH:
            raise ConfigError(f"fetch_chunk must be at most {MAX_FETCH}, not {self.fetch_chunk}")
        if self.max_frame < self.hello_max_frame:
            raise ConfigError("max_frame must not be smaller than hello_max_frame")
        if self.port == 0 and self.data_dir is None and not self.memory:
            raise ConfigError(
                "data_dir is required for a node on port 0 (a free port), since the "
                "default data directory is named after the port; or keep the table "
                "in memory")

    def store_path(self) -> str | None:
        """
        The SQLite file of this node, or None for memory only.
        """
        if self.memory:
            return None
        from dtable.store import DB_NAME, default_data_dir

        return os.path.join(self.data_dir or default_data_dir(self.port), DB_NAME)

    @property
    def component_horizon(self) -> float:
        """
        A node whose beacon has not arrived for this long is taken to be in
        another component of the overlay.
        """
        return 3 * self.clean_interval

    @property
    def dead_link_timeout(self) -> float:
        """
        A link that has said nothing for this long is dead.
        """
        return 2 * self.ping_interval


def master_signing_key(master_key: Any, config: Config) -> Any:
    """
    The master's own signing key from C{master_key}, checked against the
    configuration.

    @param master_key: the private half of a separate master key pair (its
        text or an Ed25519 private key), or None.

    @return: the key, or None to sign with the key derived from the network
        key.

    @raise ConfigError: if the keys do not fit the node's role or each other.
    @raise dtable.crypto.MasterKeyError: if C{master_key} is malformed.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dtable import crypto

    if master_key is None:
        if config.master and config.master_public_key is not None:
            raise ConfigError(
                "the master needs the private half of its master key pair "
                "(master_key, or --master-key-file), not only master_public_key")
        return None
    if not config.master:
        raise ConfigError(
            "master_key is for the master only; give the other nodes its public "
            "half as master_public_key")
    key = (master_key if isinstance(master_key, Ed25519PrivateKey)
           else crypto.parse_master_key(master_key))
    public = crypto.public_key_hex(key)
    if config.master_public_key not in (None, public):
        raise ConfigError(
            f"master_public_key {config.master_public_key} is not the public half of "
            f"master_key (which is {public})")
    return key


#: The names of Config's fields that are intervals in seconds, in the order
#: twistd lists them.
INTERVALS = tuple(
    f.name for f in attrs.fields(Config) if f.type in ("float", float)
)
