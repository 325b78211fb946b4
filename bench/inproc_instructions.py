"""The gateway's own work per request as a count of CPU instructions: a figure noise cannot move.

    python -m bench.inproc_instructions [--tree PATH ...] [--fields small|browser]
                                        [--tap none|other|all] [--requests N]
                                        [--response small|nginx]

Runs ``bench/gateway_inproc.py`` (one node's request path in process, no sockets, TLS or
kernel) under ``valgrind --tool=callgrind`` twice, for ``N`` and ``3N`` requests, and
prints the difference in instructions divided by ``2N``: start-up, imports and the warm-up
cancel out, and what is left is the instructions one request costs.  Unlike CPU time on a
shared VM (whose figures here move by 10-20 % between runs) it repeats to about 1 %
(the clock still decides a few branches: the audit line's second, the limiter's refill),
so a change worth a few per cent shows.  It does not weigh instructions by what they
cost (cache misses, branch mispredictions); the live benchmark (``python -m bench``)
stays the judge of speed.

``--tree`` measures another checkout's ``hoodyproxy`` with this checkout's bench script
(``git worktree add /tmp/before <commit>`` makes one), once per ``--tree``, this checkout
last: a before and after in one command.  valgrind is a Debian package
(``DEBIAN_BENCH_PACKAGES`` in the Makefile); a run takes about a minute per tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_COLLECTED = re.compile(r"Collected\s*:\s*([\d,]+)")


def instructions(tree: str, requests: int, fields: str, tap: str, response: str = "small") -> int:
    """Instructions callgrind counted for one run of ``requests`` requests from ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, ROOT]), PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory(prefix="hoodyproxy-callgrind-") as out:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={os.path.join(out, 'cg.out')}",
               sys.executable, os.path.join(HERE, "gateway_inproc.py"), "--requests", str(requests),
               "--runs", "1", "--fields", fields, "--tap", tap]
        if response != "small":
            cmd += ["--response", response]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(tree: str, requests: int, fields: str, tap: str, response: str = "small") -> int:
    return (instructions(tree, 3 * requests, fields, tap, response)
            - instructions(tree, requests, fields, tap, response)) // (2 * requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc_instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="another checkout to measure first (repeatable)")
    parser.add_argument("--fields", choices=("small", "browser"), default="small")
    parser.add_argument("--tap", choices=("none", "other", "all"), default="none")
    parser.add_argument("--requests", type=int, default=1000, help="N: the runs are N and 3N requests (default 1,000)")
    parser.add_argument("--response", choices=("small", "nginx"), default="small",
                        help="the container's answer: three fields, or the five nginx sends")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind; make bench installs it as root)",
              file=sys.stderr)
        return 2
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    for tree in args.tree:
        if not os.path.isdir(os.path.join(tree, "hoodyproxy")):
            parser.error(f"--tree {tree}: no hoodyproxy package there")
    results = []
    for tree in [os.path.abspath(t) for t in args.tree] + [ROOT]:
        n = per_request(tree, args.requests, args.fields, args.tap, args.response)
        results.append(n)
        print(f"{n:>9,} instructions per request  {tree}  ({args.fields} fields; {args.response} response; "
              f"tap: {args.tap})", flush=True)
    if len(results) > 1:
        print(f"this checkout / the first tree: {results[-1] / results[0]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
