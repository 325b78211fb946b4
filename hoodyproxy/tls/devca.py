"""Development certificates: a local CA and a wildcard leaf, generated once on disk."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = timedelta(days=3650)
LEAF_VALIDITY = timedelta(days=397)
BACKDATE = timedelta(hours=1)
RENEW_BEFORE = timedelta(days=30)


@dataclass(frozen=True)
class DevCertificates:
    """Paths of the development CA and wildcard leaf; ``generated`` if anything was written."""

    ca_path: str
    cert_path: str
    key_path: str
    generated: bool


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_dev_certificates(directory: str, node: str, zone: str) -> DevCertificates:
    """Make sure ``directory`` holds a CA and a valid leaf for ``*.<node>.<zone>``."""
    domain = f"{node}.{zone}".strip(".").lower()
    if not node or not zone or "*" in domain:
        raise ValueError(f"invalid node/zone: {node!r}/{zone!r}")
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    ca_path, ca_key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca-key.pem")
    cert_path = os.path.join(directory, "wildcard.pem")
    key_path = os.path.join(directory, "wildcard-key.pem")
    now = datetime.now(timezone.utc)
    generated = False

    if os.path.exists(ca_path) and os.path.exists(ca_key_path):
        with open(ca_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        ca_cert, ca_key = _make_ca(domain, now)
        write_atomic(ca_key_path, _key_pem(ca_key), 0o600)
        write_atomic(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        generated = True

    if generated or not _leaf_is_usable(cert_path, key_path, ca_cert, domain, now):
        leaf, leaf_key = _make_leaf(ca_cert, ca_key, domain, now)
        chain = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        write_atomic(key_path, _key_pem(leaf_key), 0o600)
        write_atomic(cert_path, chain)
        generated = True
    return DevCertificates(ca_path, cert_path, key_path, generated)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(domain: str, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hoodyproxy local CA ({domain})")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate, ca_key, domain: str, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}"), x509.DNSName(domain)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _leaf_is_usable(
    cert_path: str, key_path: str, ca_cert: x509.Certificate, domain: str, now: datetime
) -> bool:
    """Whether the leaf on disk is issued by ``ca_cert``, matches its key, covers ``domain``
    and does not expire soon. Missing or unreadable files count as unusable."""
    try:
        with open(cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        leaf.verify_directly_issued_by(ca_cert)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    dns = {n.lower() for n in names.get_values_for_type(x509.DNSName)}
    return (
        {f"*.{domain}", domain} <= dns
        and key.public_key() == leaf.public_key()
        and leaf.not_valid_after_utc - now > RENEW_BEFORE
    )
