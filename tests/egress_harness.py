"""Upstream servers for egress tests: plain HTTP and HTTPS on the host's loopback.

Each records the headers of every request it gets and answers with a JSON
echo of the request (its path and the headers the test names), so a test can
see both what the server received and what came back into the isolate. The
HTTPS server's certificate is signed by a CA of the test's own, which the
proxy trusts upstream through ``STOCKADE_EGRESS_CA_FILE``; names resolve
through ``STOCKADE_EGRESS_HOSTS_FILE`` (``*.stockade.test`` -> 127.0.0.1).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import ssl
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ("api.stockade.test", "other.stockade.test", "echo.stockade.test")
SECRET_VALUE = "sk-live-7f3a9c2e1b8d4f6a0c5e"  # what the tests' secret holds (never seen inside)
ODD_VALUE = 'sk-odd-"q\\9<Z>&/x'  # one JSON, URLs and HTML write escaped


@dataclass
class Upstream:
    port: int
    scheme: str
    seen: list[dict[str, str]] = field(default_factory=list)  # headers (lowercased names) per request

    def url(self, host: str, path: str = "/") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _handler(upstream: Upstream) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait for an ACK

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            upstream.seen.append(headers)
            body = json.dumps({"path": self.path, "headers": headers}).encode()
            if "/leak" in self.path:  # an upstream that hands the secret's value back, unasked
                body = f"the key is {SECRET_VALUE}\n".encode()
            # As servers do: gzip when the client accepts it; /gzip-anyway compresses whatever it asked.
            gzipped = "gzip" in headers.get("accept-encoding", "") or self.path.startswith("/gzip-anyway")
            if gzipped:
                body = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Echo-Authorization", headers.get("authorization", ""))  # as an error page might
            if self.path.startswith("/name-echo"):  # the token as a header's name
                self.send_header(f"X-{headers.get('authorization', '').split(' ')[-1]}", "1")
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
                if self.path.startswith("/gzip-anyway-split"):  # a second header that says otherwise
                    self.send_header("Content-Encoding", "identity")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _certificates(where: str) -> tuple[str, str, str]:
    """A CA, and a leaf for NAMES signed by it: the paths of (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stockade egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tuple(os.path.join(where, n) for n in ("ca.pem", "leaf.pem", "leaf.key"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    return paths  # type: ignore[return-value]


@dataclass
class Upstreams:
    http: Upstream
    https: Upstream
    dir: str
    secrets_file: str


def serve_upstreams() -> Iterator[Upstreams]:
    """Both servers, the hosts file, the CA and a 0600 secrets file; the environment set to use them."""
    where = tempfile.mkdtemp(prefix="stockade-egress-test-")
    os.chmod(where, 0o755)  # the CA and the hosts file are public: a daemon that gave root up reads them
    ca, leaf, key = _certificates(where)
    os.chmod(ca, 0o644)
    servers = []
    plain = Upstream(0, "http")
    secure = Upstream(0, "https")
    for upstream in (plain, secure):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream))
        server.daemon_threads = True
        if upstream.scheme == "https":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(leaf, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        upstream.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    hosts = os.path.join(where, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 " + " ".join(NAMES) + "\n")
    os.chmod(hosts, 0o644)
    secrets_file = os.path.join(where, "secrets.json")
    fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        bound = ["*.stockade.test"]  # a daemon's callers are refused a secret stored with no hosts
        json.dump({"API_KEY": {"value": SECRET_VALUE, "hosts": bound},
                   "OTHER_KEY": {"value": "sk-other-0d1e2f3a4b5c", "hosts": bound},
                   "ODD_KEY": {"value": ODD_VALUE, "hosts": bound}}, f)  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("STOCKADE_EGRESS_HOSTS_FILE", "STOCKADE_EGRESS_CA_FILE",
                                            "STOCKADE_EGRESS_NETWORKS", "STOCKADE_SECRETS_FILE",
                                            "STOCKADE_BROKER_SOCKET")}  # fmt: skip
    # The upstreams listen on the host's loopback: a daemon's callers may name it only where the
    # host lets them (unset, a daemon lets them reach public addresses alone).
    os.environ.update({"STOCKADE_EGRESS_HOSTS_FILE": hosts, "STOCKADE_EGRESS_CA_FILE": ca,
                       "STOCKADE_EGRESS_NETWORKS": "127.0.0.0/8", "STOCKADE_SECRETS_FILE": secrets_file})  # fmt: skip
    os.environ.pop("STOCKADE_BROKER_SOCKET", None)
    try:
        yield Upstreams(plain, secure, where, secrets_file)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for server in servers:
            server.shutdown()
            server.server_close()
        for name in os.listdir(where):
            os.unlink(os.path.join(where, name))
        os.rmdir(where)


@dataclass
class Index:
    port: int
    dir: str


@contextlib.contextmanager
def serve_index() -> Iterator[Index]:
    """A PEP 503 package index on the host's loopback with one real wheel, ``stockade-probe``."""
    where = tempfile.mkdtemp(prefix="stockade-index-")
    project = os.path.join(where, "simple", "stockade-probe")
    os.makedirs(project)
    wheel = "stockade_probe-1.0-py3-none-any.whl"
    _write_wheel(os.path.join(project, wheel))
    with open(os.path.join(project, "index.html"), "w") as f:
        f.write(f'<!DOCTYPE html><html><body><a href="{wheel}">{wheel}</a></body></html>\n')
    with open(os.path.join(where, "simple", "index.html"), "w") as f:
        f.write('<!DOCTYPE html><html><body><a href="stockade-probe/">stockade-probe</a></body></html>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=where))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Index(server.server_address[1], where)
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(where)


def _write_wheel(path: str) -> None:
    files = {
        "stockade_probe/__init__.py": b"ANSWER = 42\n",
        "stockade_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: stockade-probe\nVersion: 1.0\n",
        "stockade_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: stockade-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("stockade_probe-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("stockade_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
