"""A real ACME server for the tests: Debian's ``pebble`` with ``pebble-challtestsrv`` as its DNS.

Both run on loopback, started and stopped by the test that asked (``addCleanup``).
challtestsrv answers every A query with 127.0.0.1 (and no AAAA: ``-defaultIPv6 ""``),
so pebble validates every domain against the test's own listeners: its ``httpPort``
and ``tlsPort`` are the ports the test passes in.  Pebble serves HTTPS with a
certificate this module generates (the Debian package ships none); that CA is the
``ca_bundle`` of the ACME client.  Pebble's issuing root, fresh at each start, is
:meth:`Pebble.root_pem` (its management API's ``/roots/0``).

ACME traffic goes through a counting TCP relay (:attr:`Pebble.connections`), so a test
can assert that nothing at all was sent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import ssl
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import SkipTest

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


def require_pebble() -> None:
    """Skip the calling test when pebble or the acme package is missing (with the reason)."""
    for path in (PEBBLE, CHALLTESTSRV):
        if not os.access(path, os.X_OK):
            raise SkipTest(f"{path} is not installed (apt-get install pebble)")
    try:
        import acme.client  # noqa: F401
    except ImportError:
        raise SkipTest("the acme package is not installed (pip install acme)") from None


def free_port(kind: int = socket.SOCK_STREAM, both: bool = False) -> int:
    """A loopback port free now (for TCP, and for UDP too with ``both``)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not both:
                return port
            other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
            try:
                with socket.socket(socket.AF_INET, other) as o:
                    o.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _server_certificate(directory: str) -> tuple[str, str, str]:
    """A CA and a leaf for 127.0.0.1/localhost: (ca.pem, cert.pem, key.pem)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hoodyproxy test pebble CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths  # type: ignore[return-value]


class _CountingRelay(ProxyFactory):
    """A TCP relay to pebble's ACME port that counts the connections it relays."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


class Pebble:
    """pebble + pebble-challtestsrv on loopback, validating against ``http_port``/``tls_port``.

    ``validity``: seconds issued certificates are valid (pebble's
    ``certificateValidityPeriod``; None: pebble's default of years).
    """

    def __init__(self, case, http_port: int, tls_port: int, *, validity: int | None = None) -> None:
        require_pebble()
        self.case = case
        self.http_port, self.tls_port, self.validity = http_port, tls_port, validity
        self.dir = tempfile.mkdtemp(prefix="hoodyproxy-pebble-")
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.ca_bundle, self._cert, self._key = _server_certificate(self.dir)
        self.dns_port = free_port(both=True)
        self.challtestsrv_port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.relay = _CountingRelay("127.0.0.1", 0)
        self._relay_port = None
        self.acme_port = self.management_port = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> "Pebble":
        """Start challtestsrv (once) and pebble; fires when pebble's directory answers."""
        if not any(p.args[0] == CHALLTESTSRV for p in self.processes if p.poll() is None):
            self._spawn("challtestsrv", [CHALLTESTSRV, "-defaultIPv6", "", "-defaultIPv4", "127.0.0.1",
                                         "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                                         "-tlsalpn01", "", "-management", f"127.0.0.1:{self.challtestsrv_port}"], {})
        # A port picked free can be taken by a parallel test before pebble binds it: try again.
        for attempt in range(3):
            try:
                return await self._start_pebble()
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                self._stop_process(self.pebble)
        raise AssertionError("unreachable")

    async def _start_pebble(self) -> "Pebble":
        self.acme_port, self.management_port = free_port(), free_port()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": self._cert, "privateKey": self._key,
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        if self.validity is not None:
            config["pebble"]["certificateValidityPeriod"] = self.validity
        path = os.path.join(self.dir, "pebble-config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.pebble = self._spawn("pebble", [PEBBLE, "-config", path, "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                                  env)
        self.relay.port = self.acme_port
        if self._relay_port is None:
            self._relay_port = reactor.listenTCP(0, self.relay, interface="127.0.0.1")
            self.case.addCleanup(self._relay_port.stopListening)
        await deferToThread(self._wait_ready)
        return self

    def _spawn(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **env}, cwd=self.dir)
        log.close()
        self.processes.append(process)
        self.case.addCleanup(self._stop_process, process)
        return process

    @staticmethod
    def _stop_process(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def stop_pebble(self) -> None:
        """Stop pebble (the ACME server) only; challtestsrv keeps running."""
        self._stop_process(self.pebble)

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._get(f"https://127.0.0.1:{self.acme_port}/dir")
                self._get(f"https://127.0.0.1:{self.management_port}/roots/0")
                return
            except OSError:
                if self.pebble.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pebble did not start: {self.log('pebble')[-2000:]}") from None
                time.sleep(0.05)

    # -- what tests use -------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        """The directory through the counting relay."""
        return f"https://127.0.0.1:{self._relay_port.getHost().port}/dir"

    @property
    def connections(self) -> int:
        """TCP connections made to the ACME server (through the relay) so far."""
        return self.relay.connections

    def _get(self, url: str, data: bytes | None = None) -> bytes:
        context = ssl.create_default_context(cafile=self.ca_bundle)
        request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
        with opener.open(request, timeout=5) as response:
            return response.read()

    def root_pem(self) -> bytes:
        """Pebble's issuing root (changes at each pebble start)."""
        return self._get(f"https://127.0.0.1:{self.management_port}/roots/0")

    def set_cname(self, host: str, target: str) -> None:
        """Make challtestsrv answer CNAME ``host`` -> ``target``."""
        body = json.dumps({"host": host.rstrip(".") + ".", "target": target.rstrip(".") + "."}).encode()
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                urllib.request.Request(f"http://127.0.0.1:{self.challtestsrv_port}/set-cname", data=body),
                timeout=5) as response:
            response.read()

    def log(self, name: str = "pebble") -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
