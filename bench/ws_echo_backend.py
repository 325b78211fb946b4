"""A WebSocket echo service for the benchmarks: the demo's autobahn echo at ``/echo``.

    python bench/ws_echo_backend.py [--port PORT] [--tls-port PORT --cert PEM --key PEM]

Runs in its own process (so its CPU and memory are never counted as the proxy's) and
prints ``listening on N`` (the plain port) once its ports are bound.  127.0.0.1 only.
The proxies under test terminate TLS and talk plain HTTP to ``--port``; the optional TLS
port is the "direct over TLS" reference.  The service is
``hoodyproxy.demo.make_demo_site``: autobahn's echo protocol, text and binary.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    # 10,000 idle WebSockets end here too: take the whole hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor, ssl

    from hoodyproxy.demo import make_demo_site

    site = make_demo_site(reactor)
    site.log = lambda request: None
    listening = reactor.listenTCP(args.port, site, backlog=4096, interface="127.0.0.1")
    if args.tls_port is not None:
        with open(args.cert, "rb") as f, open(args.key, "rb") as g:
            cert = ssl.PrivateCertificate.loadPEM(f.read() + g.read())
        options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                         acceptableProtocols=[b"http/1.1"])
        reactor.listenSSL(args.tls_port, site, options, backlog=4096, interface="127.0.0.1")
    print(f"listening on {listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
