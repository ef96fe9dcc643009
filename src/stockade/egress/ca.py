"""A certificate authority of one sandbox's own, for the hosts a secret is bound to.

The proxy terminates TLS for those hosts (and only those) to put the secret's
value in the bound header. The isolate trusts this CA's certificate; its key
stays in the host process that made it and is gone with the sandbox. A CA per
sandbox: what one sandbox learns of its CA serves no other. Its certificates
are limited by name constraints to the hosts it was made for, so even its
key, were it stolen, could vouch for nothing else.

Keys are ECDSA P-256: a CA and a leaf cost about a millisecond each to make.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
import tempfile
import threading
import uuid
from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_LEAVES = 64
VALIDITY = datetime.timedelta(days=2)  # far longer than a sandbox lives; short enough to be worthless after


class SandboxCA:
    """A CA for ``hosts`` (names or addresses, no ports), and TLS server contexts for them."""

    def __init__(self, label: str, hosts: list[str]) -> None:
        self.hosts = sorted(set(hosts))
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"stockade sandbox {label}"[:64])])
        permitted: list[x509.GeneralName] = []
        for host in self.hosts:
            address = _address(host)
            if address is None:
                permitted.append(x509.DNSName(host.removeprefix("*.")))
            else:
                width = 32 if address.version == 4 else 128
                permitted.append(x509.IPAddress(ipaddress.ip_network(f"{address}/{width}")))
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()  # the most recent MAX_LEAVES
        self._lock = threading.Lock()

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``host``, signed by this CA (cached)."""
        with self._lock:
            context = self._contexts.get(host)
            if context is None:
                context = self._contexts[host] = self._make_context(host)
                if len(self._contexts) > MAX_LEAVES:  # a wildcard binding names without end
                    self._contexts.popitem(last=False)
            self._contexts.move_to_end(host)
            return context

    def _make_context(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        address = _address(host)
        alt: x509.GeneralName = x509.IPAddress(address) if address is not None else x509.DNSName(host)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 to the isolate
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # ssl loads a chain and key from files only: a private, unlinked-at-once pair.
        with tempfile.TemporaryDirectory(prefix="stockade-leaf-") as where:
            os.chmod(where, 0o700)
            cert_path, key_path = os.path.join(where, "cert.pem"), os.path.join(where, "key.pem")
            for path, data in ((cert_path, chain), (key_path, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert_path, key_path)
        return context


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@functools.cache
def host_roots() -> bytes:
    """The host's CA bundle (read once), ending in a newline: what tunnels to other hosts verify against."""
    bundle = b""
    for path in (ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                bundle = f.read()
            break
    return bundle + b"\n" if bundle and not bundle.endswith(b"\n") else bundle


def ca_entry(pem: bytes) -> bytes:
    """A sandbox CA's entry in the bundle, after the host's roots."""
    return b"# stockade: this sandbox's egress proxy\n" + pem


def trust_bundle(extra_pem: bytes) -> bytes:
    """The host's CA bundle with ``extra_pem`` added: what an isolate behind the proxy trusts."""
    return host_roots() + ca_entry(extra_pem)


def new_label() -> str:
    return uuid.uuid4().hex[:12]
