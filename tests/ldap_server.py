"""A throwaway OpenLDAP server for tests: slapd with an mdb database in a temporary directory.

``start_slapd(case)`` writes slapd.conf, loads the entries below with slapadd, starts
``slapd -h ldap://127.0.0.1:PORT/ -d 0`` and stops it (and removes the directory) in the
test's cleanup.  It skips the test when slapd is not installed (Debian: ``slapd``).

The directory (suffix ``dc=example,dc=org``)::

    uid=alice,ou=people   password alice-password-1   member of cn=staff
    uid=bob,ou=people     password bob-password-2     not in cn=staff; uniqueMember of cn=ops
    uid=admin,ou=people   password admin-password-3
    uid=carol\,admin,ou=people  password carol-password-4  (a username with a DN metacharacter)
    cn=staff,ou=groups    groupOfNames
    cn=ops,ou=groups      groupOfUniqueNames
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
ROOT_DN = f"cn=root,{SUFFIX}"
ROOT_PASSWORD = "root-password-0"
SERVICE_DN = f"cn=gateway,{SUFFIX}"
SERVICE_PASSWORD = "gateway-password-9"
USERS = {"alice": "alice-password-1", "bob": "bob-password-2", "admin": "admin-password-3",
         "carol,admin": "carol-password-4"}

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/libexec", "/usr/libexec")
_MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/lib/openldap",
                "/usr/local/libexec/openldap")
_SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _first_dir(candidates: tuple[str, ...], marker: str) -> str | None:
    for directory in candidates:
        if os.path.exists(os.path.join(directory, marker)):
            return directory
    return None


def _config(base: str, schema_dir: str, module_dir: str | None) -> str:
    lines = [f"include {schema_dir}/{name}.schema"
             for name in ("core", "cosine", "nis", "inetorgperson")]
    if module_dir:
        lines += [f"modulepath {module_dir}", "moduleload back_mdb"]
    lines += [
        f"pidfile {base}/slapd.pid",
        f"argsfile {base}/slapd.args",
        "database mdb",
        "maxsize 16777216",
        f'suffix "{SUFFIX}"',
        f'rootdn "{ROOT_DN}"',
        f"rootpw {ROOT_PASSWORD}",
        f"directory {base}/db",
        # Passwords: usable to bind, readable by nobody.  Everything else: readable.
        "access to attrs=userPassword by anonymous auth by * none",
        "access to * by * read",
    ]
    return "\n".join(lines) + "\n"


def _ldif() -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: person\ncn: gateway\nsn: gateway\n"
        f"userPassword: {SERVICE_PASSWORD}\n",
    ]
    for name, password in USERS.items():
        rdn = name.replace(",", "\\,")
        entries.append(f"dn: uid={rdn},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {name}\n"
                       f"cn: {name}\nsn: {name}\nuserPassword: {password}\n")
    entries.append(f"dn: cn=staff,{GROUPS}\nobjectClass: groupOfNames\ncn: staff\n"
                   f"member: uid=alice,{PEOPLE}\n")
    entries.append(f"dn: cn=ops,{GROUPS}\nobjectClass: groupOfUniqueNames\ncn: ops\n"
                   f"uniqueMember: uid=bob,{PEOPLE}\n")
    return "\n".join(entries)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(process: subprocess.Popen, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _self_signed(base: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (trusted by nobody), as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class Slapd:
    """A running slapd: ``url`` (and ``ldaps_url`` with TLS) to reach it; :meth:`stop`."""

    def __init__(self, process: subprocess.Popen, port: int, tls_port: int | None):
        self.process = process
        self.url = f"ldap://127.0.0.1:{port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{tls_port}" if tls_port else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_slapd(case, tls: bool = False) -> Slapd:
    """A started slapd with the entries above, stopped and removed in ``case``'s cleanup.

    With ``tls``, it also listens for ldaps with a self-signed certificate.
    """
    slapd, slapadd = _program("slapd"), _program("slapadd")
    schema_dir = _first_dir(_SCHEMA_DIRS, "inetorgperson.schema")
    if not slapd or not slapadd or not schema_dir:
        raise SkipTest("slapd is not installed (Debian: apt-get install slapd)")
    module_dir = _first_dir(_MODULE_DIRS, "back_mdb.la")
    base = tempfile.mkdtemp(prefix="hoodyproxy-slapd-")
    case.addCleanup(shutil.rmtree, base, True)
    os.mkdir(os.path.join(base, "db"))
    conf = os.path.join(base, "slapd.conf")
    with open(conf, "w") as f:
        f.write(_config(base, schema_dir, module_dir))
        if tls:
            cert_path, key_path = _self_signed(base)
            f.write(f"TLSCertificateFile {cert_path}\nTLSCertificateKeyFile {key_path}\n")
    ldif = os.path.join(base, "data.ldif")
    with open(ldif, "w") as f:
        f.write(_ldif())
    loaded = subprocess.run([slapadd, "-f", conf, "-l", ldif], capture_output=True, text=True,
                            timeout=30)
    if loaded.returncode != 0:
        raise AssertionError(f"slapadd failed: {loaded.stderr}")
    output = os.path.join(base, "slapd.log")
    for _ in range(3):  # the ports are free when picked, but something may take them first
        port, tls_port = _free_port(), (_free_port() if tls else None)
        urls = f"ldap://127.0.0.1:{port}/" + (f" ldaps://127.0.0.1:{tls_port}/" if tls else "")
        with open(output, "wb") as log:
            # -d 0: stay in the foreground (no fork), log nothing.
            process = subprocess.Popen([slapd, "-f", conf, "-h", urls, "-d", "0"],
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        server = Slapd(process, port, tls_port)
        deadline = time.monotonic() + 10
        if all(_wait_for_port(process, p, deadline) for p in (port, tls_port) if p):
            case.addCleanup(server.stop)
            return server
        server.stop()
    with open(output, errors="replace") as log:
        raise AssertionError(f"slapd did not start: {log.read()}")
