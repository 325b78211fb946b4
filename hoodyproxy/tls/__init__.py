"""TLS for the gateway: development certificates, SNI certificate selection, listening."""

from hoodyproxy.tls.context import CertificateStore, SNIContextFactory, listen_tls, server_name
from hoodyproxy.tls.devca import DevCertificates, ensure_dev_certificates, write_atomic

__all__ = [
    "CertificateStore",
    "DevCertificates",
    "SNIContextFactory",
    "ensure_dev_certificates",
    "listen_tls",
    "server_name",
    "write_atomic",
]
