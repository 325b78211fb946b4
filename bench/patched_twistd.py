"""``twistd`` with experimental patches, optionally under cProfile (bench/large_bodies.py).

    python bench/patched_twistd.py OUT.prof|- -n hoodyproxy ...

``HOODY_BENCH_PATCHES`` lists the patches, ``,``-separated; each prices one idea for
large bodies from outside the code, before anyone changes the code:

- ``tree=PATH``: import hoodyproxy from another checkout (a "before" in the same run).
- ``readsize=N``: the upstream socket read size (Twisted's default is 64 KiB).
- ``tlswrite[=N]``: TLSMemoryBIOProtocol._write hands OpenSSL memoryview slices of N
  bytes (default 16 KiB, Twisted's; OpenSSL cuts a larger one into 16 KiB records
  itself) with no copy, and drains the memory BIO once per write, in one transport write.
- ``noagg``: writes of 16 KiB or more skip the small-write aggregation (its buffer is
  flushed first, so the order is kept).
"""

import os
import sys


def apply(patches: list[str]) -> None:
    for patch in patches:
        if patch.startswith("tree="):
            sys.path.insert(0, patch[5:])
    for patch in patches:
        name, _, value = patch.partition("=")
        if name == "readsize":
            from hoodyproxy.upstream import http11
            size = int(value)
            made = http11.UpstreamConnection.connectionMade

            def connectionMade(self, made=made, size=size):
                self.transport.bufferSize = size
                made(self)
            http11.UpstreamConnection.connectionMade = connectionMade
        elif name == "tlswrite":
            piece = int(value or 16384)
            from OpenSSL.SSL import Error, WantReadError
            from twisted.protocols import tls
            from twisted.python.failure import Failure

            def _write(self, data, piece=piece):
                if self._lostTLSConnection:
                    return
                view = memoryview(data)
                sent_total = 0
                n = len(view)
                conn = self._tlsConnection
                try:
                    while sent_total < n:
                        try:
                            sent_total += conn.send(view[sent_total:sent_total + piece])
                        except WantReadError:
                            self._bufferedWrite(bytes(view[sent_total:]))
                            break
                        except Error:
                            self._tlsShutdownFinished(Failure())
                            return
                finally:
                    out = []
                    while True:
                        try:
                            out.append(conn.bio_read(262144))
                        except WantReadError:
                            break
                    if out and self.transport is not None:
                        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            tls.TLSMemoryBIOProtocol._write = _write
        elif name == "noagg":
            from twisted.protocols import tls
            write = tls._AggregateSmallWrites.write

            def agg_write(self, data, write=write):
                if len(data) >= 16384:
                    self.flush()
                    self._write(data)
                else:
                    write(self, data)
            tls._AggregateSmallWrites.write = agg_write
        elif name and name != "tree":
            raise SystemExit(f"unknown patch {name!r}")


def main() -> None:
    apply([p for p in os.environ.get("HOODY_BENCH_PATCHES", "").split(",") if p])
    if sys.argv[1] != "-":
        import profiled_twistd  # beside this script: the profile written even on SIGTERM
        profiled_twistd.main()
        return
    sys.argv = ["twistd"] + sys.argv[2:]
    from twisted.scripts.twistd import run
    run()


if __name__ == "__main__":
    main()
