"""Twisted's stock ``twisted.web.proxy.ReverseProxyResource`` as a benchmark peer.

    python bench/twisted_rpr.py --backend PORT --plain PORT --tls PORT --cert PEM --key PEM [--keep-alive]

One process, the default (epoll) reactor, a ``Site`` whose root is a
``ReverseProxyResource`` to ``127.0.0.1:BACKEND``; plain HTTP on ``--plain`` and TLS
(ALPN h2 and http/1.1, so HTTP/2 through Twisted's own H2 support) on ``--tls``.

Stock, ``ReverseProxyResource`` closes both connections after every request: its
``ProxyClient`` sends ``Connection: close`` upstream and copies the backend's
``Connection: close`` answer into the response, so the client's connection is closed
too (a TLS handshake per request).  ``--keep-alive`` drops the hop-by-hop headers of the
backend's response (``Connection``, ``Keep-Alive``) so that clients keep their
connection; the upstream side stays one connection per request, as stock.
Prints ``listening`` once both ports are bound.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import quote

HOP_BY_HOP = {b"connection", b"keep-alive"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", type=int, required=True)
    parser.add_argument("--plain", type=int, required=True)
    parser.add_argument("--tls", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--keep-alive", action="store_true")
    args = parser.parse_args(argv)

    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor, ssl
    from twisted.web import proxy, server

    class KeepAliveProxyClient(proxy.ProxyClient):
        def handleHeader(self, key, value):
            if key.lower() not in HOP_BY_HOP:
                super().handleHeader(key, value)

    class KeepAliveProxyClientFactory(proxy.ProxyClientFactory):
        protocol = KeepAliveProxyClient

    class KeepAliveReverseProxyResource(proxy.ReverseProxyResource):
        proxyClientFactoryClass = KeepAliveProxyClientFactory

        def getChild(self, path, request):
            # as stock, but children are of this class too (stock names its own class)
            return type(self)(self.host, self.port, self.path + b"/" + quote(path, safe=b"").encode("utf-8"),
                              self.reactor)

    cls = KeepAliveReverseProxyResource if args.keep_alive else proxy.ReverseProxyResource
    resource = cls("127.0.0.1", args.backend, b"")
    site = server.Site(resource)
    site.log = lambda request: None  # no access log (the other peers have none either)

    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    with open(args.key, "rb") as f:
        key_pem = f.read()
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original,
                                     certificate=cert.original,
                                     acceptableProtocols=[b"h2", b"http/1.1"])
    reactor.listenTCP(args.plain, site, backlog=1024, interface="127.0.0.1")
    reactor.listenSSL(args.tls, site, options, backlog=1024, interface="127.0.0.1")
    print("listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
