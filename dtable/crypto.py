"""
Key material and TLS configuration for a dtable network.

This layer owns everything derived from the operator's network key:

  - parsing and generating the network key itself (L{parse_network_key},
    L{load_network_key}, L{generate_network_key});
  - deriving, with one slow KDF and a fixed salt, the network CA key and the
    default master signing key, and building the CA certificate
    deterministically so that every key holder gets byte-identical DER
    (L{derive_network});
  - issuing a node its own certificate, signed by that CA, whose subject is
    the node id (L{issue_node_certificate});
  - the mutual TLS 1.3 options both sides of a peer connection use
    (L{tls_options}) and reading a peer's node id from its certificate
    (L{node_id_from_certificate});
  - Ed25519 master signatures as hex strings (L{sign}, L{verify},
    L{public_key_hex});
  - a separate master key pair, for networks where holding the network key
    must not be enough to change the table (L{generate_master_key},
    L{parse_master_key}, L{load_master_key}, L{parse_master_public_key}).

It knows nothing of sockets, connections, the reactor or the wire format: it
hands out values and a L{CertificateOptions}, and callers do the I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
from datetime import datetime, timezone

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)

__all__ = [
    "KEY_PREFIX",
    "WeakKeyError",
    "generate_network_key",
    "parse_network_key",
    "load_network_key",
    "NetworkCredentials",
    "derive_network",
    "new_node_id",
    "NodeIdentity",
    "issue_node_certificate",
    "tls_options",
    "node_id_from_certificate",
    "public_key_hex",
    "sign",
    "verify",
    "MASTER_KEY_PREFIX",
    "MasterKeyError",
    "generate_master_key",
    "parse_master_key",
    "load_master_key",
    "parse_master_public_key",
]

KEY_PREFIX = "dtable-key-v1:"

# The smallest secret accepted, in bytes, for either form of network key.
MIN_SECRET_BYTES = 32
# A passphrase-like key must use at least this many distinct characters.
MIN_DISTINCT_CHARACTERS = 12

_KEYGEN_HINT = "make a good one with: python -m dtable keygen > net.key"

MASTER_KEY_PREFIX = "dtable-master-key-v1:"
_MASTER_KEYGEN_HINT = (
    "make a master key pair with: python -m dtable master-keygen -o master.key")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

# Changing any of these changes every derived CA: they are part of the
# network's identity, hence the version in the salt.
_SCRYPT_SALT = b"dtable/network/v1"
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1
_SEED_BYTES = 32

_CA_COMMON_NAME = "dtable network CA"
_CA_SERIAL = 1
# Fixed validity for the CA and every node certificate: peers' clocks differ,
# and the CA must be byte-identical wherever it is derived.
_NOT_BEFORE = datetime(2000, 1, 1, tzinfo=timezone.utc)
_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PUBLIC_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")


class WeakKeyError(ValueError):
    """
    The network key is missing, malformed or too weak.

    C{str()} of the exception is a complete message for an operator, saying
    what is wrong and how to make a good key.
    """


# --- the network key ------------------------------------------------------


def generate_network_key() -> str:
    """
    Make a new random network key.

    @return: L{KEY_PREFIX} followed by 32 random bytes in unpadded base64url,
        suitable for writing to a key file as is.
    """
    encoded = base64.urlsafe_b64encode(os.urandom(_SEED_BYTES)).rstrip(b"=")
    return KEY_PREFIX + encoded.decode("ascii")


def parse_network_key(text: str | bytes) -> bytes:
    """
    Check a network key and return its secret bytes.

    Surrounding whitespace is ignored. A key that starts with L{KEY_PREFIX}
    is unpadded base64url and must decode to at least 32 bytes. Anything
    else is taken as a passphrase-like secret: it must be at least 32 bytes
    of UTF-8 and use at least 12 distinct characters.

    @param text: the key as read from a file or given on a command line.

    @return: the decoded bytes of a prefixed key, or the UTF-8 encoding of a
        passphrase.

    @raise WeakKeyError: if the key is empty, malformed or too weak.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise WeakKeyError(
                f"the network key is not UTF-8 text; {_KEYGEN_HINT}"
            ) from None
    text = text.strip()
    if not text:
        raise WeakKeyError(f"the network key is empty; {_KEYGEN_HINT}")

    if text.startswith(KEY_PREFIX):
        encoded = text[len(KEY_PREFIX) :]
        if _BASE64URL.fullmatch(encoded) is None:
            raise WeakKeyError(
                f"the network key starts with {KEY_PREFIX!r} but the rest is"
                f" not unpadded base64url; {_KEYGEN_HINT}"
            )
        try:
            secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            raise WeakKeyError(
                f"the network key starts with {KEY_PREFIX!r} but the rest is"
                f" not valid base64url (truncated?); {_KEYGEN_HINT}"
            ) from None
        if len(secret) < MIN_SECRET_BYTES:
            raise WeakKeyError(
                f"the network key holds {len(secret)} bytes, fewer than the"
                f" {MIN_SECRET_BYTES} required; {_KEYGEN_HINT}"
            )
        return secret

    secret = text.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise WeakKeyError(
            f"the network key is {len(secret)} bytes long, shorter than the"
            f" {MIN_SECRET_BYTES} required; {_KEYGEN_HINT}"
        )
    distinct = len(set(text))
    if distinct < MIN_DISTINCT_CHARACTERS:
        raise WeakKeyError(
            f"the network key uses only {distinct} distinct characters, fewer"
            f" than the {MIN_DISTINCT_CHARACTERS} required; {_KEYGEN_HINT}"
        )
    return secret


def load_network_key(path: str) -> bytes:
    """
    Read a network key file and check it with L{parse_network_key}.

    @param path: the key file's path.

    @return: the secret bytes.

    @raise WeakKeyError: if the file cannot be read, or its key is empty,
        malformed or too weak; the message names the path.
    """
    try:
        with open(path, "rb") as key_file:
            content = key_file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise WeakKeyError(
            f"cannot read the network key file {path!r}: {reason};"
            f" {_KEYGEN_HINT}"
        ) from None
    try:
        return parse_network_key(content)
    except WeakKeyError as error:
        raise WeakKeyError(f"{path!r}: {error}") from None


# --- the network CA and master key ---------------------------------------


@attrs.frozen(eq=False)
class NetworkCredentials:
    """
    Everything derived from one network key.

    @ivar ca_key: the network CA's private key.
    @ivar ca_cert: the self-signed network CA certificate; byte-identical
        on every node that holds the same key.
    @ivar network_id: lowercase hex SHA-256 of the CA certificate's DER.
    @ivar master_key: the default master signing key.
    """

    ca_key: Ed25519PrivateKey
    ca_cert: x509.Certificate
    network_id: str
    master_key: Ed25519PrivateKey


@functools.lru_cache(maxsize=8)
def derive_network(secret: bytes) -> NetworkCredentials:
    """
    Derive the network CA and the default master key from a network key.

    One scrypt run (fixed, versioned salt; n=2**15, r=8, p=1) gives 64
    bytes: the first 32 seed the CA's Ed25519 key, the last 32 the master
    key's. The CA certificate has a fixed serial and validity, and Ed25519
    signatures are deterministic, so deriving twice from the same secret
    gives byte-identical DER. Results are cached in-process per secret.

    @param secret: the bytes returned by L{parse_network_key}.

    @return: the network's credentials.
    """
    material = Scrypt(
        salt=_SCRYPT_SALT,
        length=2 * _SEED_BYTES,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
    ).derive(secret)
    ca_key = Ed25519PrivateKey.from_private_bytes(material[:_SEED_BYTES])
    master_key = Ed25519PrivateKey.from_private_bytes(material[_SEED_BYTES:])

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME)])
    ca_public = ca_key.public_key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_public)
        .serial_number(_CA_SERIAL)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_public), critical=False
        )
        .sign(ca_key, algorithm=None)
    )
    der = ca_cert.public_bytes(serialization.Encoding.DER)
    return NetworkCredentials(
        ca_key=ca_key,
        ca_cert=ca_cert,
        network_id=hashlib.sha256(der).hexdigest(),
        master_key=master_key,
    )


# --- node certificates and TLS ---------------------------------------------


def new_node_id() -> str:
    """
    Make a new random node id.

    @return: 32 lowercase hex characters.
    """
    return os.urandom(16).hex()


@attrs.frozen(eq=False)
class NodeIdentity:
    """
    A node's TLS identity.

    @ivar node_id: the node id, also the certificate's subject CN.
    @ivar key: the node's private key, fresh for each start.
    @ivar cert: the node's certificate, issued by the network CA.
    """

    node_id: str
    key: Ed25519PrivateKey
    cert: x509.Certificate


def issue_node_certificate(
    network: NetworkCredentials, node_id: str
) -> NodeIdentity:
    """
    Issue a node a fresh key and a certificate signed by the network CA.

    The certificate's subject CN and its one DNS SAN are the node id; it is
    valid for both TLS server and client authentication, over a fixed
    validity that does not depend on the local clock.

    @param network: the network's credentials.
    @param node_id: the node id: 1 to 64 ASCII letters, digits, '.', '_'
        or '-', starting with a letter or digit (L{new_node_id} makes one).

    @return: the node's identity.

    @raise ValueError: if C{node_id} is not of that form.
    """
    if not isinstance(node_id, str) or _NODE_ID.fullmatch(node_id) is None:
        raise ValueError(f"not a valid node id: {node_id!r}")
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
        )
        .issuer_name(network.ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                network.ca_key.public_key()
            ),
            critical=False,
        )
        .sign(network.ca_key, algorithm=None)
    )
    return NodeIdentity(node_id=node_id, key=key, cert=cert)


def tls_options(
    network: NetworkCredentials, identity: NodeIdentity
) -> CertificateOptions:
    """
    TLS options for either side of a peer connection.

    The same object serves listening and dialling: it presents the node's
    certificate, accepts only TLS 1.3, and requires the peer to present a
    certificate that chains to the network CA. It checks no host name:
    peers are addressed by IP, and the caller reads the peer's node id with
    L{node_id_from_certificate} once the handshake completes.

    @param network: the network's credentials.
    @param identity: this node's identity.

    @return: options for C{listenSSL}, C{connectSSL} or the SSL4 endpoints.
    """
    ca = Certificate(X509.from_cryptography(network.ca_cert))
    # Twisted hands the key and certificate straight to pyOpenSSL's
    # Context, which takes cryptography objects (and deprecates its own).
    return CertificateOptions(
        privateKey=identity.key,  # type: ignore[arg-type]
        certificate=identity.cert,  # type: ignore[arg-type]
        trustRoot=trustRootFromCertificates([ca]),
        raiseMinimumTo=TLSVersion.TLSv1_3,
    )


def node_id_from_certificate(cert: X509 | x509.Certificate) -> str:
    """
    Read the node id from a peer's certificate.

    @param cert: what C{transport.getPeerCertificate()} returns (an
        C{OpenSSL.crypto.X509}) or a C{cryptography} certificate.

    @return: the certificate's subject common name.

    @raise ValueError: if the subject has no common name, or more than one.
    """
    if isinstance(cert, X509):
        cert = cert.to_cryptography()
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(
            f"expected one subject common name in the peer certificate,"
            f" found {len(names)}"
        )
    value = names[0].value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value:
        raise ValueError("the peer certificate's subject common name is empty")
    return value


# --- master signatures ------------------------------------------------------


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """
    Encode an Ed25519 public key for the wire.

    @param key: a private key (its public half is encoded) or a public key.

    @return: the raw 32-byte public key as 64 lowercase hex characters.
    """
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
    return raw.hex()


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """
    Sign bytes with an Ed25519 key.

    @param key: the signing key.
    @param data: the bytes to sign.

    @return: the 64-byte signature as 128 lowercase hex characters.
    """
    return key.sign(data).hex()


def verify(public_hex: str, data: bytes, signature_hex: str) -> bool:
    """
    Check an Ed25519 signature made by L{sign}.

    Both hex strings must be lowercase and exactly as long as L{sign} and
    L{public_key_hex} make them.

    @param public_hex: the signer's public key, from L{public_key_hex}.
    @param data: the bytes that were signed.
    @param signature_hex: the signature, from L{sign}.

    @return: C{True} if the signature is valid; C{False} for a bad
        signature, malformed hex, a wrong length or wrong types. Never
        raises.
    """
    try:
        if (
            _PUBLIC_KEY_HEX.fullmatch(public_hex) is None
            or _SIGNATURE_HEX.fullmatch(signature_hex) is None
        ):
            return False
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        public.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- a separate master key pair -------------------------------------------


class MasterKeyError(ValueError):
    """
    A master key or master public key is missing, malformed or unreadable.

    C{str()} of the exception is a complete message for an operator.
    """


def generate_master_key() -> str:
    """
    Make a new master signing key.

    @return: L{MASTER_KEY_PREFIX} followed by a fresh Ed25519 private key
        (its 32-byte seed) in unpadded base64url, suitable for writing to a
        key file as is. Its public half, for every other node, is
        C{public_key_hex(parse_master_key(text))}.
    """
    raw = Ed25519PrivateKey.generate().private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )
    encoded = base64.urlsafe_b64encode(raw).rstrip(b"=")
    return MASTER_KEY_PREFIX + encoded.decode("ascii")


def parse_master_key(text: str | bytes) -> Ed25519PrivateKey:
    """
    Read a master key made by L{generate_master_key}.

    @param text: the key as read from its file; surrounding whitespace is
        ignored.

    @return: the master's signing key.

    @raise MasterKeyError: if it is not a master key (a network key given
        by mistake is named as such).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    if text.startswith(KEY_PREFIX):
        raise MasterKeyError(
            "this is a network key, not a master key; " + _MASTER_KEYGEN_HINT)
    if not text.startswith(MASTER_KEY_PREFIX):
        raise MasterKeyError(
            f"a master key starts with {MASTER_KEY_PREFIX!r}; {_MASTER_KEYGEN_HINT}")
    encoded = text[len(MASTER_KEY_PREFIX):]
    if _BASE64URL.fullmatch(encoded) is None or len(encoded) != 43:
        raise MasterKeyError(
            "the master key is not 32 bytes of unpadded base64url (truncated?); "
            + _MASTER_KEYGEN_HINT)
    raw = base64.urlsafe_b64decode(encoded + "=")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_master_key(path: str) -> Ed25519PrivateKey:
    """
    Read a master key file and check it with L{parse_master_key}.

    @raise MasterKeyError: if the file cannot be read or holds no master
        key; the message names the path.
    """
    try:
        with open(path, "rb") as key_file:
            content = key_file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise MasterKeyError(f"cannot read the master key file {path!r}: {reason}") from None
    try:
        return parse_master_key(content)
    except MasterKeyError as error:
        raise MasterKeyError(f"{path!r}: {error}") from None


def parse_master_public_key(text: str) -> str:
    """
    Check a master public key as an operator gives it.

    @param text: 64 hex characters (either case; surrounding whitespace is
        ignored), as C{python -m dtable master-keygen} prints it.

    @return: the key as 64 lowercase hex characters, the form heads carry.

    @raise MasterKeyError: if it is not 64 hex characters, or not a valid
        Ed25519 public key.
    """
    if not isinstance(text, str):
        raise MasterKeyError("the master public key must be text")
    value = text.strip().lower()
    if _PUBLIC_KEY_HEX.fullmatch(value) is None:
        if value.startswith(MASTER_KEY_PREFIX):
            raise MasterKeyError(
                "this is the master's private key; give the other nodes only its "
                "public key, as python -m dtable master-keygen printed it")
        raise MasterKeyError(
            "the master public key must be 64 hex characters, as python -m dtable "
            "master-keygen prints it")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError:
        raise MasterKeyError("the master public key is not a valid Ed25519 key") from None
    return value
