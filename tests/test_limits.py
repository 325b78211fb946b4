"""Specification of rate limiting (hoodyproxy.limits, pure: a fake clock, no reactor).

GCRA: ``burst`` requests pass at once, then one per ``1/rate`` seconds; a refusal says
how long to wait, in whole seconds rounded up, and after that long the request passes.
Keys come from the peer address (IPv6 grouped by prefix, v4-mapped is v4) and from the
username (folded).  Tables are bounded: only expired entries are evicted, keys that do
not fit share one overflow budget, so rotating keys gains an attacker at most one key's
worth per table.  Rates, node settings and a set's ``rate_limits`` are validated with
errors naming the key or the dotted field.
"""

from __future__ import annotations

import json
import tracemalloc
from collections import defaultdict

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import hoodyproxy.limits as limits
from hoodyproxy.limits import (
    ALLOWED,
    DEFAULT_SETTINGS,
    EPSILON,
    NO_RATE_LIMITS,
    GcraTable,
    InvalidRateLimit,
    Limit,
    Limiters,
    RateLimits,
    RateLimitSettings,
    TooManyRequests,
    Verdict,
    address_key,
    parse_limit,
    parse_rate,
    parse_rate_limits,
    rate_limit_headers,
    username_key,
)

PROJECT = "67e89abc123def456789abcd"
CONTAINER = "0123456789abcdef01234567"
OTHER_CONTAINER = "76543210fedcba9876543210"


def limit(rate: str, burst: int) -> Limit:
    return Limit(parse_rate(rate), burst)


def node(clock: Clock | None = None, **changes) -> tuple[Limiters, Clock]:
    """Limiters with default settings changed by ``changes``, on a fake clock."""
    clock = clock or Clock()
    values = {"per_address": DEFAULT_SETTINGS.per_address, "failed_auth": DEFAULT_SETTINGS.failed_auth}
    values.update(changes)
    return Limiters(RateLimitSettings(**values), clock=clock), clock


def drain(check, n: int) -> list[Verdict]:
    return [check() for _ in range(n)]


class RateParsing(SynchronousTestCase):
    """Rates are written ``count/unit`` or as a number per second."""

    def test_accepted_forms(self) -> None:
        """Seconds, minutes (min or m), hours, days and bare numbers give the right interval."""
        cases = {"100/s": 0.01, "6000/min": 0.01, "10/m": 6.0, "1000/h": 3.6, "2/d": 43200.0,
                 "5/sec": 0.2, "30/minute": 2.0, "1/hours": 3600.0, " 4 / S ": 0.25, "0.5/s": 2.0,
                 "100": 0.01, 100: 0.01, 2.5: 0.4}
        for text, interval in cases.items():
            self.assertAlmostEqual(parse_rate(text).interval, interval, msg=repr(text))

    def test_canonical_text(self) -> None:
        """A rate prints in one canonical spelling, which parses back to an equal rate."""
        self.assertEqual(str(parse_rate("10/m")), "10/min")
        self.assertEqual(str(parse_rate(100)), "100/s")
        self.assertEqual(str(parse_rate("0.5/hour")), "0.5/h")
        for text in ("10/m", "0.5/h", "7/d", "100"):
            rate = parse_rate(text)
            self.assertEqual(parse_rate(str(rate)), rate)

    def test_rejected_forms_name_the_field(self) -> None:
        """Anything else raises InvalidRateLimit (a ValueError) naming the field, not echoing it."""
        for bad in ("", "fast", "0/s", "-1/s", "10/fortnight", "1e3/s", "10//s", "/s", "1/0s",
                    True, None, [], {}, 0, -5, float("inf"), float("nan"), 10**400,
                    "100001/s", "1/2d", "secret-value/s"):
            with self.assertRaises(InvalidRateLimit, msg=repr(bad)) as caught:
                parse_rate(bad, "rate_limits.per_client.rate")
            self.assertIsInstance(caught.exception, ValueError)
            self.assertEqual(caught.exception.field, "rate_limits.per_client.rate")
            self.assertTrue(str(caught.exception).startswith("rate_limits.per_client.rate: "))
            self.assertNotIn("secret", str(caught.exception))

    def test_limit_needs_rate_and_burst_only(self) -> None:
        """A limit object has exactly a rate and an integer burst >= 1; errors name the field."""
        self.assertEqual(parse_limit({"rate": "100/s", "burst": 200}, "x"), limit("100/s", 200))
        cases = [
            ({"rate": "100/s"}, "x.burst"),
            ({"burst": 3}, "x.rate"),
            ({"rate": "100/s", "burst": 0}, "x.burst"),
            ({"rate": "100/s", "burst": 1.5}, "x.burst"),
            ({"rate": "100/s", "burst": True}, "x.burst"),
            ({"rate": "100/s", "burst": "3"}, "x.burst"),
            ({"rate": "100/s", "burst": 2_000_000}, "x.burst"),
            ({"rate": "100/s", "burst": 3, "burts": 3}, "x.burts"),
            ({"rate": "often", "burst": 3}, "x.rate"),
            ("100/s", "x"),
        ]
        for value, field in cases:
            with self.assertRaises(InvalidRateLimit, msg=repr(value)) as caught:
                parse_limit(value, "x")
            self.assertEqual(caught.exception.field, field)


class Exactness(SynchronousTestCase):
    """Exactly ``burst`` pass at once, then exactly one per interval, and Retry-After is exact."""

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(["100/s", "6000/min", "3/s", "10/m", "1000/h", "7/s", "0.5/s"]),
           st.integers(1, 40), st.integers(1, 60))
    def test_burst_then_one_per_interval(self, rate: str, burst: int, steps: int) -> None:
        """A fresh key passes ``burst`` times at once and not once more; then, each time the
        clock moves by one interval, exactly one more passes (even after many float steps),
        and a moment before the interval none does."""
        lim = limit(rate, burst)
        limiters, clock = node(per_address=lim)
        check = lambda: limiters.check_client("192.0.2.1")  # noqa: E731
        self.assertTrue(all(v is ALLOWED for v in drain(check, burst)))
        self.assertFalse(check().allowed)
        for _ in range(steps):
            clock.advance(lim.interval * 0.99)
            self.assertFalse(check().allowed)
            clock.advance(lim.interval * 0.01)
            self.assertIs(check(), ALLOWED)
            self.assertFalse(check().allowed)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(["1/s", "3/s", "100/s", "6000/min", "10/m", "1000/h", "0.3/s"]),
           st.integers(1, 5),
           st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40))
    def test_retry_after_is_enough(self, rate: str, burst: int, gaps: list[float]) -> None:
        """Whatever came before, a refused request sent again ``retry_after`` seconds later
        passes; ``retry_after`` and ``reset`` are whole seconds, at least 1."""
        limiters, clock = node(per_address=limit(rate, burst))
        for gap in gaps:
            clock.advance(gap)
            verdict = limiters.check_client("192.0.2.1")
            if verdict.allowed:
                continue
            self.assertIsInstance(verdict.retry_after, int)
            self.assertGreaterEqual(verdict.retry_after, 1)
            self.assertEqual(verdict.reset, verdict.retry_after)
            clock.advance(verdict.retry_after)
            self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(["4/s", "1/s", "1/min", "0.25/s", "64/s"]), st.integers(1, 5),
           st.lists(st.integers(0, 64 * 5), min_size=1, max_size=40))
    def test_retry_after_is_not_longer_than_needed(self, rate: str, burst: int, gaps: list[int]) -> None:
        """Rounded up, never more: one second before ``retry_after`` the request is still
        refused (times and intervals here are exact binary fractions, so no float noise)."""
        limiters, clock = node(per_address=limit(rate, burst))
        for gap in gaps:
            clock.advance(gap / 64)
            verdict = limiters.check_client("192.0.2.1")
            if verdict.allowed:
                continue
            clock.advance(verdict.retry_after - 1)
            self.assertFalse(limiters.check_client("192.0.2.1").allowed)
            clock.advance(1)
            self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)

    def test_retry_after_rounds_up(self) -> None:
        """At 1/min a second request waits 60 s; half a second before it is due, 1 s (not 0)."""
        limiters, clock = node(per_address=limit("1/min", 1))
        self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)
        self.assertEqual(limiters.check_client("192.0.2.1").retry_after, 60)
        clock.advance(59.5)
        self.assertEqual(limiters.check_client("192.0.2.1").retry_after, 1)
        clock.advance(0.5)
        self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)

    def test_refusals_cost_nothing(self) -> None:
        """A refused request does not push the next allowed time back (a client that keeps
        asking is not punished beyond its limit)."""
        limiters, clock = node(per_address=limit("1/s", 1))
        limiters.check_client("192.0.2.1")
        for _ in range(100):
            self.assertFalse(limiters.check_client("192.0.2.1").allowed)
        clock.advance(1)
        self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)

    def test_allowed_is_one_shared_object(self) -> None:
        """Every request within its limits gets the same ALLOWED object: no allocation."""
        limiters, _ = node()
        verdicts = {id(limiters.check_client(f"192.0.2.{i}")) for i in range(50)}
        self.assertEqual(verdicts, {id(ALLOWED)})
        self.assertTrue(ALLOWED.allowed)
        self.assertFalse(ALLOWED.limited)


class Answer(SynchronousTestCase):
    """A refusal becomes a 429 with a JSON body, Retry-After and the IETF RateLimit fields."""

    def test_default_per_address_refusal(self) -> None:
        """At the defaults (1000/s, burst 2000) the 2001st request at once is refused for 1 s,
        and the header values say so in draft-ietf-httpapi-ratelimit-headers syntax."""
        limiters, _ = node()
        self.assertTrue(all(v is ALLOWED for v in drain(lambda: limiters.check_client("192.0.2.1"), 2000)))
        verdict = limiters.check_client("192.0.2.1")
        self.assertEqual(verdict, Verdict(False, "address", 1, 0, 1, 2000, 2))
        self.assertEqual(rate_limit_headers(verdict), (
            (b"Retry-After", b"1"),
            (b"RateLimit-Policy", b'"address";q=2000;w=2'),
            (b"RateLimit", b'"address";r=0;t=1'),
        ))

    def test_window_and_reset_of_a_slow_limit(self) -> None:
        """``q`` is the burst, ``w`` the seconds a spent burst takes to refill, ``t`` the wait."""
        limiters, _ = node(per_address=limit("100/min", 100))
        drain(lambda: limiters.check_client("192.0.2.1"), 100)
        headers = dict(rate_limit_headers(limiters.check_client("192.0.2.1")))
        self.assertEqual(headers[b"RateLimit-Policy"], b'"address";q=100;w=60')
        self.assertEqual(headers[b"RateLimit"], b'"address";r=0;t=1')

    def test_too_many_requests_error(self) -> None:
        """TooManyRequests is a GatewayError: 429, the house JSON body, the three fields."""
        verdict = Verdict(False, "principal", 30, 0, 30, 100, 60)
        error = TooManyRequests(verdict)
        self.assertEqual(error.status, 429)
        self.assertEqual(json.loads(error.body()), {"error": "rate_limited",
                                                    "message": "too many requests; retry later"})
        self.assertEqual(error.headers, {b"Retry-After": b"30",
                                         b"RateLimit-Policy": b'"principal";q=100;w=60',
                                         b"RateLimit": b'"principal";r=0;t=30'})
        self.assertIn("principal", error.reason)

    def test_no_fields_when_let_through(self) -> None:
        """Nothing is added to a response that was let through, dry run included."""
        self.assertEqual(rate_limit_headers(ALLOWED), ())
        self.assertEqual(rate_limit_headers(Verdict(True, "address", 1, 0, 1, 2, 2, True)), ())


class AddressKeys(SynchronousTestCase):
    """The client key is the peer address; IPv6 grouped by prefix; v4-mapped is v4."""

    def test_same_ipv6_network_shares_a_key(self) -> None:
        """Two addresses in one /64 share a key; the next /64 does not."""
        self.assertEqual(address_key("2001:db8:1:2::1"), address_key("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        self.assertNotEqual(address_key("2001:db8:1:2::1"), address_key("2001:db8:1:3::1"))

    def test_shared_budget_in_one_network(self) -> None:
        """A client that spent its budget from one address of its /64 is refused from another."""
        limiters, _ = node(per_address=limit("1/s", 2))
        drain(lambda: limiters.check_client("2001:db8:1:2::1"), 2)
        self.assertFalse(limiters.check_client("2001:db8:1:2::beef").allowed)
        self.assertIs(limiters.check_client("2001:db8:1:3::1"), ALLOWED)

    def test_v4_mapped_is_v4(self) -> None:
        """``::ffff:192.0.2.1`` (a dual-stack socket's IPv4 peer) is ``192.0.2.1``."""
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")
        limiters, _ = node(per_address=limit("1/s", 1))
        limiters.check_client("192.0.2.1")
        self.assertFalse(limiters.check_client("::ffff:192.0.2.1").allowed)

    def test_prefix_is_configurable(self) -> None:
        """With /48 two /64s of one site share a key; with /128 every address is its own;
        a prefix that is not a whole number of bytes masks the last bits."""
        self.assertEqual(address_key("2001:db8:1:2::1", 48), address_key("2001:db8:1:3::1", 48))
        self.assertNotEqual(address_key("2001:db8:1:2::1", 128), address_key("2001:db8:1:2::2", 128))
        self.assertEqual(address_key("2001:db8:1:2::1", 60), address_key("2001:db8:1:f::1", 60))
        self.assertNotEqual(address_key("2001:db8:1:2::1", 60), address_key("2001:db8:1:10::1", 60))
        limiters, _ = node(per_address=limit("1/s", 1), ipv6_prefix=48)
        limiters.check_client("2001:db8:1:2::1")
        self.assertFalse(limiters.check_client("2001:db8:1:ffff::1").allowed)

    def test_zone_is_ignored(self) -> None:
        """A link-local peer's zone (``%eth0``) is not part of its key."""
        self.assertEqual(address_key("fe80::1%eth0"), address_key("fe80::1"))

    def test_families_never_collide(self) -> None:
        """An IPv4 key and an IPv6 key are never equal, whatever the bits."""
        self.assertNotEqual(address_key("0.0.0.1"), address_key("::1", 128))
        self.assertNotEqual(type(address_key("192.0.2.1")), type(address_key("2001:db8::1")))

    def test_ipv6_key_cache_is_bounded(self) -> None:
        """The IPv6 address -> key cache never holds more than its bound."""
        limiters, _ = node()
        for i in range(10_000):
            limiters.check_client(f"2001:db8:{i:x}::1")
        self.assertLessEqual(len(limiters._ipv6_keys), 4096)


class Eviction(SynchronousTestCase):
    """Bounded tables evict only expired entries; keys that do not fit share the overflow."""

    def test_expired_entries_are_evicted_first(self) -> None:
        """A full table whose entries have expired takes new keys by evicting them (counted)."""
        table = GcraTable("t", 4)
        lim = limit("1/s", 1)
        for key in "abcd":
            self.assertEqual(table.take(key, 0.0, lim.interval, lim.tolerance), 0.0)
        for key in "efgh":
            self.assertEqual(table.take(key, 1.0, lim.interval, lim.tolerance), 0.0)
            self.assertIn(key, table)
        self.assertEqual((len(table), table.evictions, table.overflowed), (4, 4, 0))

    def test_full_of_live_entries_uses_the_overflow(self) -> None:
        """New keys meeting a table full of live entries share one budget: a burst, then the rate."""
        table = GcraTable("t", 4)
        lim = limit("1/s", 2)
        for key in "abcd":
            table.take(key, 0.0, lim.interval, lim.tolerance)
        results = [table.take(f"new{i}", 0.5, lim.interval, lim.tolerance) for i in range(5)]
        self.assertEqual([r == 0.0 for r in results], [True, True, False, False, False])
        self.assertEqual((len(table), table.evictions, table.overflowed), (4, 0, 2))
        self.assertAlmostEqual(results[2], 1.0 - EPSILON)

    def test_resident_keys_keep_their_budget_during_a_flood(self) -> None:
        """A key already in the table is judged by its own entry while new keys flood in."""
        table = GcraTable("t", 4)
        lim = limit("1/s", 5)
        table.take("legit", 0.0, lim.interval, lim.tolerance)
        for i in range(1000):
            table.take(f"attacker{i}", 0.0, lim.interval, lim.tolerance)
        self.assertEqual([table.take("legit", 0.0, lim.interval, lim.tolerance) for _ in range(4)], [0.0] * 4)

    def test_rotating_keys_gains_nothing(self) -> None:
        """Attack replayed: 10,000 addresses rotated through a 4-key table at 200 requests/s
        for 100 s.  Without a bound every one of the 20,000 requests would pass (each key is
        seen twice, 50 s apart); here the table admits at most (4 + 1) * (burst + 100 s *
        rate), the documented bound: four slots and the overflow, each one key's worth."""
        table = GcraTable("t", 4)
        lim = limit("1/s", 5)
        admitted = 0
        for i in range(20_000):
            now = i * 0.005
            if table.take(f"10.0.{(i % 10_000) >> 8}.{i % 256}", now, lim.interval, lim.tolerance) == 0.0:
                admitted += 1
        self.assertLessEqual(admitted, (4 + 1) * (5 + 100 * 1))
        self.assertLessEqual(len(table), 4)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 11), st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0])),
                    min_size=1, max_size=150),
           st.integers(1, 4), st.integers(1, 4))
    def test_eviction_bound(self, requests: list[tuple[int, float]], capacity: int, burst: int) -> None:
        """The bound stated in hoodyproxy.limits._table, for any sequence of keys and times:
        the table never exceeds its capacity; in any window of t seconds all keys together
        get at most (capacity + 1) * (burst + t * rate) and one key at most 2 * (burst + t *
        rate); and while no key was ever turned to the overflow, every verdict is exactly
        that of an unbounded table (evicting expired entries is invisible)."""
        lim = limit("2/s", burst)
        interval, tolerance = lim.interval, lim.tolerance
        table = GcraTable("t", capacity)
        reference: dict[int, float] = {}
        now = 0.0
        admitted: list[tuple[float, int]] = []
        for key, gap in requests:
            now += gap
            passed = table.take(key, now, interval, tolerance) == 0.0
            self.assertLessEqual(len(table), capacity)
            tat = max(reference.get(key, now), now) + interval
            reference_passed = tat - now <= tolerance
            if reference_passed:
                reference[key] = tat
            if table.overflowed == 0:
                self.assertEqual(passed, reference_passed)
            if passed:
                admitted.append((now, key))
        per_key = defaultdict(list)
        for when, key in admitted:
            per_key[key].append(when)
        everyone = [when for when, _ in admitted]

        def most_in_a_window(times: list[float], start: int) -> list[tuple[float, int]]:
            return [(times[end] - times[start], end - start + 1) for end in range(start, len(times))]

        for start in range(len(everyone)):
            for span, count in most_in_a_window(everyone, start):
                self.assertLessEqual(count, (capacity + 1) * (burst + span / interval))
        for times in per_key.values():
            for start in range(len(times)):
                for span, count in most_in_a_window(times, start):
                    self.assertLessEqual(count, 2 * (burst + span / interval))

    def test_a_million_keys_stay_within_the_cap(self) -> None:
        """A table of 65,536 keys offered 1,000,000 distinct ones (IPv6 /64 keys, 15 us apart,
        each live for 1 s: so the table both fills with live keys and evicts expired ones)
        holds at most 65,536 and its memory stops growing.  Measured (tracemalloc, keys
        included): about 155 bytes an entry when the table first fills, about 210 once it
        churns (the hash table keeps room for deleted entries), so about 14 MB for a full
        table; asserted generously (below 400 bytes an entry, growth below 2x).  Tracing
        slows allocation tenfold, so only the first 200,000 keys are traced."""
        cap = 65_536
        lim = limit("1/s", 1)
        interval, tolerance = lim.interval, lim.tolerance
        table = GcraTable("t", cap)
        take = table.take
        tracemalloc.start()
        try:
            for i in range(cap):
                take(i.to_bytes(8, "big"), i * 1.5e-5, interval, tolerance)
            full, _ = tracemalloc.get_traced_memory()
            for i in range(cap, 200_000):
                take(i.to_bytes(8, "big"), i * 1.5e-5, interval, tolerance)
            churned, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        for i in range(200_000, 1_000_000):
            take(i.to_bytes(8, "big"), i * 1.5e-5, interval, tolerance)
            if i % 100_000 == 0:
                self.assertLessEqual(len(table), cap)
        self.assertEqual(len(table), cap)
        self.assertLess(full / cap, 400, f"{full / cap:.0f} bytes an entry when first full")
        self.assertLess(churned / cap, 400, f"{churned / cap:.0f} bytes an entry when churning")
        self.assertLess(churned, 2 * full)
        self.assertGreater(table.evictions, 500_000)
        self.assertGreater(table.overflowed, 0)


class FailedAuthentication(SynchronousTestCase):
    """Failures are limited per client address and per username, checked before verifying."""

    def test_per_address(self) -> None:
        """After 20 failures at once (the default burst at 10/min) the address is refused for 6 s,
        before any credential is verified; another address is not."""
        limiters, clock = node()
        for _ in range(20):
            self.assertIs(limiters.check_failed_auth("192.0.2.1"), ALLOWED)
            limiters.record_failed_auth("192.0.2.1")
        verdict = limiters.check_failed_auth("192.0.2.1")
        self.assertEqual((verdict.allowed, verdict.limiter, verdict.retry_after), (False, "auth-address", 6))
        self.assertEqual((verdict.quota, verdict.window), (20, 120))
        self.assertIs(limiters.check_failed_auth("192.0.2.2"), ALLOWED)
        clock.advance(6)
        self.assertIs(limiters.check_failed_auth("192.0.2.1"), ALLOWED)

    def test_per_username_across_addresses(self) -> None:
        """A guesser spreading failures for one username over many addresses is refused on that
        username (any case), while other usernames, and requests naming none, pass."""
        limiters, _ = node()
        for i in range(100):  # the per-username burst (at 30/min)
            limiters.record_failed_auth(f"192.0.2.{i}", "alice")
        verdict = limiters.check_failed_auth("198.51.100.7", "Alice ")
        self.assertEqual((verdict.allowed, verdict.limiter), (False, "auth-user"))
        self.assertIs(limiters.check_failed_auth("198.51.100.7", "bob"), ALLOWED)
        self.assertIs(limiters.check_failed_auth("198.51.100.7"), ALLOWED)

    def test_checking_counts_nothing(self) -> None:
        """Asking whether a client may try costs it nothing: only recorded failures count."""
        limiters, _ = node()
        for _ in range(1000):
            self.assertIs(limiters.check_failed_auth("192.0.2.1", "alice"), ALLOWED)

    def test_one_guessing_address_cannot_lock_a_user_out(self) -> None:
        """One address failing for a username is stopped by its own budget (20) long before
        the username's (100): the user still gets checked from another address."""
        limiters, _ = node()
        while limiters.check_failed_auth("192.0.2.1", "alice") is ALLOWED:
            limiters.record_failed_auth("192.0.2.1", "alice")
        self.assertEqual(limiters.check_failed_auth("192.0.2.1", "alice").limiter, "auth-address")
        self.assertIs(limiters.check_failed_auth("198.51.100.7", "alice"), ALLOWED)

    def test_concurrent_failures_are_all_charged_within_a_ceiling(self) -> None:
        """Failures recorded past the budget (guesses verified concurrently) still count, but the
        lockout they build is at most twice the burst's refill: 100 failures at once at 10/min
        burst 20 wait (20 + 1) * 6 = 126 s, not 600."""
        limiters, clock = node()
        for _ in range(100):
            limiters.record_failed_auth("192.0.2.1", "alice")
        self.assertEqual(limiters.check_failed_auth("192.0.2.1").retry_after, 126)
        clock.advance(126)
        self.assertIs(limiters.check_failed_auth("192.0.2.1", "alice"), ALLOWED)

    def test_the_longer_wait_is_reported(self) -> None:
        """When both the address and the username are over, the verdict names the longer wait."""
        limiters, clock = node()
        for _ in range(20):
            limiters.record_failed_auth("192.0.2.1", "alice")
        clock.advance(3)
        for _ in range(300):
            limiters.record_failed_auth("192.0.2.2", "alice")
        self.assertEqual(limiters.check_failed_auth("192.0.2.1", "alice").limiter, "auth-user")

    def test_long_usernames_are_bounded(self) -> None:
        """A username longer than 64 characters is kept as a 16-byte digest, still one per name."""
        self.assertEqual(len(username_key("x" * 10_000)), 16)
        self.assertNotEqual(username_key("x" * 10_000), username_key("x" * 10_001))
        self.assertEqual(username_key(b"Alice"), username_key("alice"))


class AfterTheDecision(SynchronousTestCase):
    """Limits of the effective permission set: per client, principal, container, project, program."""

    def setUp(self) -> None:
        self.limiters, self.clock = node()

    def check(self, rl: RateLimits, principal="p1", container=CONTAINER, program="http", index=3000,
              ip="192.0.2.1", project=PROJECT) -> Verdict:
        return self.limiters.check_after_decision(rl, ip, principal, project, container, program, index)

    def test_no_limits(self) -> None:
        """No rate_limits (None or empty) always passes."""
        for rl in (None, NO_RATE_LIMITS, parse_rate_limits({"dry_run": False})):
            self.assertTrue(all(self.check(rl) is ALLOWED for _ in range(100)))

    def test_each_scope_has_its_own_keys(self) -> None:
        """Each scope limits its own key: two principals, two containers, two projects, two
        clients and two programs are counted apart."""
        one = {"rate": "1/min", "burst": 1}
        cases = [
            ("per_principal", "principal", dict(principal="p2")),
            ("per_container", "container", dict(container=OTHER_CONTAINER)),
            ("per_project", "project", dict(project="f" * 24, container=OTHER_CONTAINER)),
            ("per_client", "client", dict(ip="192.0.2.2")),
        ]
        for scope, name, other in cases:
            self.setUp()
            rl = parse_rate_limits({scope: one})
            self.assertIs(self.check(rl), ALLOWED)
            verdict = self.check(rl)
            self.assertEqual((verdict.allowed, verdict.limiter, verdict.retry_after), (False, name, 60),
                             scope)
            self.assertIs(self.check(rl, **other), ALLOWED, scope)

    def test_per_program_by_name_and_by_index(self) -> None:
        """``http-3000`` limits that index (preferred over ``http``); ``http`` every other index;
        a program with no entry is not limited; the count is per container."""
        rl = parse_rate_limits({"per_program": {"http": {"rate": "1/min", "burst": 2},
                                                "http-3000": {"rate": "1/min", "burst": 1}}})
        self.assertIs(self.check(rl, index=3000), ALLOWED)
        self.assertEqual(self.check(rl, index=3000).limiter, "program")
        self.assertIs(self.check(rl, index=8080), ALLOWED)
        self.assertIs(self.check(rl, index=8081), ALLOWED)
        self.assertFalse(self.check(rl, index=8082).allowed)
        self.assertIs(self.check(rl, program="terminal", index=0), ALLOWED)
        self.assertIs(self.check(rl, index=3000, container=OTHER_CONTAINER), ALLOWED)

    def test_no_principal_skips_the_principal_limit(self) -> None:
        """A request no credential matched is not counted per principal (but per container)."""
        rl = parse_rate_limits({"per_principal": {"rate": "1/min", "burst": 1}})
        self.assertTrue(all(self.check(rl, principal=None) is ALLOWED for _ in range(10)))

    def test_refusal_costs_the_other_limits_nothing(self) -> None:
        """A request refused by one limit is not counted by the others: when the project is
        over, the principal's and container's budgets are untouched, whatever the position
        of the refusing limit."""
        for refusing in ("per_client", "per_principal", "per_container", "per_project", "per_program"):
            self.setUp()
            spec = {scope: {"rate": "1/min", "burst": 3}
                    for scope in ("per_client", "per_principal", "per_container", "per_project")}
            spec["per_program"] = {"http": {"rate": "1/min", "burst": 3}}
            tight = {"rate": "1/min", "burst": 1}
            if refusing == "per_program":
                spec["per_program"] = {"http": tight}
            else:
                spec[refusing] = tight
            rl = parse_rate_limits(spec)
            self.assertIs(self.check(rl), ALLOWED)
            for _ in range(10):
                self.assertFalse(self.check(rl).allowed)
            loose = parse_rate_limits({k: v for k, v in spec.items() if k != refusing})
            self.assertIs(self.check(loose), ALLOWED, refusing)
            self.assertIs(self.check(loose), ALLOWED, refusing)
            self.assertFalse(self.check(loose).allowed, refusing)

    def test_the_longest_wait_is_reported(self) -> None:
        """When several limits are over, Retry-After is the longest wait, so a client that obeys
        it is not refused again at once by another limit."""
        rl = parse_rate_limits({"per_principal": {"rate": "1/min", "burst": 1},
                                "per_project": {"rate": "1/h", "burst": 1}})
        self.check(rl)
        verdict = self.check(rl)
        self.assertEqual((verdict.limiter, verdict.retry_after), ("project", 3600))

    def test_dry_run_of_a_set(self) -> None:
        """With the set's dry_run the request passes; the verdict says which limit it is over."""
        rl = parse_rate_limits({"per_container": {"rate": "1/min", "burst": 1}, "dry_run": True})
        self.assertIs(self.check(rl), ALLOWED)
        verdict = self.check(rl)
        self.assertEqual((verdict.allowed, verdict.limited, verdict.dry_run, verdict.limiter),
                         (True, True, True, "container"))
        self.assertEqual(self.limiters.container.dry_run, 1)

    def test_limits_change_at_once(self) -> None:
        """A key's state is a time, and its debt is capped at the burst of the limit in force:
        tightened, a set's limit applies at once; loosened, it applies after one new interval
        (not after the old limit's debt runs out)."""
        strict = parse_rate_limits({"per_container": {"rate": "1/min", "burst": 1}})
        loose = parse_rate_limits({"per_container": {"rate": "100/s", "burst": 100}})
        self.check(strict)
        self.assertFalse(self.check(strict).allowed)
        self.assertEqual(self.check(loose).retry_after, 1)
        self.clock.advance(0.01)
        self.assertIs(self.check(loose), ALLOWED)
        self.assertFalse(self.check(strict).allowed)


class NodeModes(SynchronousTestCase):
    """Node settings: disabled, dry run, shared among workers, the clock, the counters."""

    def test_disabled_allows_everything(self) -> None:
        """``enabled = false``: every check passes and nothing is counted."""
        limiters, _ = node(enabled=False, per_address=limit("1/min", 1))
        rl = parse_rate_limits({"per_container": {"rate": "1/min", "burst": 1}})
        for _ in range(10):
            self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)
            limiters.record_failed_auth("192.0.2.1", "alice")
            self.assertIs(limiters.check_failed_auth("192.0.2.1", "alice"), ALLOWED)
            self.assertIs(limiters.check_after_decision(rl, "192.0.2.1", "p", PROJECT, CONTAINER), ALLOWED)
        self.assertTrue(all(s.size == 0 for s in limiters.stats()))

    def test_node_dry_run(self) -> None:
        """Node dry run: over-limit requests pass, each verdict says it would have been refused,
        and the counters count them."""
        limiters, _ = node(dry_run=True, per_address=limit("1/min", 1))
        limiters.check_client("192.0.2.1")
        for _ in range(3):
            verdict = limiters.check_client("192.0.2.1")
            self.assertEqual((verdict.allowed, verdict.limited, verdict.dry_run), (True, True, True))
            self.assertEqual(verdict.retry_after, 60)
        stats = {s.name: s for s in limiters.stats()}
        self.assertEqual((stats["address"].refusals, stats["address"].dry_run), (3, 3))

    def test_shared_workers_each_enforce_the_full_budget(self) -> None:
        """``shared`` with 4 workers: each enforces the whole budget (the others' charges
        reach it, tests.test_ratelimit_shared) and notes what it charges; unshared notes nothing."""
        settings_ = RateLimitSettings(per_address=limit("100/s", 8), shared=True)
        limiters = Limiters(settings_, clock=Clock(), workers=4)
        self.assertTrue(limiters.sharing)
        verdicts = drain(lambda: limiters.check_client("192.0.2.1"), 9)
        self.assertEqual([v.allowed for v in verdicts], [True] * 8 + [False])
        self.assertEqual((verdicts[-1].quota, verdicts[-1].window), (8, 1))
        self.assertEqual(set(limiters.drain_charges()["address"]), {"192.0.2.1"})
        unshared = Limiters(RateLimitSettings(per_address=limit("100/s", 8)), clock=Clock(), workers=4)
        self.assertFalse(unshared.sharing)
        self.assertTrue(all(v is ALLOWED for v in drain(lambda: unshared.check_client("192.0.2.1"), 8)))
        self.assertEqual(unshared.drain_charges(), {})

    def test_clock_may_be_a_callable(self) -> None:
        """The clock is an IReactorTime or any callable returning seconds."""
        now = [0.0]
        limiters = Limiters(RateLimitSettings(per_address=limit("1/s", 1)), clock=lambda: now[0])
        limiters.check_client("192.0.2.1")
        self.assertFalse(limiters.check_client("192.0.2.1").allowed)
        now[0] = 1.0
        self.assertIs(limiters.check_client("192.0.2.1"), ALLOWED)

    def test_counters(self) -> None:
        """stats() gives per table: size, capacity, refusals, dry-run passes, evictions, overflow."""
        limiters, clock = node(per_address=limit("1/s", 1), table_size=2)
        for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"):
            limiters.check_client(ip)
        clock.advance(5)
        limiters.check_client("192.0.2.4")
        stats = {s.name: s for s in limiters.stats()}
        self.assertEqual(set(stats), {"address", "auth-address", "auth-user", "client",
                                      "principal", "container", "project", "program"})
        address = stats["address"]
        self.assertEqual((address.size, address.capacity, address.refusals, address.evictions,
                          address.overflowed), (2, 2, 1, 1, 1))


class NodeSettings(SynchronousTestCase):
    """The ``[ratelimit]`` config table: defaults, validation naming the key, round trip."""

    def test_defaults(self) -> None:
        """On; 1000/s burst 2000 per address; 10/min burst 20 failed auth; 65,536 keys; /64."""
        d = RateLimitSettings.from_mapping({})
        self.assertEqual(d, DEFAULT_SETTINGS)
        self.assertEqual(d.to_mapping(), {
            "enabled": True, "per_address_rate": "1000/s", "per_address_burst": 2000,
            "failed_auth_rate": "10/min", "failed_auth_burst": 20, "table_size": 65536,
            "ipv6_prefix": 64, "dry_run": False, "shared": False, "shared_sync_ms": 50,
            "failed_auth_user_rate": "30/min", "failed_auth_user_burst": 100})

    def test_every_key_read_and_round_tripped(self) -> None:
        """Every key is read, and to_mapping() reads back to an equal value."""
        table = {"enabled": False, "per_address_rate": "50/s", "per_address_burst": 100,
                 "failed_auth_rate": "5/m", "failed_auth_burst": 3, "table_size": 1000,
                 "ipv6_prefix": 48, "dry_run": True, "shared": True, "shared_sync_ms": 20}
        s = RateLimitSettings.from_mapping(table)
        self.assertEqual(s, RateLimitSettings(False, limit("50/s", 100), limit("5/min", 3), 1000, 48,
                                              True, True, shared_sync_ms=20))
        self.assertEqual(RateLimitSettings.from_mapping(s.to_mapping()), s)

    def test_bad_values_name_the_key(self) -> None:
        """Each bad value raises InvalidRateLimit whose field is the key at fault."""
        cases = {
            "enabled": [1, "yes"], "dry_run": [0, "false"], "shared": [None],
            "per_address_rate": ["lots", 0, "1/week"], "failed_auth_rate": [True, "-3/s"],
            "per_address_burst": [0, 1.5, "10", False], "failed_auth_burst": [-1],
            "table_size": [0, 10**9, 2.0], "ipv6_prefix": [0, 129, "64"],
            "shared_sync_ms": [0, 4, 5001, 50.0, "50", True],
        }
        for key, values in cases.items():
            for value in values:
                with self.assertRaises(InvalidRateLimit, msg=f"{key}={value!r}") as caught:
                    RateLimitSettings.from_mapping({key: value})
                self.assertEqual(caught.exception.field, key)

    def test_unknown_key(self) -> None:
        """An unknown key is refused by name."""
        with self.assertRaises(InvalidRateLimit) as caught:
            RateLimitSettings.from_mapping({"per_adress_rate": "1/s"})
        self.assertEqual(str(caught.exception), "per_adress_rate: unknown key")


class SetRateLimits(SynchronousTestCase):
    """The admin API's ``rate_limits`` object: frozen values, errors naming the dotted field."""

    FULL = {"per_client": {"rate": "100/s", "burst": 200},
            "per_principal": {"rate": "10/s", "burst": 20},
            "per_container": {"rate": "6000/min", "burst": 500},
            "per_project": {"rate": "20000/min", "burst": 1000},
            "per_program": {"terminal": {"rate": "5/s", "burst": 10},
                            "http-3000": {"rate": "50/s", "burst": 100}},
            "dry_run": True}

    def test_full_shape(self) -> None:
        """Every key is read into frozen values, and to_json() reads back to an equal value."""
        rl = parse_rate_limits(self.FULL)
        self.assertEqual(rl.per_client, limit("100/s", 200))
        self.assertEqual(rl.per_container, limit("6000/min", 500))
        self.assertEqual(rl.per_container.interval, limit("100/s", 500).interval)
        self.assertEqual(dict(rl.per_program),
                         {"terminal": limit("5/s", 10), "http-3000": limit("50/s", 100)})
        self.assertTrue(rl.dry_run)
        self.assertEqual(parse_rate_limits(rl.to_json()), rl)
        self.assertEqual(parse_rate_limits(json.loads(json.dumps(rl.to_json()))), rl)
        with self.assertRaises(AttributeError):
            rl.dry_run = False  # type: ignore[misc]
        with self.assertRaises(TypeError):
            rl.per_program["x"] = limit("1/s", 1)  # type: ignore[index]

    def test_partial_and_null(self) -> None:
        """Every key is optional; null is no limit; None is no limits at all."""
        rl = parse_rate_limits({"per_container": {"rate": 5, "burst": 5}, "per_project": None})
        self.assertIsNone(rl.per_project)
        self.assertEqual(rl.to_json(), {"per_container": {"rate": "5/s", "burst": 5}, "dry_run": False})
        self.assertIs(parse_rate_limits(None), NO_RATE_LIMITS)
        self.assertTrue(NO_RATE_LIMITS.empty)

    def test_errors_name_the_dotted_field(self) -> None:
        """Unknown keys and bad values are refused naming the dotted field."""
        cases = [
            ({"per_cliant": {}}, "rate_limits.per_cliant"),
            ({"per_client": {"rate": "100/s", "burst": 2, "extra": 1}}, "rate_limits.per_client.extra"),
            ({"per_client": {"rate": "100/x", "burst": 2}}, "rate_limits.per_client.rate"),
            ({"per_client": {"rate": "100/s"}}, "rate_limits.per_client.burst"),
            ({"per_principal": "100/s"}, "rate_limits.per_principal"),
            ({"per_program": {"http-3000": {"rate": "1/s", "burst": 0}}},
             "rate_limits.per_program.http-3000.burst"),
            ({"per_program": {"Not A Program": {"rate": "1/s", "burst": 1}}}, "rate_limits.per_program"),
            ({"per_program": {"http-123456": {"rate": "1/s", "burst": 1}}}, "rate_limits.per_program"),
            ({"per_program": [1]}, "rate_limits.per_program"),
            ({"per_program": {f"p{i}": {"rate": "1/s", "burst": 1} for i in range(65)}},
             "rate_limits.per_program"),
            ({"dry_run": "no"}, "rate_limits.dry_run"),
            ({"x" * 100: 1}, "rate_limits"),
            ([], "rate_limits"),
        ]
        for value, field in cases:
            with self.assertRaises(InvalidRateLimit, msg=repr(value)[:80]) as caught:
                parse_rate_limits(value)
            self.assertEqual(caught.exception.field, field)

    def test_field_prefix_is_the_callers(self) -> None:
        """The caller chooses the root of the dotted path (where it stores the object)."""
        with self.assertRaises(InvalidRateLimit) as caught:
            parse_rate_limits({"per_client": {"rate": "1/s", "burst": 0}}, "limits")
        self.assertEqual(caught.exception.field, "limits.per_client.burst")


class PublicFace(SynchronousTestCase):
    """The package exports what its docstring promises, and nothing it does not define."""

    def test_exports(self) -> None:
        """Every name in __all__ exists, and the gateway's entry points are among them."""
        for name in limits.__all__:
            self.assertTrue(hasattr(limits, name), name)
        for method in ("check_client", "check_failed_auth", "record_failed_auth", "check_after_decision",
                       "stats", "client_key"):
            self.assertTrue(callable(getattr(Limiters, method)), method)

    def test_pure_core(self) -> None:
        """The package never imports the reactor (it is given a clock); only its I/O modules
        (the store, the exchange among workers) do I/O."""
        import sys
        import hoodyproxy.limits.shared  # noqa: F401 (loaded, yet left out below)
        io = {"hoodyproxy.limits.shared", "hoodyproxy.limits.store"}
        names = [m for m in sys.modules if m.startswith("hoodyproxy.limits") and m not in io]
        self.assertTrue(names)
        source = "".join(open(sys.modules[m].__file__).read() for m in names)  # type: ignore[arg-type]
        self.assertNotIn("twisted.internet", source)
