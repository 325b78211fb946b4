"""``twistd`` that reports its memory on SIGUSR2: ``python bench/memory_probe_twistd.py OUT.json -n hoodyproxy ...``.

Nothing changes in the gateway until the signal: then it writes to ``OUT.json`` its RSS,
glibc's ``mallinfo2`` (bytes in use and free inside the heap) and, per Python type, the
count and shallow size of live gc-tracked objects.  ``bench/ws_idle_quick.py`` diffs two
such reports to price one idle WebSocket by where its bytes are.

Options, in this order, between ``OUT.json`` and twistd's arguments:

``--tracemalloc``
    The first signal also starts tracing Python allocations; each later one dumps what
    was allocated since and is still alive (``OUT.json.trace``, a ``tracemalloc``
    snapshot, by line).  Tracing costs malloc'd memory of its own: read RSS and malloc
    figures from runs without it.
``--trim``
    Call glibc's ``malloc_trim(0)`` before each report (and time it): what RSS would be
    if the gateway gave free heap pages back.
``--patch NAME`` (repeatable)
    Apply an experiment of ``bench/ws_idle_patches.py`` before twistd starts.
"""

import ctypes
import gc
import json
import signal
import sys


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def report(out: str, trace: bool, trim: bool) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    gc.collect()
    trim_s = None
    if trim:
        import time
        started = time.perf_counter()
        libc.malloc_trim(0)
        trim_s = time.perf_counter() - started
    info = libc.mallinfo2()
    types: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        tp = type(obj)
        name = f"{tp.__module__}.{tp.__qualname__}"
        size = sys.getsizeof(obj)
        entry = types.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += size
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(out + ".tmp", "w") as f:
        json.dump({"rss_kib": rss, "malloc_in_use": info.uordblks + info.hblkhd,
                   "malloc_free": info.fordblks, "arena": info.arena, "trim_s": trim_s, "types": types}, f)
    import os
    import tracemalloc
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(out + ".trace")
    elif trace:
        tracemalloc.start(4)
    os.replace(out + ".tmp", out)


def main() -> None:
    out = sys.argv[1]
    rest = sys.argv[2:]
    trace = rest[:1] == ["--tracemalloc"]
    rest = rest[trace:]
    trim = rest[:1] == ["--trim"]
    rest = rest[trim:]
    patches = []
    while rest[:1] == ["--patch"]:
        patches.append(rest[1])
        rest = rest[2:]
    if patches:  # experiments: bench/ws_idle_patches.py
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import ws_idle_patches
        ws_idle_patches.apply(patches)
    sys.argv = ["twistd"] + rest
    signal.signal(signal.SIGUSR2, lambda *_: report(out, trace, trim))
    from twisted.scripts.twistd import run
    run()


if __name__ == "__main__":
    main()
