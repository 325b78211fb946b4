"""``twistd`` under cProfile: ``python bench/profiled_twistd.py OUT.prof -n hoodyproxy ...``.

``python -m cProfile twistd`` writes nothing when twistd is stopped by SIGTERM or SIGINT:
twistd re-raises the signal with its default action once the reactor has stopped
(``twisted.application.app._exitWithSignal``), so the process dies before cProfile's
``finally`` runs.  This wrapper writes the profile first, then lets twistd exit as it would.
"""

import cProfile
import sys


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["twistd"] + sys.argv[2:]
    profile = cProfile.Profile()
    written = []

    def dump() -> None:
        if not written:
            profile.disable()
            profile.dump_stats(out)
            written.append(out)

    from twisted.application import app
    exit_with_signal = app._exitWithSignal

    def dump_then_exit(sig) -> None:
        dump()
        exit_with_signal(sig)

    app._exitWithSignal = dump_then_exit
    from twisted.scripts.twistd import run
    profile.enable()
    try:
        run()
    finally:
        dump()


if __name__ == "__main__":
    main()
