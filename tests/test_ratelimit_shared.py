"""Specification of shared rate limits among workers (``[ratelimit] shared = true``).

Each worker checks locally; every ``shared_sync_ms`` it sends what it charged, through
worker 0, to the others, which apply it (hoodyproxy.limits.shared).  In order: the keys on
the wire; two or more ``Limiters`` exchanging charges by hand (a fake clock; the bound of
hoodyproxy.limits.shared checked against a simulation); the hub and a worker's end on
fake transports; both over a real UNIX socket with the reactor (polled with a bounded
wait, never timed); a real node, ``twistd --workers 2``, with and without sharing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import ssl
import stat
import tempfile
import time

from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from hoodyproxy.limits import Limit, Limiters, RateLimitSettings, address_key, parse_rate, parse_rate_limits, \
    username_key
from hoodyproxy.limits import _sharing, shared
from hoodyproxy.limits._sharing import (MAX_KEY_LENGTH, MAX_PENDING_KEYS, decode_batch, decode_key,
                                        encode_batch, encode_key)

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "0123456789abcdef01234567"


def limit(rate: str, burst: int) -> Limit:
    return Limit(parse_rate(rate), burst)


def sharing(workers: int = 2, clock=None, **changes) -> Limiters:
    """One worker's Limiters with ``shared = true`` among ``workers``."""
    values = {"per_address": limit("1/min", 10), "shared": True}
    values.update(changes)
    return Limiters(RateLimitSettings(**values), clock=clock or Clock(), workers=workers)


def exchange(source: Limiters, *targets: Limiters, worker: int = 1) -> None:
    """What the socket does: ``source``'s batch, as a line, applied to each target."""
    charges = source.drain_charges()
    if charges:
        line, skipped = encode_batch(charges, worker)
        assert skipped == 0
        for target in targets:
            target.apply_charges(decode_batch(line)[1])


def log_lines(case: unittest.SynchronousTestCase) -> list[dict]:
    """Every log event from now to the end of the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def said(events: list[dict], text: str) -> int:
    """How many of ``events`` say ``text``."""
    return len([e for e in events if text in (e.get("log_format") or "")])


def spend(limiters: Limiters, n: int, ip: str = "192.0.2.1") -> int:
    """How many of ``n`` requests from ``ip`` pass."""
    return sum(limiters.check_client(ip).allowed for _ in range(n))


class Keys(unittest.SynchronousTestCase):
    """Keys travel as JSON and come back equal, of the same type, for every kind of key."""

    def test_every_kind_of_key_round_trips(self):
        """IPv4 strings, IPv6 networks (bytes), usernames (folded, digested, undecodable),
        per-set pairs and principals come back equal and of the same type."""
        keys = [
            "192.0.2.1",
            address_key("2001:db8::1"), address_key("2001:db8::1", 48), address_key("2001:db8::1", 61),
            username_key("Alice"), username_key("x" * 100), username_key(b"\xff\xfe caf\xc3\xa9"),
            "caf\u00e9 \U0001f600", "",
            (CONTAINER, "192.0.2.1"), (CONTAINER, address_key("2001:db8::5")),
            (CONTAINER, "http-3000"), ("project", PROJECT, "devs", "user:alice"),
            7, None, True, 1.5, (1, (2, (b"\x00", None))),
        ]
        for key in keys:
            back = decode_key(encode_key(key))
            self.assertEqual(back, key)
            self.assertIs(type(back), type(key), key)
            line, skipped = encode_batch({"address": {key: (1.0, 2.0)}}, 1)
            self.assertEqual(skipped, 0)
            self.assertEqual(decode_batch(line), (1, {"address": {key: (1.0, 2.0)}}))

    def test_ipv4_and_ipv6_keys_stay_apart(self):
        """An IPv6 network's bytes never decode to a string that could be an IPv4 key."""
        v6 = address_key("2001:db8::1")
        self.assertIsInstance(decode_key(encode_key(v6)), bytes)
        self.assertNotEqual(decode_key(encode_key(v6)), decode_key(encode_key(v6.hex())))

    def test_keys_that_cannot_travel_are_left_out(self):
        """A key of another type, or longer than MAX_KEY_LENGTH, is left out and counted."""
        line, skipped = encode_batch({"principal": {frozenset(): (1.0, 1.0), "x" * (MAX_KEY_LENGTH + 1): (1.0, 1.0),
                                                    "ok": (1.0, 1.0)}}, 2)
        self.assertEqual(skipped, 2)
        self.assertEqual(decode_batch(line), (2, {"principal": {"ok": (1.0, 1.0)}}))

    def test_lines_that_are_not_batches_are_refused(self):
        """Anything but a well-formed batch raises ValueError (the receiver drops it whole)."""
        for line in [b"", b"nope", b"[]", b'{"c": []}', b'{"w": "1", "c": {}}',
                     b'{"c": {"address": {}}}', b'{"c": {"address": [["k", 1]]}}',
                     b'{"c": {"address": [["k", -1, 1]]}}', b'{"c": {"address": [["k", "1", 1]]}}',
                     b'{"c": {"address": [["k", 1, true]]}}', b'{"c": {"address": [[{"b": "!!"}, 1, 1]]}}',
                     b'{"c": {"address": [[{"x": "AA=="}, 1, 1]]}}', b'{"c": {"address": [[[[[[["k"]]]]], 1, 1]]}}',
                     b'{"c": {"address": [["k", NaN, 1]]}}', b"[" * 100_000]:
            with self.assertRaises(ValueError, msg=line[:60]):
                decode_batch(line)

    def test_a_key_twice_adds_up(self):
        """The same key twice in one table is charged the sum."""
        line = b'{"w":1,"c":{"address":[["k",1.5,9],["k",2,10]]}}'
        self.assertEqual(decode_batch(line)[1], {"address": {"k": (3.5, 10.0)}})


class Exchange(unittest.SynchronousTestCase):
    """Two or more workers' Limiters, their charges carried by hand: a shared budget."""

    def test_charges_of_one_worker_reach_the_other(self):
        """Worker A spends 6 of a burst of 10; once B has A's batch, B lets 4 through."""
        clock = Clock()
        a, b = sharing(clock=clock), sharing(clock=clock)
        self.assertEqual(spend(a, 6), 6)
        exchange(a, b)
        self.assertEqual(spend(b, 10), 4)
        exchange(b, a)
        self.assertEqual(spend(a, 1), 0)

    def test_without_the_exchange_each_worker_has_the_whole_budget(self):
        """Every worker enforces the full budget, not a share of it: 10 each, alone."""
        a, b = sharing(), sharing()
        self.assertEqual((spend(a, 20), spend(b, 20)), (10, 10))

    def test_applied_charges_do_not_echo(self):
        """What a worker applies is not in its own next batch."""
        a, b = sharing(), sharing()
        spend(a, 3)
        exchange(a, b)
        self.assertEqual(b.drain_charges(), {})
        self.assertEqual(a.drain_charges(), {})

    def test_every_table_is_shared(self):
        """Failed authentications (per address and per user) and the per-set limits too."""
        clock = Clock()
        a, b = sharing(clock=clock), sharing(clock=clock)
        for _ in range(100):  # the user's burst; five times the address's
            a.record_failed_auth("192.0.2.1", "Alice")
        rl = parse_rate_limits({"per_client": {"rate": "1/min", "burst": 2},
                                "per_principal": {"rate": "1/min", "burst": 2}})
        for _ in range(2):
            a.check_after_decision(rl, "2001:db8::1", ("project", PROJECT, "g", "user:bob"), PROJECT, CONTAINER)
        exchange(a, b)
        self.assertFalse(b.check_failed_auth("192.0.2.1").allowed)
        self.assertFalse(b.check_failed_auth("192.0.2.9", "alice").allowed)
        verdict = b.check_after_decision(rl, "2001:db8::2", ("project", PROJECT, "g", "user:carol"), PROJECT,
                                         CONTAINER)
        self.assertEqual(verdict.limiter, "client")  # the same /64
        verdict = b.check_after_decision(rl, "192.0.2.3", ("project", PROJECT, "g", "user:bob"), PROJECT, CONTAINER)
        self.assertEqual(verdict.limiter, "principal")

    def test_a_refused_request_sends_nothing(self):
        """A request refused by a later limit gives back what the earlier ones counted,
        and so is not in the batch either."""
        a = sharing()
        rl = parse_rate_limits({"per_client": {"rate": "1/min", "burst": 5},
                                "per_container": {"rate": "1/min", "burst": 1}})
        a.check_after_decision(rl, "192.0.2.1", None, PROJECT, CONTAINER)
        self.assertFalse(a.check_after_decision(rl, "192.0.2.2", None, PROJECT, CONTAINER).allowed)
        charges = a.drain_charges()
        self.assertEqual(set(charges["client"]), {(CONTAINER, "192.0.2.1")})
        self.assertEqual(set(charges["container"]), {CONTAINER})

    def test_debt_of_a_concurrent_burst_is_paid_back(self):
        """Both workers spend the whole burst before hearing of each other (20 pass: the
        bound's one-off excess); afterwards each refuses with the true wait, until the
        node's 20 requests are paid for at the node's rate, then lets one through."""
        clock = Clock()
        a, b = sharing(clock=clock), sharing(clock=clock)
        self.assertEqual((spend(a, 10), spend(b, 10)), (10, 10))
        exchange(a, b)
        exchange(b, a)
        verdict = a.check_client("192.0.2.1")
        self.assertFalse(verdict.allowed)
        self.assertEqual(verdict.retry_after, 11 * 60)  # 20 minutes of debt, less the burst, plus one
        clock.advance(11 * 60 - 1)
        self.assertEqual((spend(a, 1), spend(b, 1)), (0, 0))
        clock.advance(1)
        self.assertEqual(spend(a, 1), 1)
        exchange(a, b)
        self.assertEqual(spend(b, 1), 0)

    def test_a_loosened_limit_still_applies(self):
        """Debt beyond what N workers can build (a stricter limit's) is forgiven at once,
        as in an unshared table."""
        clock = Clock()
        a = sharing(clock=clock, per_address=limit("1/h", 10))
        spend(a, 10)
        loose = Limiters(RateLimitSettings(per_address=limit("100/s", 10), shared=True), clock=clock, workers=2)
        loose.address = a.address
        self.assertEqual(spend(loose, 1), 0)
        self.assertEqual(spend(loose, 1), 0)
        clock.advance(0.01)
        self.assertEqual(spend(loose, 1), 1)

    def test_batches_are_bounded_and_the_rest_follows(self):
        """At most max_keys keys a batch, shared fairly among the tables; the rest in the
        next batches, merged with what was charged meanwhile."""
        a = sharing(per_address=limit("100/s", 10))
        for n in range(3000):
            a.check_client(f"10.0.{n // 256}.{n % 256}")
            a.record_failed_auth(f"10.1.{n // 256}.{n % 256}")
        first = a.drain_charges(max_keys=1000)
        self.assertEqual({name: len(keys) for name, keys in first.items()}, {"address": 500, "auth-address": 500})
        a.check_client("10.0.11.183")  # the last, still waiting: merged into its entry
        rest = [a.drain_charges(max_keys=1000) for _ in range(6)]
        self.assertEqual([sum(map(len, batch.values())) for batch in rest], [1000] * 5 + [0])
        self.assertEqual(first["address"]["10.0.0.0"][0], 0.01)
        self.assertEqual(rest[4]["address"]["10.0.11.183"][0], 0.02)
        sent = [key for batch in [first, *rest] for key in batch.get("address", {})]
        self.assertEqual(len(sent), len(set(sent)))
        self.assertEqual(len(sent), 3000)

    def test_waiting_keys_are_bounded(self):
        """A table holds at most MAX_PENDING_KEYS keys waiting; charges to more are not
        shared, and counted."""
        a = sharing(per_address=limit("100/s", 10))
        for n in range(MAX_PENDING_KEYS + 10):
            a.check_client(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        self.assertEqual(len(a.address.pending), MAX_PENDING_KEYS)
        self.assertEqual(a.address.unshared, 10)

    def test_node_wide_bound_holds(self):
        """A simulation (several seeds): N workers, random arrivals spread over them,
        batches every interval delivered after a random delay; in every window of t
        seconds the node admits at most b + r*t + (N-1)*(b + r*L), L the longest lag."""
        for seed in range(6):
            rng = random.Random(seed)
            n = 2 + seed % 3
            admitted, lag = simulate(rng, n, rate=10.0, burst=5, interval=0.05, max_delay=0.03, seconds=8.0)
            r, b = 10.0, 5
            for i, start in enumerate(admitted):
                for j in range(i, len(admitted)):
                    t = admitted[j] - start
                    self.assertLessEqual(j - i + 1, b + r * t + (n - 1) * (b + r * lag) + 1e-6,
                                         f"seed {seed}: {j - i + 1} in {t:.3f}s")
            # and the long run is the node's rate, not N times it
            self.assertLessEqual(len(admitted), b + r * 8.0 + (n - 1) * (b + r * lag))
            self.assertGreater(len(admitted), r * 8.0 * 0.9)


def simulate(rng: random.Random, workers: int, rate: float, burst: int, interval: float, max_delay: float,
             seconds: float) -> tuple[list[float], float]:
    """Admission times of one key's requests on a node of ``workers`` sharing workers."""
    now = [0.0]
    nodes = [Limiters(RateLimitSettings(per_address=Limit(parse_rate(rate), burst), shared=True),
                      clock=lambda: now[0], workers=workers) for _ in range(workers)]
    events: list[tuple[float, int, str, object]] = []
    t = 0.0
    while t < seconds:  # arrivals at ~20 times the rate, in clumps
        t += rng.expovariate(rate * 20)
        for _ in range(rng.choice([1, 1, 1, 4])):
            events.append((t, rng.randrange(workers), "request", None))
    ticks = [k * interval + rng.uniform(0, interval) for k in range(int(seconds / interval) + 1)]
    for w in range(workers):
        for tick in ticks:
            events.append((tick + rng.uniform(0, interval / 10), w, "tick", None))
    events.sort(key=lambda e: e[0])
    admitted = []
    i = 0
    while i < len(events):
        at, w, kind, payload = events[i]
        i += 1
        now[0] = at
        if kind == "request":
            if nodes[w].check_client("192.0.2.1").allowed:
                admitted.append(at)
        elif kind == "tick":
            charges = nodes[w].drain_charges()
            if charges:
                line, _ = encode_batch(charges, w)
                for other in range(workers):
                    if other != w:
                        arrival = at + rng.uniform(0, max_delay)
                        j = i
                        while j < len(events) and events[j][0] <= arrival:
                            j += 1
                        events.insert(j, (arrival, other, "apply", line))
        else:
            nodes[w].apply_charges(decode_batch(payload)[1])
    # a tick comes at most 1.1 intervals after the last; then the delivery
    return admitted, 2 * interval + interval / 10 + max_delay


class FakeTransports(unittest.SynchronousTestCase):
    """The hub and a worker's end on fake transports and a fake clock."""

    def setUp(self):
        self.patch(shared, "_same_user", lambda transport: True)
        self.clock = Clock()
        self.zero = sharing(clock=self.clock)
        self.hub = shared.SharedLimitsHub(self.clock, self.zero, "/nonexistent", 0.05)
        self.hub._loop.start(0.05, now=False)
        self.addCleanup(self.hub._loop.stop)

    def member(self, number: int) -> tuple[shared._Member, StringTransport]:
        member = shared._HubFactory(self.hub).buildProtocol(None)
        transport = StringTransport()
        member.makeConnection(transport)
        member.dataReceived(b'{"hello": %d}\n' % number)
        return member, transport

    def test_hub_relays_a_batch_to_the_others_and_applies_it(self):
        """A worker's line goes, unchanged, to every other worker and not back; worker 0
        applies it to its own tables."""
        one, t1 = self.member(1)
        two, t2 = self.member(2)
        source = sharing()
        spend(source, 10)
        line, _ = encode_batch(source.drain_charges(), 1)
        one.dataReceived(line + b"\n")
        self.assertEqual(t2.value(), line + b"\n")
        self.assertEqual(t1.value(), b"")
        self.assertEqual(spend(self.zero, 1), 0)

    def test_hub_sends_worker_zeros_charges_every_interval(self):
        """Worker 0's own charges go to every worker at the next tick, nothing when idle."""
        _, t1 = self.member(1)
        spend(self.zero, 3)
        self.clock.advance(0.05)
        worker, charges = decode_batch(t1.value().rstrip(b"\n"))
        self.assertEqual((worker, set(charges["address"])), (0, {"192.0.2.1"}))
        t1.clear()
        self.clock.advance(0.05)
        self.assertEqual(t1.value(), b"")

    def test_a_worker_that_does_not_read_misses_lines_and_is_said_once(self):
        """While a worker's socket buffer is full its lines are dropped (counted), not queued."""
        one, t1 = self.member(1)
        events = log_lines(self)
        one.pauseProducing()
        for n in range(3):
            spend(self.zero, 1, ip=f"192.0.2.{n}")
            self.clock.advance(0.05)
        self.assertEqual((t1.value(), self.hub.dropped), (b"", 3))
        self.assertEqual(said(events, "is not reading"), 1)
        one.resumeProducing()
        spend(self.zero, 1)
        self.clock.advance(0.05)
        self.assertNotEqual(t1.value(), b"")

    def test_unreadable_lines_are_dropped(self):
        """A line that is not a batch changes nothing and is said once."""
        one, _ = self.member(1)
        events = log_lines(self)
        one.dataReceived(b"garbage\n{}\n")
        self.assertEqual(spend(self.zero, 10), 10)
        self.assertEqual(said(events, "could not be read"), 1)

    def test_a_connection_without_hello_is_closed(self):
        """The first line must name a worker."""
        member = shared._HubFactory(self.hub).buildProtocol(None)
        transport = StringTransport()
        member.makeConnection(transport)
        member.dataReceived(b'{"c": {}}\n')
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.hub.members, [])

    def test_worker_end_sends_its_batch_and_applies_what_comes(self):
        """A worker's end says hello, sends one line a tick when it charged something, and
        applies the lines it receives."""
        mine = sharing(clock=self.clock)
        client = shared.SharedLimitsClient(self.clock, mine, "/nonexistent", 0.05, 3)
        client.running = True
        link = shared._Link(client)
        transport = StringTransport()
        link.makeConnection(transport)
        self.assertEqual(transport.value(), b'{"hello": 3}\n')
        transport.clear()
        client._loop.start(0.05, now=False)
        self.addCleanup(client._loop.stop)
        self.clock.advance(0.05)
        self.assertEqual(transport.value(), b"")
        spend(mine, 2)
        self.clock.advance(0.05)
        self.assertEqual(set(decode_batch(transport.value().rstrip(b"\n"))[1]["address"]), {"192.0.2.1"})
        other = sharing()
        spend(other, 10, ip="198.51.100.7")
        line, _ = encode_batch(other.drain_charges(), 1)
        link.dataReceived(line + b"\n")
        self.assertEqual(spend(mine, 1, ip="198.51.100.7"), 0)


async def eventually(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


class RealSocket(unittest.TestCase):
    """The hub and two workers' ends over a real UNIX socket, with the reactor."""

    interval = 0.01

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="hp-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "ratelimit.sock")
        self.events = log_lines(self)
        self.zero = sharing(workers=3, clock=reactor)

    def start_hub(self) -> shared.SharedLimitsHub:
        hub = shared.SharedLimitsHub(reactor, self.zero, self.path, self.interval)
        hub.startService()
        self.addCleanup(lambda: hub.stopService() if hub.running else None)
        return hub

    def start_client(self, number: int) -> shared.SharedLimitsClient:
        client = shared.SharedLimitsClient(reactor, sharing(workers=3, clock=reactor), self.path, self.interval,
                                           number)
        client.max_delay = 0.2
        client.startService()
        self.addCleanup(lambda: client.stopService() if client.running else None)
        return client

    async def test_charges_of_one_worker_reach_the_others(self):
        """Worker 1 spends the burst; within a few intervals worker 2 and worker 0 refuse."""
        hub = self.start_hub()
        one, two = self.start_client(1), self.start_client(2)
        await eventually(lambda: len(hub.members) == 2, "both workers joined")
        self.assertEqual(spend(one.limiters, 10), 10)
        await eventually(lambda: not two.limiters.check_client("192.0.2.1").allowed, "worker 2 refuses")
        await eventually(lambda: not self.zero.check_client("192.0.2.1").allowed, "worker 0 refuses")
        # and back: worker 0's charges reach worker 1
        spend(self.zero, 10, ip="198.51.100.1")
        await eventually(lambda: not one.limiters.check_client("198.51.100.1").allowed, "worker 1 refuses")

    async def test_socket_is_private_and_removed_at_stop(self):
        """The socket is 0600; stopping the hub removes it."""
        hub = self.start_hub()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        await hub.stopService()
        self.assertFalse(os.path.exists(self.path))

    async def test_hub_going_away_the_worker_limits_alone_then_reconnects(self):
        """Worker 0 gone: the worker says so once, keeps limiting with the full budget,
        retries; when worker 0 is back it says so, and budgets are shared again."""
        hub = self.start_hub()
        one = self.start_client(1)
        await eventually(lambda: one.up is True, "connected")
        await hub.stopService()
        await eventually(lambda: one.up is False, "the worker noticed")
        await task.deferLater(reactor, 0.5, lambda: None)  # a few retries
        self.assertEqual(said(self.events, "cannot reach worker 0"), 1)
        self.assertEqual(spend(one.limiters, 12), 10)  # its own full budget
        await eventually(lambda: not one.limiters.address.pending, "what it charged is discarded, not queued")
        hub = self.start_hub()
        await eventually(lambda: one.up is True and len(hub.members) == 1, "reconnected")
        self.assertEqual(said(self.events, "connected to worker 0 again"), 1)
        spend(one.limiters, 10, ip="198.51.100.2")
        await eventually(lambda: not self.zero.check_client("198.51.100.2").allowed, "shared again")

    async def test_worker_starting_before_the_hub_connects_when_it_comes(self):
        """A worker whose first attempt fails retries until the hub listens."""
        one = self.start_client(1)
        await eventually(lambda: one.up is False, "first attempt failed")
        hub = self.start_hub()
        await eventually(lambda: len(hub.members) == 1, "joined")

    async def test_hub_that_cannot_listen_leaves_each_worker_alone(self):
        """A socket that cannot be made is said once; the node goes on, unshared."""
        hub = shared.SharedLimitsHub(reactor, self.zero, os.path.join(self.dir, "missing", "ratelimit.sock"),
                                     self.interval)
        hub.startService()
        self.assertEqual(said(self.events, "cannot listen"), 1)
        spend(self.zero, 3)
        await eventually(lambda: not self.zero.address.pending, "worker 0's charges drained, not queued")
        await hub.stopService()

    def test_long_data_dir_uses_a_short_private_directory(self):
        """A data directory whose socket path would be over 100 bytes gets a fresh 0700
        temporary directory instead; a short one is used as is."""
        long_dir = os.path.join(self.dir, "d" * 120)
        path, temp_dir = shared.socket_path(long_dir)
        self.addCleanup(shutil.rmtree, temp_dir, True)
        self.assertLessEqual(len(path), shared.MAX_SOCKET_PATH)
        self.assertEqual(os.path.dirname(path), temp_dir)
        self.assertEqual(stat.S_IMODE(os.stat(temp_dir).st_mode), 0o700)
        self.assertEqual(shared.socket_path(self.dir), (self.path, None))


# -- a real node ---------------------------------------------------------------------------

def _owner(https_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid holding the server end of the loopback connection from ``client_port``."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == https_port and int(remote.split(":")[1], 16) == client_port
                    and fields[9] != "0"):
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


class RealNode(unittest.SynchronousTestCase):
    """``twistd --workers 2`` with a per-address budget of 10 at 1/min: nothing refills
    during a test, so a test never depends on the machine's speed."""

    shared = True

    def setUp(self):
        from bench.procs import start_backend
        from tests.test_process import Twistd
        backend, port = start_backend()
        self.addCleanup(backend.stop)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        config = os.path.join(root, "node.toml")
        with open(config, "w") as f:
            f.write(f'[ratelimit]\nper_address_rate = "1/min"\nper_address_burst = 10\n'
                    f'shared = {"true" if self.shared else "false"}\nshared_sync_ms = 20\n')
        self.node = Twistd(self, os.path.join(root, "data"), "--config", config, "--workers", "2").wait_ready()
        self.node.wait_for(r"worker 1 serving")
        if self.shared:
            self.node.wait_for(r"shared rate limits: worker 1 joined")
        status, _, _ = self.node.admin("PUT", f"/api/v1/containers/{CONTAINER}",
                                       {"project": PROJECT, "address": "127.0.0.1", "state": "running"})
        self.assertIn(status, (200, 201))
        self.host = f"{PROJECT}-{CONTAINER}-http-{port}.node-local.containers.localhost"
        self.context = ssl.create_default_context(cafile=os.path.join(self.node.data_dir, "tls", "ca.pem"))
        with open(f"/proc/{self.node.proc.pid}/task/{self.node.proc.pid}/children") as f:
            self.pids = [self.node.proc.pid, *map(int, f.read().split())]

    def request(self) -> tuple[int, int | None]:
        """One request on a fresh connection: (status, pid of the worker that took it)."""
        port = self.node.ports["https"]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            with self.context.wrap_socket(raw, server_hostname=self.host) as tls:
                owner = _owner(port, tls.getsockname()[1], self.pids)
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        return int(data.split(b" ", 2)[1]), owner

    def requests(self, n: int) -> list[tuple[int, int | None]]:
        return [self.request() for _ in range(n)]

    def two_phases(self) -> tuple[list, list]:
        """10 requests (the burst), a pause of 50 intervals, 20 more; each phase reaching
        both workers (the kernel spreads fresh connections; 20 all on one is 2 in 10**6)."""
        first = self.requests(10)
        time.sleep(1.0)
        second = self.requests(20)
        self.assertEqual({owner for _, owner in second}, set(self.pids), second)
        return first, second


class SharedNode(RealNode):
    """``shared = true``: the two workers share one budget of 10."""

    def test_budget_spent_on_either_worker_is_spent_on_both(self):
        """The burst of 10 spread over both workers, then 20 more on both: all refused,
        also by the worker that had served fewer than 10 (without sharing it would not)."""
        first, second = self.two_phases()
        self.assertEqual([status for status, _ in first], [200] * 10, first)
        self.assertEqual([status for status, _ in second], [429] * 20, second)

    def test_thirty_back_to_back_requests_stay_within_the_bound(self):
        """30 requests back to back on fresh connections over both workers: at most
        b + (N-1)*(b + r*L) = 20 pass, at least the burst of 10."""
        results = self.requests(30)
        passed = sum(status == 200 for status, _ in results)
        self.assertEqual({owner for _, owner in results}, set(self.pids))
        self.assertTrue(10 <= passed <= 20, results)

    def test_socket_removed_when_the_node_stops(self):
        """The socket named in the log exists (0600) while the node runs, not after."""
        path = re.search(r"exchanges charges every 20 ms on (\S+)", self.node.output()).group(1)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.node.stop()
        self.assertFalse(os.path.exists(path))
        if os.path.dirname(path) != self.node.data_dir:  # too long a path: a temporary directory
            self.assertFalse(os.path.exists(os.path.dirname(path)))


class UnsharedNode(RealNode):
    """``shared = false``: each worker has a budget of 10 of its own."""

    shared = False

    def test_each_worker_has_its_own_budget(self):
        """The same requests as with sharing: the worker that served fewer than 10 of the
        first serves more after, so more than 10 pass in all."""
        first, second = self.two_phases()
        self.assertEqual([status for status, _ in first], [200] * 10, first)
        passed = sum(status == 200 for status, _ in first + second)
        self.assertGreater(passed, 10, first + second)
        self.assertLessEqual(passed, 20, first + second)
        self.assertNotIn("shared rate limits", self.node.output())
