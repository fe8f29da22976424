"""
The peer directory: addresses, node ids, failures and the choice of links.

This layer owns what a node knows about other nodes: the addresses it was given
or has learned, which of them turned out to be itself, how often each failed,
and which address to dial next. It knows nothing of sockets or TLS; the
service feeds it what happened and asks it what to do.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

import attrs


class AddressError(ValueError):
    """
    A peer address could not be parsed; str() says what is wrong.
    """


def _check_port(port: int, text: str) -> int:
    if not 0 < port < 65536:
        raise AddressError(f"port out of range in {text!r} (1-65535)")
    return port


@attrs.frozen(order=True)
class PeerAddress:
    """
    Where a node listens: a host (name, IPv4 or IPv6 literal) and a TCP port.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "PeerAddress":
        """
        Parse C{host:port}, C{1.2.3.4:port} or C{[::1]:port}.

        @raise AddressError: with a message naming what is wrong.
        """
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise AddressError(
                    f"bad IPv6 peer address {text!r}: use [address]:port"
                )
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise AddressError(f"{host!r} in {text!r} is not an IPv6 address")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise AddressError(f"bad peer address {text!r}: use host:port")
            if ":" in host:
                raise AddressError(
                    f"bad peer address {text!r}: write IPv6 addresses as [address]:port"
                )
        if not (port_text.isascii() and port_text.isdigit()):
            raise AddressError(f"bad port {port_text!r} in peer address {text!r}")
        return cls(host=host, port=_check_port(int(port_text), text))

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.define
class _Candidate:
    address: PeerAddress
    initial: bool
    failures: int = 0
    node_id: str | None = None


class PeerDirectory:
    """
    The addresses a node may dial, and the choice of the next one.

    Addresses that turned out to be the node itself are remembered and never
    chosen again. Among the rest, the next primary candidate is the one with
    the fewest failures, ties broken by the order the addresses were learned,
    starting after the previous choice so that a node tries its peers in turn.
    """

    def __init__(self, initial: Iterable[PeerAddress] = ()) -> None:
        self._candidates: dict[PeerAddress, _Candidate] = {}
        self._self_addresses: set[PeerAddress] = set()
        self._last_choice: PeerAddress | None = None
        for address in initial:
            self.add(address, initial=True)

    def add(self, address: PeerAddress, initial: bool = False) -> bool:
        """
        Learn an address. Returns False if it was already known or is the
        node itself.
        """
        if address in self._self_addresses or address in self._candidates:
            return False
        self._candidates[address] = _Candidate(address=address, initial=initial)
        return True

    def addresses(self) -> list[PeerAddress]:
        return list(self._candidates)

    def self_addresses(self) -> list[PeerAddress]:
        return sorted(self._self_addresses)

    def is_self(self, address: PeerAddress) -> bool:
        return address in self._self_addresses

    def mark_self(self, address: PeerAddress) -> None:
        """
        The address loops back to this node: never dial it again.
        """
        self._candidates.pop(address, None)
        self._self_addresses.add(address)

    def record_failure(self, address: PeerAddress) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.failures += 1

    def record_success(self, address: PeerAddress, node_id: str) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.failures = 0
            candidate.node_id = node_id

    def failures(self, address: PeerAddress) -> int:
        candidate = self._candidates.get(address)
        return candidate.failures if candidate is not None else 0

    def next_primary(self) -> PeerAddress | None:
        """
        The address to dial for the primary link, or None if there is none.
        """
        if not self._candidates:
            return None
        order = list(self._candidates)
        if self._last_choice in self._candidates:
            start = order.index(self._last_choice) + 1
            order = order[start:] + order[:start]
        choice = min(order, key=lambda a: self._candidates[a].failures)
        self._last_choice = choice
        return choice

    def snapshot(self) -> list[dict]:
        """
        The directory as plain data, for status displays and logs.
        """
        return [
            {
                "address": str(c.address),
                "initial": c.initial,
                "failures": c.failures,
                "node_id": c.node_id,
            }
            for c in self._candidates.values()
        ]
